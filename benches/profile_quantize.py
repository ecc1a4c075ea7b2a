"""Where quantmoe's quantization time goes: CPU seconds per stage of the block-by-block driver.

Times (``time.process_time``: robust to other work on the machine at 1 thread) the driver's
three kinds of work, summed over blocks: the calibration pass of each stage (``calib <kinds>``),
GPTQ and packing of each stage (``gptq <kinds>``), and the final pass of each block whose
outputs feed the next one. Run:

    .venv/bin/python benches/profile_quantize.py [--model deepseek-s] [--bits 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import torch

import quantmoe.quant.pipeline as pipeline
from quantmoe import api
from quantmoe.calib.data import CalibrationConfig
from quantmoe.models import load_model
from quantmoe.quant.plan import Plan


def _timed(totals: dict[str, float], label, fn):
    def wrapper(*args, **kwargs):
        t0 = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label(args)] += time.process_time() - t0
    return wrapper


def _kinds(units) -> str:
    return "/".join(sorted({u.kind for u in units}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-s")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    totals: dict[str, float] = collections.defaultdict(float)
    pipeline._calibrate_block = _timed(totals, lambda a: "calib " + _kinds(a[2].units), pipeline._calibrate_block)
    pipeline._quantize_units = _timed(totals, lambda a: "gptq " + _kinds(a[1]), pipeline._quantize_units)
    pipeline._run_block = _timed(totals, lambda a: "final pass", pipeline._run_block)
    model, tokenizer = load_model(args.model)
    plan = Plan.uniform(args.bits, group_size=args.group_size, symmetric=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    api.quantize(model, tokenizer, plan, CalibrationConfig(), pipeline.GPTQConfig(), progress=False)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"{args.model} {args.bits}-bit, {args.threads} thread(s): {cpu:.2f} CPU s, {wall:.2f} wall s "
          f"(1-min load {os.getloadavg()[0]:.1f})")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds:6.2f} s {100 * seconds / cpu:5.1f}%  {label}")
    print(f"  {cpu - sum(totals.values()):6.2f} s        other (block inputs, windows, reports)")


if __name__ == "__main__":
    main()
