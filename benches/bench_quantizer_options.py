"""Quantizer options measured on the embedded models: clipping (none / mse / hmse) and GPTQ act-order
(none / desc / gar) per width, and sweeps of coordinate descent on GPTQ's codes (`--refine`).

Every setting quantizes the whole model uniformly (GPTQ, the given group size) on the same
calibration windows and is scored on the same test windows: KL(full precision || quantized)
per token (mean) and perplexity. Effective bits are the same for every clip mode and act-order
of a width (they change only which codes, scales and zeros each group stores). `KL/first` is
relative to the width's first setting (clip none, act-order none by default).

    .venv/bin/python benches/bench_quantizer_options.py --model mixtral-s --bits 2 3 4 --eval-windows 32
    .venv/bin/python benches/bench_quantizer_options.py --model deepseek-s --clip none --act-order none desc gar
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time

import torch

from quantmoe import api
from quantmoe.anatomy import describe
from quantmoe.bench.runner import dequantize_in_place
from quantmoe.calib.data import CalibrationConfig
from quantmoe.data import split_tokens
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.models import load_model
from quantmoe.quant.gptq import ACT_ORDERS
from quantmoe.quant.grid import CLIP_MODES
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan, bit_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-s")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--clip", nargs="+", default=list(CLIP_MODES), choices=CLIP_MODES)
    ap.add_argument("--act-order", nargs="+", default=["none"], choices=ACT_ORDERS, help="GPTQ column orders")
    ap.add_argument("--refine", type=int, nargs="+", default=[0],
                    help="sweeps of coordinate descent on GPTQ's codes (0 = plain GPTQ)")
    ap.add_argument("--tune-steps", type=int, nargs="+", default=[0],
                    help="Adam steps of block-output scale tuning after GPTQ (0 = none)")
    ap.add_argument("--tune-lr", type=float, default=0.005)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    print("command:", " ".join(sys.argv), flush=True)
    torch.manual_seed(0)
    fp, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    anatomy = describe(fp)
    windows = make_windows(split_tokens("test", tok), 256, args.eval_windows)
    ref = reference_logprobs(fp, windows)
    calib = CalibrationConfig(num_windows=args.calib_windows)
    group = args.group_size or None
    print(f"{args.model} ({args.dtype}), GPTQ g{group or 'channel'} {'asym' if args.asym else 'sym'}, "
          f"{args.calib_windows} calibration windows, KL on {len(windows)} test windows of 256 tokens")
    print(f"{'bits':>4} {'clip':>5} {'act':>5} {'refine':>6} {'tune':>5} {'eff.bits':>8} {'KL':>8} {'ppl':>8} {'KL/first':>8} {'time s':>7}")
    for bits in args.bits:
        base_kl = None
        for clip, act_order, refine, tune in itertools.product(args.clip, args.act_order, args.refine,
                                                               args.tune_steps):
            plan = Plan.uniform(bits, group_size=group, symmetric=not args.asym, clip=clip)
            model = copy.deepcopy(fp)
            t0 = time.perf_counter()
            api.quantize(model, tok, plan, calib, GPTQConfig(act_order=act_order, refine=refine, tune_steps=tune,
                                                                     tune_lr=args.tune_lr), progress=False)
            took = time.perf_counter() - t0
            dequantize_in_place(model)
            res = evaluate(model, windows, ref)
            eff = bit_stats(plan.resolve(anatomy), anatomy.units).effective_bits
            base_kl = res.kl_mean if base_kl is None else base_kl
            ratio = f"{res.kl_mean / base_kl:.3f}" if base_kl else "-"
            print(f"{bits:>4} {clip:>5} {act_order:>5} {refine:>6} {tune:>5} {eff:>8.3f} {res.kl_mean:>8.4f} {res.ppl:>8.2f} {ratio:>8} "
                  f"{took:>7.1f}", flush=True)
            del model


if __name__ == "__main__":
    main()
