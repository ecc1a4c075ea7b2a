"""Quantization speed of quantmoe on the embedded models: experts looped vs batched.

Prints, for each model: whole-model GPTQ wall time with the experts of a block quantized
one at a time (looped) and as one batch (batched), the time spent per block, peak RSS, and
the perplexity/KL of both results (they must agree). Run:

    .venv/bin/python benches/bench_quantize.py [--models mixtral-s deepseek-s] [--bits 4]
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time

import torch

from quantmoe import api
from quantmoe.calib.data import CalibrationConfig
from quantmoe.data import split_tokens
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.models import load_model
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-s", "deepseek-s"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command:", " ".join(sys.argv), f"(torch threads {torch.get_num_threads()})")
    calib = CalibrationConfig(num_windows=args.windows)
    plan = Plan.uniform(args.bits, group_size=args.group_size)
    rows = []
    for name in args.models:
        fp, tok = load_model(name)
        windows = make_windows(split_tokens("test", tok), 256)
        ref = reference_logprobs(fp, windows)
        for label, batched in (("looped", False), ("batched", True)):
            model = copy.deepcopy(fp)
            t0 = time.perf_counter()
            result = api.quantize(model, tok, plan, calib, GPTQConfig(batch_experts=batched), progress=False)
            wall = time.perf_counter() - t0
            res = evaluate(model, windows, ref)
            blocks = " ".join(f"{s:.1f}" for s in result.report.block_seconds)
            rows.append((name, label, wall, blocks, res.ppl, res.kl_mean))
            print(f"{name} {label}: {wall:.1f} s (blocks: {blocks}) ppl {res.ppl:.3f} KL {res.kl_mean:.5f}",
                  flush=True)
    print(f"\n{'model':<11} {'experts':<8} {'wall s':>7} {'ppl':>8} {'KL':>8}   per-block s")
    for name, label, wall, blocks, ppl, kl in rows:
        print(f"{name:<11} {label:<8} {wall:>7.1f} {ppl:>8.3f} {kl:>8.5f}   {blocks}")
    for name in args.models:
        loop, batch = [r[2] for r in rows if r[0] == name]
        print(f"{name}: batched is {loop / batch:.2f}x faster than looped")
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
