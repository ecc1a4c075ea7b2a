"""Two gloo ranks on CPU quantize like one process, up to the order of the Hessian sums; a dead rank fails the job."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import CALIB, setup  # noqa: E402

from quantmoe.quant.pack import unpack
from quantmoe.quant.pipeline import quantize_model

WORKER = Path(__file__).parent / "dist_worker.py"
# Tolerance (float32 Hessians summed per rank, then across ranks, instead of in one pass): a code
# may land on the other side of a rounding boundary and GPTQ carries that through its column loop.
MAX_CODES_DIFFERING = 0.01  # fraction of all codes
MAX_LOGIT_DIFF = 0.05  # absolute, on logits of order 1


def _launch(tmp_path: Path, world: int, *extra: str) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, (
        str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH")))))
    return [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(tmp_path / "rendezvous"),
                              str(tmp_path / "out.pt"), *extra], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(world)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(exit code, stderr) of each rank; the ones still running then are killed, as torchrun would."""
    try:
        results = []
        for p in procs:
            err = p.communicate(timeout=timeout)[1]  # drains the pipes while waiting
            results.append((p.returncode, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def test_two_ranks_match_one_process(tmp_path):
    procs = _launch(tmp_path, 2)
    model, specs, windows = setup()
    report = quantize_model(model, specs, windows, CALIB, progress=False)
    results = _wait(procs, timeout=120)
    assert all(rc == 0 for rc, _ in results), results
    ranks = torch.load(tmp_path / "out.pt")
    state = model.state_dict()
    # the same plan: every unit with the same method, bits, groups and (global) token count
    assert set(ranks["units"]) == set(report.units)
    for name, unit in report.units.items():
        other = ranks["units"][name]
        assert (other["method"], other["bits"], other["group_size"], other["tokens"]) == \
               (unit.method, unit.bits, unit.group_size, unit.tokens), name
    assert ranks["expert_tokens"] == dict(report.expert_tokens)
    assert sorted(ranks["fallbacks"]) == sorted(report.fallbacks)
    assert ranks["state"].keys() == state.keys()
    differing = total = 0
    for key, t in state.items():
        if key.endswith(".qweight"):
            bits = report.units[key.removesuffix(".qweight")].bits
            a, b = unpack(t, bits, t.shape[1] * 32 // bits), unpack(ranks["state"][key], bits, t.shape[1] * 32 // bits)
            differing += int((a != b).sum())
            total += a.numel()
        elif not key.endswith((".qzeros", ".scales")):
            assert torch.equal(t, ranks["state"][key]), key  # unquantized tensors untouched
    assert differing / total <= MAX_CODES_DIFFERING, f"{differing} of {total} codes differ"
    model.load_state_dict(ranks["state"])  # same shapes and buffers: the 2-rank result in the same module tree
    two = _logits(model, windows)
    model.load_state_dict(state)
    one = _logits(model, windows)
    assert (two - one).abs().max().item() <= MAX_LOGIT_DIFF  # measured here: 0 codes differ, logits equal


@pytest.mark.parametrize("die", ["exit", "hang"])
def test_a_dead_rank_fails_the_job(tmp_path, die):
    t0 = time.monotonic()
    procs = _launch(tmp_path, 2, "--die", die, "--timeout", "5")
    rc0, err0 = _wait(procs[:1], timeout=90)[0]
    procs[1].kill()  # as torchrun would once rank 0 failed (rank 1 exited already, or hangs)
    procs[1].communicate()
    assert rc0 != 0 and "RankFailure" in err0, err0[-2000:]
    assert "block 1 stage 0" in err0
    assert time.monotonic() - t0 < 90
    assert not (tmp_path / "out.pt").exists()
