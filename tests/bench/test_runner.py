"""Sweeps on a tiny random model: rerun identity, resume, kill -9 and resume."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantmoe.bench.runner import run_sweep
from quantmoe.bench.store import ResultsStore
from quantmoe.bench.summary import aggregate
from quantmoe.bench.sweep import sweep_from_dict

TINY = {
    "name": "tiny",
    "models": ["MODEL"],
    "seeds": [0, 1],
    "calibration": {"num_windows": 4, "seq_len": 64},
    "eval": {"perplexity": {"split": "test", "seq_len": 64, "max_windows": 4}},
    "statistics": {"windows": 4, "seq_len": 64, "damage_windows": 2},
    "runs": [
        {"name": "full precision", "full_precision": True},
        {"name": "uniform 2-bit", "policy": "uniform=2"},
        {"name": "experts 2 / attention 4", "policy": "experts=2,attention=4"},
    ],
}


@pytest.fixture
def sweep(tiny_model_dir):
    return {**TINY, "models": [str(tiny_model_dir)]}


def _metrics_by_key(path: Path) -> dict:
    with ResultsStore(path, create=False) as store:
        return {r.key: (r.run, r.seed, r.average_bits, r.metrics, r.plan) for r in store.records()}


def test_sweep_rows_and_identical_rerun(tmp_path, sweep):
    ev = {**TINY["eval"], "tasks": ["qmoe_cloze"], "task_limit": 8}
    config = sweep_from_dict({**sweep, "eval": ev})
    first = run_sweep(config, tmp_path / "a.sqlite", cache_dir=tmp_path / "cache", progress=False)
    assert (first.ran, first.skipped) == (5, 0)  # full precision once, 2 quantized runs x 2 seeds
    again = run_sweep(config, tmp_path / "a.sqlite", cache_dir=tmp_path / "cache", progress=False)
    assert (again.ran, again.skipped) == (0, 5)  # finished runs are not redone
    # a fresh store and a fresh cache: the same numbers, bit for bit
    run_sweep(config, tmp_path / "b.sqlite", cache_dir=tmp_path / "cache2", progress=False)
    a, b = _metrics_by_key(tmp_path / "a.sqlite"), _metrics_by_key(tmp_path / "b.sqlite")
    assert a == b and len(a) == 5
    with ResultsStore(tmp_path / "a.sqlite", create=False) as store:
        records = store.records()
        assert store.artifact(records[0].model_sha256, "routing")["frequency"]
    fp = next(r for r in records if r.seed is None)
    assert fp.metrics["kl_mean"] == 0 and fp.average_bits == 16 and fp.checkpoint_bytes is None
    q = [r for r in records if r.seed is not None]
    assert all(r.metrics["kl_mean"] > 0 and r.checkpoint_bytes > 0 and r.peak_rss_mb > 0 for r in q)
    assert all(0 <= r.metrics["task:qmoe_cloze"] <= 1 and "task_mean" in r.metrics for r in records)
    u2 = [r for r in q if r.run == "uniform 2-bit"]
    assert {r.seed for r in u2} == {0, 1} and all(set(r.plan.values()) == {2} for r in u2)
    assert u2[0].metrics != u2[1].metrics  # the calibration seed matters
    # which engines load each run's GPTQ export: 2-bit routed experts are not vLLM's fused-MoE formats
    assert fp.engines == {} and all(r.engines["gptqmodel"] == "" for r in q)
    assert all("experts" in r.engines["vllm"] for r in u2)
    mixed = next(r for r in q if r.run == "experts 2 / attention 4")
    blocks = mixed.bitmap["blocks"]
    assert 2 < mixed.average_bits < 4
    assert all(b["attention"] == 4 and set(b["experts"]) == {2} for b in blocks)
    agg = {g.run: g for g in aggregate(records)}
    assert agg["uniform 2-bit"].n == 2 and agg["uniform 2-bit"].std["kl_mean"] > 0


def test_changed_setting_is_a_new_run_not_a_stale_hit(tmp_path, sweep):
    config = sweep_from_dict({**sweep, "seeds": [0], "runs": TINY["runs"][1:2]})
    run_sweep(config, tmp_path / "s.sqlite", cache_dir=tmp_path / "cache", progress=False)
    changed = sweep_from_dict({**sweep, "seeds": [0], "runs": TINY["runs"][1:2],
                               "quantizer": {"group_size": 64}})
    outcome = run_sweep(changed, tmp_path / "s.sqlite", cache_dir=tmp_path / "cache", progress=False)
    assert outcome.ran == 1


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path, sweep):
    path = tmp_path / "sweep.yaml"
    store = tmp_path / "r.sqlite"
    seeds = list(range(8))
    path.write_text(yaml.safe_dump({**sweep, "store": str(store), "seeds": seeds}))
    expected = 1 + 2 * len(seeds)
    env = {**os.environ, "QUANTMOE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "quantmoe.cli", "bench", str(path), "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        rows = 0
        while rows < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if store.exists():
                try:
                    with sqlite3.connect(store) as db:
                        rows = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
                except sqlite3.OperationalError:  # schema not created yet, or locked
                    rows = 0
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next run
    finally:
        proc.wait()
    before = _metrics_by_key(store)
    assert 2 <= len(before) < expected
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(before)} already in" in done.stdout
    after = _metrics_by_key(store)
    assert len(after) == expected and all(after[k] == v for k, v in before.items())
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM runs").fetchone() == (expected, expected)


def test_unknown_model_is_a_clear_error(tmp_path):
    config = sweep_from_dict({**TINY, "models": [str(tmp_path / "nope")]})
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run_sweep(config, tmp_path / "s.sqlite", cache_dir=tmp_path / "cache", progress=False)


def test_evaluation_through_dequantized_linears_gives_identical_logits():
    import copy

    import torch

    from quantmoe.anatomy import describe, tiny_model
    from quantmoe.bench.runner import dequantize_in_place
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.quant.pipeline import GPTQConfig, quantize_model
    from quantmoe.quant.plan import Plan
    from quantmoe.quant.qlinear import QuantLinear

    model = tiny_model("mixtral")
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    specs = Plan.uniform(3, group_size=16).resolve(describe(model))
    quantize_model(model, specs, windows, CalibrationConfig(num_windows=4, seq_len=32), GPTQConfig(), progress=False)
    dense = copy.deepcopy(model)
    dequantize_in_place(dense)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, dense(input_ids=windows).logits)


def test_kill_9_inside_the_row_transaction_leaves_no_partial_row(tmp_path, sweep):
    """The worst moment: the row is written but not committed (QUANTMOE_TEST_PAUSE holds the
    process there). After kill -9 the store holds no row of that run, or a complete one; the
    resumed sweep then stores the run with all its metrics."""
    from quantmoe.bench.store import PAUSE_POINT
    from quantmoe.safeout import PAUSE_ENV

    path, store, marker = tmp_path / "sweep.yaml", tmp_path / "r.sqlite", tmp_path / "in-transaction"
    path.write_text(yaml.safe_dump({**sweep, "store": str(store), "seeds": [0], "runs": TINY["runs"][1:2]}))
    env = {**os.environ, "QUANTMOE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "quantmoe.cli", "bench", str(path), "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, env={**env, PAUSE_ENV: f"{PAUSE_POINT}:{marker}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists() and proc.poll() is None, "the sweep never reached its row's transaction"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT key, metrics FROM runs").fetchall()
    assert all({"ppl", "kl_mean"} <= json.loads(m).keys() for _, m in rows), rows  # nothing half-written
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _metrics_by_key(store)
    assert len(after) == 1
    (_, seed, bits, metrics, _), = after.values()
    assert seed == 0 and bits == 2 and metrics["ppl"] > 1 and metrics["kl_mean"] > 0
