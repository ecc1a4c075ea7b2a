"""A real ``kill -9`` of a process in the middle of a checkpoint save.

The save pauses at a chosen point when ``$QUANTMOE_TEST_PAUSE`` asks it to (tests only);
the test kills it there. Afterwards the path holds nothing, the previous checkpoint, or
the complete new one, and the next save to that path recovers what the kill left.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import quantmoe
from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant.checkpoint import (
    CONFIG_NAME,
    CorruptCheckpointError,
    recover_interrupted_save,
    save_quantized,
)
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.safeout import PAUSE_ENV

SAVE = textwrap.dedent("""
    import sys
    import torch
    from quantmoe.anatomy import describe, tiny_model
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.quant.checkpoint import save_quantized
    from quantmoe.quant.pipeline import GPTQConfig, quantize_model
    from quantmoe.quant.plan import Plan

    torch.manual_seed(0)
    model = tiny_model("mixtral")
    specs = Plan.uniform(4, group_size=16).resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), GPTQConfig(method="rtn"),
                   progress=False)
    save_quantized(model, sys.argv[1], specs, {"version": int(sys.argv[2])}, overwrite=True)
""")


def _save(out: Path, version: int, pause: str | None = None, flag: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if pause:
        env[PAUSE_ENV] = f"{pause}:{flag}"
    return subprocess.Popen([sys.executable, "-c", SAVE, str(out), str(version)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when_paused(procs: dict[Path, subprocess.Popen]) -> None:
    """Kill each process (``kill -9``) once it has created its flag file, i.e. reached its pause point."""
    deadline = time.monotonic() + 180
    waiting = dict(procs)
    while waiting:
        for flag, proc in list(waiting.items()):
            if flag.exists():
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait() == -signal.SIGKILL
                del waiting[flag]
            elif proc.poll() is not None:
                pytest.fail(f"the save ended before pausing: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            for proc in waiting.values():
                proc.kill()
            pytest.fail("a save did not reach its pause point within 180 s")
        time.sleep(0.05)


def _version(out: Path) -> int:
    return json.loads((out / CONFIG_NAME).read_text())["version"]


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    specs = Plan.uniform(4, group_size=16).resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), GPTQConfig(method="rtn"),
                   progress=False)
    return model, specs


# where the save is killed -> what the path holds right after the kill (the save replaces version 1 by 2;
# "first" saves to a new path)
CASES = {"save-after-weights": "previous", "save-between-renames": "absent", "save-before-cleanup": "new",
         "first": "absent"}


def test_kill_mid_save_leaves_previous_absent_or_complete(tmp_path, quantized):
    model, specs = quantized
    procs = {}
    for case in CASES:
        folder = tmp_path / case
        folder.mkdir()
        if case != "first":
            save_quantized(model, folder / "q", specs, {"version": 1})
        pause = "save-after-weights" if case == "first" else case
        procs[folder / "paused"] = _save(folder / "q", 2, pause, folder / "paused")
    _kill_when_paused(procs)  # the four saves run at once: one interpreter start-up of waiting, not four
    for case, expect in CASES.items():
        folder, out = tmp_path / case, tmp_path / case / "q"
        (folder / "paused").unlink()
        leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".q.")]
        assert leftovers, f"{case}: the kill left nothing behind: the pause point was not mid-save"
        if expect == "absent":
            assert not out.exists(), case
            with pytest.raises((FileNotFoundError, CorruptCheckpointError)):
                quantmoe.load(out)
        else:
            assert _version(out) == {"previous": 1, "new": 2}[expect], case
            quantmoe.load(out)  # complete: the SHA-256 of the weights matches
        # the next save recovers first (restores a stranded previous checkpoint, removes leftovers)
        recover_interrupted_save(out)
        assert sorted(p.name for p in folder.iterdir()) == ([] if case == "first" else ["q"]), case
        if case != "first":
            assert _version(out) == {"previous": 1, "absent": 1, "new": 2}[expect], case
            quantmoe.load(out)
        save_quantized(model, out, specs, {"version": 3}, overwrite=True)
        assert sorted(p.name for p in folder.iterdir()) == ["q"] and _version(out) == 3
