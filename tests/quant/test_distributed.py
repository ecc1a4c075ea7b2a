"""Two gloo ranks on CPU quantize like one process, up to the order of the Hessian sums; a dead rank fails the job."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantmoe.api import load
from quantmoe.cli import main
from quantmoe.quant.pack import unpack

WORKER = Path(__file__).parent / "dist_worker.py"
# Tolerance (float32 Hessians summed per rank, then across ranks, instead of in one pass): a code
# may land on the other side of a rounding boundary and GPTQ carries that through its column loop.
MAX_CODES_DIFFERING = 0.01  # fraction of all codes
MAX_LOGIT_DIFF = 0.05  # absolute, on logits of order 1


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, (
        str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH")))))


def _codes(folder: Path, units: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, packed codes unpacked."""
    out = {}
    for key, t in load_file(folder / "model.safetensors").items():
        if key.endswith(".qweight"):
            bits = units[key.removesuffix(".qweight")]["bits"]
            t = unpack(t, bits, t.shape[1] * 32 // bits)
        out[key] = t
    return out


def test_torchrun_two_ranks_match_one_process(tmp_path, tiny_model_dir):
    # the two ranks calibrate one expert per pass (--expert-stats-mb, bit for bit the same in one process:
    # test_pipeline.py), so their Hessian reductions run per group
    args = ["quantize", str(tiny_model_dir), "--bits", "3", "--group-size", "16", "--calib-windows", "8",
            "--calib-len", "32", "--min-expert-tokens", "4", "--threads", "1"]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "quantmoe",
                            *args, "--expert-stats-mb", "0.001", "--out", str(tmp_path / "two")], env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
        stdout, stderr = two.communicate(timeout=120)
    finally:
        if two.poll() is None:
            two.kill()
            two.communicate()
    assert two.returncode == 0, stderr[-3000:]
    assert stdout.count(" linears, ") == 1  # rank 0 alone reports (and writes)
    r1, r2 = (json.loads((tmp_path / d / "quant_report.json").read_text()) for d in ("one", "two"))
    # the same plan: every unit with the same method, bits, groups and (global) token count
    assert r1["units"].keys() == r2["units"].keys()
    keys = ("method", "bits", "group_size", "tokens")
    for name, unit in r1["units"].items():
        assert [unit[k] for k in keys] == [r2["units"][name][k] for k in keys], name
    assert r1["expert_tokens"] == r2["expert_tokens"] and sorted(r1["fallbacks"]) == sorted(r2["fallbacks"])
    a, b = _codes(tmp_path / "one", r1["units"]), _codes(tmp_path / "two", r1["units"])
    assert a.keys() == b.keys()
    codes = [k for k in a if k.endswith(".qweight")]
    differing, total = sum(int((a[k] != b[k]).sum()) for k in codes), sum(a[k].numel() for k in codes)
    assert differing / total <= MAX_CODES_DIFFERING, f"{differing} of {total} codes differ"
    for k in a:
        if not k.endswith((".qweight", ".qzeros", ".scales")):
            assert torch.equal(a[k], b[k]), k  # unquantized tensors untouched
    windows = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = load(tmp_path / "one")(input_ids=windows).logits - load(tmp_path / "two")(input_ids=windows).logits
    assert diff.abs().max().item() <= MAX_LOGIT_DIFF  # measured here: 0 codes differ, logits equal


def _launch(tmp_path: Path, world: int, *extra: str) -> list[subprocess.Popen]:
    """One dist_worker.py process per rank, joined through a rendezvous file."""
    return [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(tmp_path / "rendezvous"),
                              str(tmp_path / "out.pt"), *extra], env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(world)]


@pytest.mark.parametrize("die", ["exit", "hang"])
def test_a_dead_rank_fails_the_job(tmp_path, die):
    t0 = time.monotonic()
    procs = _launch(tmp_path, 2, "--die", die, "--timeout", "5")
    try:
        err0 = procs[0].communicate(timeout=90)[1]  # drains the pipes while waiting
    finally:
        for p in procs:  # rank 1 exited already, or hangs: killed as torchrun would once rank 0 failed
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[0].returncode != 0 and "RankFailure" in err0, err0[-2000:]
    assert "block 1 stage 0" in err0
    assert time.monotonic() - t0 < 90
    assert not (tmp_path / "out.pt").exists()


def test_windows_are_shared_contiguously_and_experts_round_robin():
    from quantmoe.anatomy import LinearUnit
    from quantmoe.quant.distributed import Parallel

    windows = torch.arange(10)[:, None]
    shares = [Parallel(r, 3).share(windows) for r in range(3)]
    assert torch.equal(torch.cat(shares), windows) and [len(s) for s in shares] == [3, 3, 4]
    with pytest.raises(ValueError, match="num_windows"):
        Parallel(0, 3).share(windows[:2])
    for expert, owner in ((None, 0), (0, 0), (1, 1), (2, 2), (3, 0)):
        unit = LinearUnit("x", "expert", 0, expert, "down_proj", 8, 8, False)
        assert Parallel(1, 3).owner(unit) == owner
