"""Input a user can give: one clear error line (exit 2), no traceback, nothing overwritten."""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quantmoe.cli import main

DEMO_SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "demo.yaml"
TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n" * 40


def _snapshot(root):
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _fails(argv, caplog, *needles):
    """``quantmoe ARGV`` ends with exit code 2 and exactly one one-line error naming every needle."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def _quantize(model, out, *extra):
    return ["quantize", str(model), "--bits", "4", "--group-size", "16", "--calib-windows", "2", "--calib-len", "16",
            "--out", str(out), *map(str, extra)]


# --- data loss ----------------------------------------------------------------------------------


def test_quantize_out_refuses_foreign_folder_file_and_source(tmp_path, caplog, tiny_model_dir, calib):
    d = tmp_path / "d"
    d.mkdir()
    (d / "important.txt").write_text("x")
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    before = {p: _snapshot(p) for p in (d, f, tiny_model_dir)}
    _fails(_quantize(tiny_model_dir, d, "--calib", calib), caplog, str(d), "did not write")
    _fails(_quantize(tiny_model_dir, d, "--calib", calib, "--overwrite"), caplog, "did not write")
    _fails(_quantize(tiny_model_dir, f, "--calib", calib, "--overwrite"), caplog, "existing file")
    _fails(_quantize(tiny_model_dir, tiny_model_dir, "--calib", calib, "--overwrite"), caplog, "source model")
    assert {p: _snapshot(p) for p in before} == before


def test_quantize_overwrite_replaces_our_checkpoint(tmp_path, caplog, tiny_model_dir, calib):
    out = tmp_path / "q"
    assert main(_quantize(tiny_model_dir, out, "--calib", calib, "--method", "rtn")) == 0
    first = _snapshot(out / "quantization_config.json")
    _fails(_quantize(tiny_model_dir, out, "--calib", calib), caplog, "--overwrite")
    assert _snapshot(out / "quantization_config.json") == first
    assert main(_quantize(tiny_model_dir, out, "--calib", calib, "--overwrite", "--damp", "0")) == 0
    assert _snapshot(out / "quantization_config.json") != first  # now GPTQ with damp 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "q"]


def test_plan_solve_report_and_store_refuse_foreign_outputs(tmp_path, caplog):
    f = tmp_path / "plan.yaml"
    f.write_text("my notes\n")
    _fails(["plan", "mixtral-s", "--policy", "uniform=4", "--out", str(f), "--overwrite"], caplog, "did not write")
    _fails(["solve", "mixtral-s", "--target", "3", "--out", str(f)], caplog, "did not write")
    _fails(["solve", "mixtral-s", "--target", "3", "--damage-cache", str(f)], caplog, "--damage-cache", "did not write")
    assert f.read_text() == "my notes\n"
    ours = tmp_path / "ours.yaml"
    assert main(["plan", "mixtral-s", "--policy", "uniform=4", "--out", str(ours)]) == 0
    _fails(["plan", "mixtral-s", "--policy", "uniform=3", "--out", str(ours)], caplog, "--overwrite")
    assert main(["plan", "mixtral-s", "--policy", "uniform=3", "--out", str(ours), "--overwrite"]) == 0
    assert "average bits 3.0000" in ours.read_text()
    _fails(["bench", str(DEMO_SWEEP), "--store", str(f)], caplog, "--store", "did not write")
    d = tmp_path / "d"
    d.mkdir()
    (d / "important.txt").write_text("x")
    _fails(["bench", str(DEMO_SWEEP), "--store", str(tmp_path / "new.sqlite"), "--report-dir", str(d)],
           caplog, "did not write")
    assert not (tmp_path / "new.sqlite").exists()
    _fails(["report", str(f)], caplog, "not a quantmoe results store")
    assert f.read_text() == "my notes\n" and (d / "important.txt").read_text() == "x"


# --- plan values and YAML -----------------------------------------------------------------------


@pytest.mark.parametrize("text, needles", [
    ("default: {bits: 4, symmetric: 'false'}", ["`symmetric`", "true or false", "string"]),
    ("default: {bits: 4.0}", ["`bits`", "expected an integer"]),
    ("default: {group_size: 64.0}", ["`group_size`", "expected an integer"]),
    ("roles: {attention: 4}", ["`roles.attention`", "mapping"]),
    ("default: {group_size: true}", ["`group_size`", "boolean"]),
    ("default: {bits: '4'}", ["`bits`", "expected an integer", "string"]),
    ("default: {bits: 4\nroles: [", ["not valid YAML at line 2"]),
    ("default:\n  bits: 4\n   group_size: 8", ["not valid YAML at line 3"]),
])
def test_bad_plan_values_name_the_file_and_key(tmp_path, caplog, text, needles):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    message = _fails(["quantize", "mixtral-s", "--plan", str(plan), "--out", str(tmp_path / "q")], caplog,
                     str(plan), *needles)
    assert "is not one of" not in message  # a string is not "not one of 2, 3, 4, 8, 16"


def test_malformed_sweep_and_policy_name_the_file_and_line(tmp_path, caplog):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: x\nmodels: [mixtral-s\nruns: []\n")
    _fails(["bench", str(sweep)], caplog, str(sweep), "not valid YAML at line 3")
    policy = tmp_path / "policy.yaml"
    policy.write_text("- experts: 2\n- attention: [4\n")
    _fails(["plan", "mixtral-s", "--policy", str(policy)], caplog, str(policy), "not valid YAML at line 3")


def test_bits_help_and_error_agree(capsys, caplog, tmp_path):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    message = _fails(["quantize", "mixtral-s", "--bits", "5", "--out", str(tmp_path / "q")], caplog, "--bits")
    allowed = message.split("is not one of ")[1]
    assert f"one of {allowed}" in help_text


# --- text files ---------------------------------------------------------------------------------


def test_empty_and_non_utf8_text(tmp_path, caplog, tiny_model_dir):
    empty, blank, latin = tmp_path / "empty.txt", tmp_path / "blank.txt", tmp_path / "latin.txt"
    empty.write_text("")
    blank.write_text("  \n\n\t\n")
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 20)
    for path in (empty, blank):
        _fails(_quantize(tiny_model_dir, tmp_path / "q", "--calib", path), caplog, str(path), "empty")
        _fails(["eval", str(tiny_model_dir), "--split", str(path)], caplog, str(path), "empty")
    _fails(_quantize(tiny_model_dir, tmp_path / "q", "--calib", latin), caplog, str(latin), "UTF-8")
    _fails(["solve", str(tiny_model_dir), "--target", "3", "--calib", str(latin)], caplog, str(latin), "UTF-8")
    assert not (tmp_path / "q").exists()


# --- models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_model_dir):
    """Model folders a user may give: tokenizer larger than the embedding, no tokenizer, NaN in a router."""
    from quantmoe.anatomy import tiny_model

    root = tmp_path_factory.mktemp("broken")
    small = tiny_model("mixtral", vocab_size=1000, max_position_embeddings=256)
    small.save_pretrained(root / "small-vocab")
    for f in tiny_model_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, root / "small-vocab" / f.name)
    nan = tiny_model("mixtral", vocab_size=8192, max_position_embeddings=256)
    with torch.no_grad():
        nan.model.layers[1].mlp.gate.weight[2, 5] = float("nan")
    nan.save_pretrained(root / "nan-router")
    for f in tiny_model_dir.iterdir():
        if "token" in f.name:
            shutil.copy(f, root / "nan-router" / f.name)
    shutil.copytree(tiny_model_dir, root / "no-tokenizer", ignore=shutil.ignore_patterns("*token*"))
    return root


def test_model_problems_are_named_up_front(tmp_path, caplog, broken_models, tiny_model_dir, calib):
    small, notok, nan = (broken_models / n for n in ("small-vocab", "no-tokenizer", "nan-router"))
    _fails(_quantize(small, tmp_path / "q", "--calib", calib), caplog, "8,192 tokens", "1,000 rows")
    _fails(["eval", str(small), "--split", str(calib)], caplog, "1,000 rows")
    _fails(_quantize(notok, tmp_path / "q", "--calib", calib), caplog, f"no tokenizer files in {notok}",
           "--tokenizer")
    assert main(_quantize(notok, tmp_path / "q", "--calib", calib, "--tokenizer", tiny_model_dir,
                          "--method", "rtn")) == 0
    _fails(_quantize(nan, tmp_path / "q2", "--calib", calib), caplog, "model.layers.1.mlp.gate.weight", "NaN")
    assert not (tmp_path / "q2").exists()


def test_checkpoint_load_messages(tmp_path, tiny_model_dir, calib):
    import quantmoe
    from quantmoe.quant.checkpoint import CorruptCheckpointError

    with pytest.raises(FileNotFoundError, match="no such checkpoint folder") as err:
        quantmoe.load(tmp_path / "missing")
    assert "interrupted" not in str(err.value)
    out = tmp_path / "q"
    assert main(_quantize(tiny_model_dir, out, "--calib", calib, "--method", "rtn")) == 0
    cfg = out / "quantization_config.json"
    cfg.write_text(cfg.read_text()[:100])
    with pytest.raises(CorruptCheckpointError, match=r"quantization_config\.json is not valid JSON"):
        quantmoe.load(out)


# --- model names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtrall-s", "mixtral_s", "Mixtral-S"])
def test_misspelled_embedded_name_suggests_the_right_one(caplog, name, tmp_path):
    t0 = time.perf_counter()
    for argv in (["inspect", name], ["plan", name, "--policy", "uniform=4"],
                 ["quantize", name, "--bits", "4", "--out", str(tmp_path / "q")]):
        _fails(argv, caplog, f"unknown model {name!r}", "did you mean mixtral-s?")
    assert time.perf_counter() - t0 < 10


def test_hub_id_offline_fails_at_once(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    _fails(["quantize", "someorg/not-a-model", "--bits", "4", "--out", str(tmp_path / "q")], caplog,
           "HF_HUB_OFFLINE", "someorg/not-a-model")
    assert time.perf_counter() - t0 < 10


def test_hub_id_with_unreachable_hub_fails_at_once(caplog, monkeypatch, tmp_path):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as s:  # a local port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    _fails(["inspect", "someorg/not-a-model"], caplog, "cannot be reached", "someorg/not-a-model")
    assert time.perf_counter() - t0 < 10


def test_the_real_command_prints_one_line_and_no_traceback(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("default: {bits: '4'}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    for argv in (["quantize", "mixtral-s", "--plan", str(plan), "--out", str(tmp_path / "q")],
                 ["eval", "mixtrall-s"]):
        proc = subprocess.run([sys.executable, "-m", "quantmoe.cli", *argv], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert len(lines) == 1, proc.stderr


def test_solve_menu_and_budget_errors_come_before_any_measurement(caplog, monkeypatch):
    import quantmoe.alloc.damage as damage_module

    def never(*args, **kwargs):
        raise AssertionError("measured damage for a bad menu")

    monkeypatch.setattr(damage_module, "load_or_measure_damage", never)
    solve = ["solve", "mixtral-s", "--target", "3"]
    _fails([*solve, "--menu", "3/g6x,4"], caplog, "3/g6x", "gSIZE")
    _fails([*solve, "--menu", "3", "--clips", "hmse"], caplog, "--menu", "not both")
    _fails([*solve, "--grids", "sym,skew"], caplog, "--grids", "skew")
    _fails([*solve, "--group-sizes", "64,big"], caplog, "--group-sizes")
    _fails(["solve", "mixtral-s", "--target", "1.9", "--widths", "2,3,4"], caplog, "impossible budget", "--target")
