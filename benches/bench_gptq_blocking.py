"""GPTQ's column loop: the rest of a block updated per run of SUB_BLOCK columns by one matmul
(quantmoe's default) vs column by column (the reference GPTQ loop), on expert-shaped batches.

Prints, per shape and width: the best of ``--repeats`` wall times of each, their ratio, and
how many codes float rounding moved between the two (the math is the same).

    .venv/bin/python benches/bench_gptq_blocking.py
    .venv/bin/python benches/bench_gptq_blocking.py --experts 32 --out-features 1024 --in-features 256 512 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

import quantmoe.quant.gptq as gptq_module
from quantmoe.quant.gptq import gptq_quantize_batched
from quantmoe.quant.grid import QuantSpec


def best_time(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, repeats: int) -> tuple[float, list]:
    best, result = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = gptq_quantize_batched(W, H, spec)
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=16, help="experts in one batched GPTQ call")
    ap.add_argument("--out-features", type=int, default=1024)
    ap.add_argument("--in-features", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default = gptq_module.SUB_BLOCK
    print(f"{args.experts} experts per call, out {args.out_features}, g{args.group_size}, {args.threads} threads, "
          f"best of {args.repeats}; SUB_BLOCK {default} vs column by column")
    print(f"{'in':>5} {'bits':>4} {'sub-block s':>11} {'by column s':>11} {'speed-up':>8} {'codes moved':>11}")
    g = torch.Generator().manual_seed(0)
    for n in args.in_features:
        X = torch.randn(args.experts, 2048, n, generator=g)
        H = 2 / 2048 * X.transpose(1, 2) @ X  # (E, in, in)
        W = torch.randn(args.experts, args.out_features, n, generator=g)
        for bits in args.bits:
            spec = QuantSpec(bits, args.group_size, True)
            try:
                gptq_module.SUB_BLOCK = default
                fast, a = best_time(W, H, spec, args.repeats)
                gptq_module.SUB_BLOCK = 10**9
                slow, b = best_time(W, H, spec, args.repeats)
            finally:
                gptq_module.SUB_BLOCK = default
            moved = sum(int((x.qweight != y.qweight).sum()) for x, y in zip(a, b))
            print(f"{n:>5} {bits:>4} {fast:>11.3f} {slow:>11.3f} {slow / fast:>7.2f}x {moved:>11}", flush=True)


if __name__ == "__main__":
    main()
