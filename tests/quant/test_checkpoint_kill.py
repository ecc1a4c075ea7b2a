"""A real ``kill -9`` in the middle of a checkpoint save over an earlier one.

A child process reloads checkpoint v1 and saves it again as v2 at the same path; it is held
at a chosen moment of the save (by wrapping a function the save calls, in the child only)
and killed with SIGKILL there. Whatever the moment, the path must then be absent, the
previous checkpoint (v1, loading to the same logits), or the complete new one (v2): never a
mix that loads, nor one that loads wrong.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import quantmoe
from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant.checkpoint import CorruptCheckpointError, save_quantized
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import quantmoe
    import quantmoe.quant.checkpoint as ckpt
    from quantmoe.quant.grid import QuantSpec

    path, marker, moment = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def hold():
        marker.touch()
        time.sleep(120)

    if moment == "weights-written":  # model.safetensors complete, nothing else yet
        real_save = ckpt.save_file
        def save_file(*a, **k):
            real_save(*a, **k)
            hold()
        ckpt.save_file = save_file
    elif moment == "between-renames":  # the old checkpoint moved aside, the new one not yet in place
        real_replace = os.replace
        def replace(src, dst):
            real_replace(src, dst)
            if Path(src) == path.resolve():
                hold()
        ckpt.os.replace = replace
    model = quantmoe.load(path, attn_implementation="eager")
    model.model.norm.weight.data.add_(1.0)  # v2 differs from v1 in its bytes and its logits
    cfg = ckpt.read_quantization_config(path)
    specs = {name: QuantSpec(**s) for name, s in cfg["modules"].items()}
    ckpt.save_quantized(model, path, specs, {"version": 2})
    print("finished")
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("mixtral")
    specs = Plan.uniform(4, group_size=16).resolve(describe(model))
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), GPTQConfig(method="rtn"),
                   progress=False)
    with torch.no_grad():
        v1 = model(input_ids=windows).logits
        norm = model.model.norm.weight.clone()
        model.model.norm.weight.add_(1.0)  # what the child saves as v2
        v2 = model(input_ids=windows).logits
        model.model.norm.weight.copy_(norm)
    assert not torch.equal(v1, v2)
    return model, specs, windows, {1: v1, 2: v2}


@pytest.mark.parametrize("moment", ["weights-written", "between-renames"])
def test_kill_9_mid_save_leaves_absent_previous_or_new(tmp_path, saved, moment):
    model, specs, windows, logits = saved
    path = save_quantized(model, tmp_path / "q", specs, {"version": 1})
    marker = tmp_path / "held"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(marker), moment], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), f"the save never reached {moment}: {proc.poll()} {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if not path.exists():
        return  # absent: allowed (the previous checkpoint was moved aside, not overwritten)
    try:
        loaded = quantmoe.load(path, attn_implementation="eager")
    except CorruptCheckpointError as err:
        pytest.fail(f"after a kill at {moment!r} the path holds a broken checkpoint: {err}")
    version = json.loads((path / "quantization_config.json").read_text())["version"]
    assert version in (1, 2)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=windows).logits, logits[version])
