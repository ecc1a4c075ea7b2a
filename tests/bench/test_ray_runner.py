"""Sweeps on a local Ray: the same store as without Ray, bounded retries, failures recorded and retried."""

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from quantmoe.bench.runner import run_sweep
from quantmoe.bench.store import ResultsStore
from quantmoe.bench.sweep import sweep_from_dict

ray = pytest.importorskip("ray")

from quantmoe.bench.ray_runner import RunTask, execute, run_sweep_ray  # noqa: E402

TINY = {
    "name": "tiny-ray",
    "seeds": [0, 1],
    "calibration": {"num_windows": 2, "seq_len": 32},
    "eval": {"perplexity": {"split": "test", "seq_len": 32, "max_windows": 2}},
    "statistics": {"windows": 2, "seq_len": 32},
    "runs": [
        {"name": "full precision", "full_precision": True},
        {"name": "uniform 2-bit", "policy": "uniform=2"},
        {"name": "top-1 frequent experts at 4", "policy": "experts=2,attention=4,shared=4,topk=1:4"},
    ],
}

# cost columns: measured, so they vary between any two runs (a checkpoint embeds its quantization times)
COST = ("created_at", "quant_seconds", "peak_rss_mb", "peak_device_mb", "checkpoint_bytes")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_deepseek_dir(tmp_path_factory) -> Path:
    import shutil

    from quantmoe.anatomy import tiny_model
    from quantmoe.models import embedded_root

    folder = tmp_path_factory.mktemp("tiny-deepseek")
    tiny_model("deepseek_v3", vocab_size=8192, max_position_embeddings=256).save_pretrained(folder)
    for f in (embedded_root() / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _rows(path: Path) -> dict:
    with ResultsStore(path, create=False) as store:
        return {r.key: asdict(r) for r in store.records()}


def test_ray_sweep_store_equals_the_local_sweep(tmp_path, tiny_model_dir, tiny_deepseek_dir, local_ray):
    config = sweep_from_dict({**TINY, "models": [str(tiny_model_dir), str(tiny_deepseek_dir)]})
    local = run_sweep(config, tmp_path / "local.sqlite", cache_dir=tmp_path / "cache-local", progress=False)
    on_ray = run_sweep_ray(config, tmp_path / "ray.sqlite", cache_dir=tmp_path / "cache-ray", progress=False,
                           threads=1)
    assert (local.ran, on_ray.ran, on_ray.failed) == (10, 10, 0)  # per model: full precision once, 2 runs x 2 seeds
    a, b = _rows(tmp_path / "local.sqlite"), _rows(tmp_path / "ray.sqlite")
    assert set(a) == set(b) and len(a) == 10
    differing = {(a[k]["run"], a[k]["seed"], c) for k in a for c in a[k] if c not in COST and a[k][c] != b[k][c]}
    assert not differing  # row for row, every metric bit for bit
    sizes = [(a[k]["checkpoint_bytes"], b[k]["checkpoint_bytes"]) for k in a if a[k]["seed"] is not None]
    assert all(x > 0 and abs(x - y) < 64 for x, y in sizes)  # the same checkpoint up to its recorded times
    assert len({r["model"] for r in a.values()}) == 2 and len({r["metrics"]["kl_mean"] for r in a.values()}) > 2
    again = run_sweep_ray(config, tmp_path / "ray.sqlite", cache_dir=tmp_path / "cache-ray", progress=False)
    assert (again.ran, again.skipped) == (0, 10)


def flaky(task: RunTask):
    """Seed 0 kills its worker on the first attempt; seed 1 raises on every attempt (attempts counted in files)."""
    import os

    marks = Path(task.cache_dir).parent / "attempts"
    marks.mkdir(exist_ok=True)
    n = len(list(marks.glob(f"{task.seed}-*")))
    (marks / f"{task.seed}-{n}").touch()
    if task.seed == 0 and n == 0:
        os._exit(1)  # the worker process dies
    if task.seed == 1:
        raise RuntimeError("injected failure")
    return execute(task)


def test_retries_then_failure_recorded_and_run_again(tmp_path, tiny_model_dir, local_ray):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
    config = sweep_from_dict({**TINY, "models": [str(tiny_model_dir)], "runs": TINY["runs"][1:2],
                              "ray": {"max_retries": 1}})
    store = tmp_path / "r.sqlite"
    out = run_sweep_ray(config, store, cache_dir=tmp_path / "cache", progress=False, threads=1, task_fn=flaky)
    assert (out.ran, out.failed) == (1, 1)  # seed 0 survived its dead worker, seed 1 spent its retries
    marks = tmp_path / "cache" / "attempts"
    assert len(list(marks.glob("0-*"))) == 2 and len(list(marks.glob("1-*"))) == 2  # 1 + max_retries, no more
    with ResultsStore(store, create=False) as s:
        (failure,) = s.failures()
        assert [r.seed for r in s.records()] == [0]
    assert failure.seed == 1 and failure.attempts == 2 and "injected failure" in failure.error
    again = run_sweep_ray(config, store, cache_dir=tmp_path / "cache", progress=False, threads=1)
    assert (again.ran, again.skipped, again.failed) == (1, 1, 0)  # the failed run is run again, the other kept
    with ResultsStore(store, create=False) as s:
        assert s.failures() == [] and sorted(r.seed for r in s.records()) == [0, 1]
