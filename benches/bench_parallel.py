"""Expert-parallel quantization: 1 rank against N ranks, time and equality.

Runs ``quantmoe quantize`` twice on the same model, plan and calibration, each in its own
process tree: once as one plain process, once under ``torchrun --nproc-per-node N`` (gloo on
CPU; NCCL when ``--device cuda``, one GPU per rank). Then compares the two checkpoints:

- codes: the fraction of packed codes that differ (only the floating-point order of the
  Hessian sums differs between the runs);
- the plan and report: every unit's method, bits and token count;
- KL(fp || quantized) of each on held-out windows, and the largest logit difference between them;
- time: the whole command, the quantization (rank 0's report) and each block's seconds,
  with the N-rank speedup per block.

Run (CPU, 2 gloo ranks, the embedded mixtral-s):

    .venv/bin/python benches/bench_parallel.py --model mixtral-s --ranks 2 --threads 1

and on an 8-GPU node (NCCL, one block on each rank's GPU):

    .venv/bin/python benches/bench_parallel.py --model MODEL --ranks 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def quantize(args: argparse.Namespace, ranks: int, out: Path) -> float:
    """Wall seconds of one ``quantmoe quantize`` (``ranks`` > 1: under torchrun)."""
    launcher = [sys.executable, "-m", "quantmoe"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "quantmoe"]
    cmd = launcher + ["quantize", args.model, "--bits", str(args.bits), "--group-size", str(args.group_size),
                      "--calib-windows", str(args.calib_windows), "--calib-len", str(args.calib_len),
                      "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.device:
        cmd += ["--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT / "src"), os.environ.get("PYTHONPATH")))))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def codes_differing(one: Path, many: Path, units: dict) -> dict[int, tuple[int, int]]:
    """Block -> (codes that differ, codes)."""
    from quantmoe.quant.pack import unpack

    a, b = load_file(one / "model.safetensors"), load_file(many / "model.safetensors")
    per_block: dict[int, list[int]] = {}
    for key, t in a.items():
        if key.endswith(".qweight"):
            unit = units[key.removesuffix(".qweight")]
            n = t.shape[1] * 32 // unit["bits"]
            ca, cb = unpack(t, unit["bits"], n), unpack(b[key], unit["bits"], n)
            block = int(re.search(r"\.(\d+)\.", key).group(1))
            counts = per_block.setdefault(block, [0, 0])
            counts[0] += int((ca != cb).sum())
            counts[1] += ca.numel()
    return {b: (d, n) for b, (d, n) in sorted(per_block.items())}


@torch.no_grad()
def kl_and_logits(args: argparse.Namespace, one: Path, many: Path) -> tuple[float, float, float]:
    """KL(fp || 1 rank), KL(fp || N ranks), max |logits(1 rank) - logits(N ranks)|."""
    from quantmoe import api
    from quantmoe.data import calibration_tokens
    from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
    from quantmoe.models import load_model

    fp, tokenizer = load_model(args.model)
    windows = make_windows(calibration_tokens(args.eval, tokenizer), args.calib_len, args.eval_windows)
    ref = reference_logprobs(fp, windows)
    del fp
    q1, qn = api.load(one), api.load(many)
    kl1, kln = evaluate(q1, windows, ref).kl_mean, evaluate(qn, windows, ref).kl_mean
    diff = max(float((q1(input_ids=w[None]).logits - qn(input_ids=w[None]).logits).abs().max()) for w in windows)
    return kl1, kln, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-s")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval", default="validation", help="held-out split for KL")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    ap.add_argument("--device", default=None, help="cuda: each rank on its own GPU (NCCL)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="weights in memory and on disk (default: the checkpoint's own, bfloat16 for mixtral-s)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        wall1 = quantize(args, 1, one)
        walln = quantize(args, args.ranks, many)
        r1 = json.loads((one / "quant_report.json").read_text())
        rn = json.loads((many / "quant_report.json").read_text())
        same_plan = all((u["method"], u["bits"], u["tokens"]) == (rn["units"][k]["method"], rn["units"][k]["bits"],
                                                                   rn["units"][k]["tokens"])
                        for k, u in r1["units"].items()) and r1["units"].keys() == rn["units"].keys()
        per_block = codes_differing(one, many, r1["units"])
        differing, total = (sum(c[i] for c in per_block.values()) for i in (0, 1))
        kl1, kln, diff = kl_and_logits(args, one, many)
    n = args.ranks
    print(f"{args.model}, {args.bits}-bit g{args.group_size}, {args.calib_windows} x {args.calib_len} calibration "
          f"tokens, {args.dtype or 'checkpoint dtype'}, device {args.device or 'cpu'}, "
          f"threads/rank {args.threads or 'all'}")
    print(f"{'block':>5} {'1 rank s':>9} {f'{n} ranks s':>10} {'speedup':>8} {'codes differing':>16}")
    for b, (s1, sn) in enumerate(zip(r1["block_seconds"], rn["block_seconds"])):
        d, c = per_block.get(b, (0, 1))
        print(f"{b:>5} {s1:>9.2f} {sn:>10.2f} {s1 / sn:>7.2f}x {100 * d / c:>15.3f}%")
    print(f"quantization: {r1['seconds']:.1f} s -> {rn['seconds']:.1f} s ({r1['seconds'] / rn['seconds']:.2f}x); "
          f"whole command (load, calibration text, save): {wall1:.1f} s -> {walln:.1f} s")
    print(f"same plan and report (method, bits, tokens of every unit): {same_plan}; fallbacks "
          f"{len(r1['fallbacks'])} / {len(rn['fallbacks'])}; routed tokens per expert equal in "
          f"{sum(r1['expert_tokens'][b] == rn['expert_tokens'][b] for b in r1['expert_tokens'])} of "
          f"{len(r1['expert_tokens'])} blocks")
    print(f"codes differing: {differing} of {total} ({100 * differing / total:.4f}%); max |logit difference| "
          f"{diff:.2e}")
    print(f"KL(fp || quantized) on {args.eval_windows} {args.eval} windows: 1 rank {kl1:.6f}, {n} ranks {kln:.6f}")


if __name__ == "__main__":
    main()
