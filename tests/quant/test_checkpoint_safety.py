"""Saving never loses data: foreign paths are refused untouched, leftovers of killed saves are recovered."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

import quantmoe
from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant.checkpoint import CONFIG_NAME, save_quantized
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.safeout import OutputRefused


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (and ``root`` itself) with the hash of its bytes: a byte-for-byte picture."""
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def quantized():
    model = tiny_model("mixtral")
    specs = Plan.uniform(4, group_size=16).resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), GPTQConfig(method="rtn"),
                   progress=False)
    return model, specs


def _version(path: Path) -> int:
    return json.loads((path / CONFIG_NAME).read_text())["version"]


def test_foreign_folder_is_refused_and_left_unchanged(tmp_path, quantized):
    model, specs = quantized
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "important.txt").write_text("x")
    (d / "sub" / "more.bin").write_bytes(b"\0\1\2")
    before = _snapshot(d)
    for overwrite in (False, True):
        with pytest.raises(OutputRefused, match="did not write"):
            save_quantized(model, d, specs, {}, overwrite=overwrite)
        assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no partial folder left either


def test_existing_file_is_refused_and_left_unchanged(tmp_path, quantized):
    model, specs = quantized
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    with pytest.raises(OutputRefused, match="existing file"):
        save_quantized(model, f, specs, {}, overwrite=True)
    assert f.read_text() == "keep me"


def test_source_model_folder_is_refused(tmp_path, quantized):
    model, specs = quantized
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    before = _snapshot(src)
    for out in (src, tmp_path):  # the folder itself, and a folder holding it
        with pytest.raises(OutputRefused, match="source model"):
            save_quantized(model, out, specs, {}, overwrite=True, protect=(src,))
    assert _snapshot(src) == before


def test_replacing_our_checkpoint_needs_overwrite(tmp_path, quantized):
    model, specs = quantized
    out = save_quantized(model, tmp_path / "q", specs, {"version": 1})
    before = _snapshot(out)
    with pytest.raises(OutputRefused, match="--overwrite"):
        save_quantized(model, out, specs, {"version": 2})
    assert _snapshot(out) == before
    save_quantized(model, out, specs, {"version": 2}, overwrite=True)
    assert _version(out) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_empty_folder_is_used(tmp_path, quantized):
    model, specs = quantized
    (tmp_path / "q").mkdir()
    save_quantized(model, tmp_path / "q", specs, {"version": 1})
    assert _version(tmp_path / "q") == 1


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stranded_previous_checkpoint_is_restored(tmp_path, quantized, caplog):
    model, specs = quantized
    save_quantized(model, tmp_path / "q", specs, {"version": 1})
    pid = _dead_pid()
    os.replace(tmp_path / "q", tmp_path / f".q.old-{pid}")  # killed between the two renames
    (tmp_path / f".q.{pid}-abcdefgh.partial").mkdir()
    (tmp_path / f".q.{pid}-abcdefgh.partial" / "model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING), pytest.raises(OutputRefused, match="--overwrite"):
        save_quantized(model, tmp_path / "q", specs, {"version": 2})  # recovered, then refused (no --overwrite)
    assert "restored" in caplog.text and "unfinished folder" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"] and _version(tmp_path / "q") == 1
    quantmoe.load(tmp_path / "q")


def test_stale_old_checkpoint_beside_a_complete_one_is_removed(tmp_path, quantized, caplog):
    model, specs = quantized
    save_quantized(model, tmp_path / "q", specs, {"version": 2})
    save_quantized(model, tmp_path / "prev", specs, {"version": 1})
    pid = _dead_pid()
    os.replace(tmp_path / "prev", tmp_path / f".q.old-{pid}")  # killed before the old one was removed
    with caplog.at_level(logging.WARNING):
        save_quantized(model, tmp_path / "q", specs, {"version": 3}, overwrite=True)
    assert "removed" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"] and _version(tmp_path / "q") == 3


def test_leftovers_of_a_running_save_and_foreign_folders_are_left_alone(tmp_path, quantized):
    model, specs = quantized
    running = tmp_path / f".q.{os.getppid()}-abcdefgh.partial"  # our parent process is alive
    running.mkdir()
    foreign = tmp_path / f".q.old-{_dead_pid()}"
    foreign.mkdir()
    (foreign / "important.txt").write_text("x")
    save_quantized(model, tmp_path / "q", specs, {"version": 1})
    assert running.is_dir() and (foreign / "important.txt").read_text() == "x"
    shutil.rmtree(running)


def test_the_up_front_check_recovers_first(tmp_path, quantized):
    """A stranded previous checkpoint is restored before the check, so the check refuses at once
    (without --overwrite) rather than after the work, when the save recovers it."""
    from quantmoe.quant.checkpoint import check_checkpoint_output

    model, specs = quantized
    save_quantized(model, tmp_path / "q", specs, {"version": 1})
    os.replace(tmp_path / "q", tmp_path / f".q.old-{_dead_pid()}")
    with pytest.raises(OutputRefused, match="--overwrite"):
        check_checkpoint_output(tmp_path / "q")
    assert _version(tmp_path / "q") == 1


def test_leftovers_of_another_host_are_left_alone(tmp_path, quantized, caplog):
    """A save on another machine sharing the folder: its pid means nothing here, so nothing is touched."""
    from quantmoe.safeout import HOST_TAG

    model, specs = quantized
    other = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    partial = tmp_path / f".q.{_dead_pid()}@{other}-abcdefgh.partial"
    (partial / "x").mkdir(parents=True)
    moved = tmp_path / f".q.old-{_dead_pid()}@{other}"
    save_quantized(model, tmp_path / "prev", specs, {"version": 1})
    os.replace(tmp_path / "prev", moved)
    with caplog.at_level(logging.WARNING):
        save_quantized(model, tmp_path / "q", specs, {"version": 2})
    assert partial.is_dir() and moved.is_dir() and "another host" in caplog.text
    dead_here = tmp_path / f".q.{_dead_pid()}@{HOST_TAG}-abcdefgh.partial"
    dead_here.mkdir()
    save_quantized(model, tmp_path / "q", specs, {"version": 3}, overwrite=True)
    assert not dead_here.exists() and partial.is_dir()
