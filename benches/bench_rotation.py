"""Residual-stream rotation (``--rotate``, quant/rotate.py) measured on the embedded models.

Every setting quantizes the whole model uniformly (GPTQ, g128 symmetric) on the same 64
calibration windows, with and without the rotation, clip none and hmse, and is scored on the
same test windows against the unrotated full-precision model: KL(full precision || quantized)
per token (mean) and perplexity. The first line checks the rotated full-precision model
itself (KL ~ 0: the rotation changes no output).

    .venv/bin/python benches/bench_rotation.py --model mixtral-s deepseek-s --bits 2 3 4
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from quantmoe import api
from quantmoe.bench.runner import dequantize_in_place
from quantmoe.calib.data import CalibrationConfig
from quantmoe.data import split_tokens
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.models import load_model
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan
from quantmoe.quant.rotate import rotate_model


def run_model(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    fp, tok = load_model(name, dtype=getattr(torch, args.dtype))
    windows = make_windows(split_tokens("test", tok), 256, args.eval_windows)
    ref = reference_logprobs(fp, windows)
    calib = CalibrationConfig(num_windows=args.calib_windows)
    rotated = copy.deepcopy(fp)
    rotate_model(rotated)
    check = evaluate(rotated, windows, ref)
    print(f"\n{name} ({args.dtype}), GPTQ g{args.group_size} sym, {args.calib_windows} calibration windows, KL on "
          f"{len(windows)} test windows of 256 tokens; rotated full precision: KL {check.kl_mean:.2e}, "
          f"ppl {check.ppl:.3f}", flush=True)
    print(f"{'bits':>4} {'clip':>5} {'KL':>8} {'KL rot':>8} {'rot/no':>7} {'ppl':>8} {'ppl rot':>8} {'time s':>7}")
    for bits in args.bits:
        for clip in args.clip:
            plan = Plan.uniform(bits, group_size=args.group_size, symmetric=True, clip=clip)
            row = []
            for rotate in (False, True):
                model = copy.deepcopy(fp)
                t0 = time.perf_counter()
                api.quantize(model, tok, plan, calib, GPTQConfig(rotate=rotate), progress=False)
                took = time.perf_counter() - t0
                dequantize_in_place(model)
                row.append((evaluate(model, windows, ref), took))
                del model
            (a, ta), (b, tb) = row
            print(f"{bits:>4} {clip:>5} {a.kl_mean:>8.4f} {b.kl_mean:>8.4f} {b.kl_mean / a.kl_mean:>7.3f} "
                  f"{a.ppl:>8.2f} {b.ppl:>8.2f} {ta + tb:>7.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["mixtral-s", "deepseek-s"])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--clip", nargs="+", default=["none", "hmse"], choices=("none", "mse", "hmse"))
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    print("command:", " ".join(sys.argv), flush=True)
    for name in args.model:
        run_model(name, args)


if __name__ == "__main__":
    main()
