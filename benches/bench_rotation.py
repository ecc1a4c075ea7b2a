"""Residual-stream rotation (``--rotate``, quant/rotate.py) measured on the embedded models.

Every setting quantizes the whole model uniformly (GPTQ, g128 symmetric) on the same 64
calibration windows, with and without the rotation, clip none and hmse, and is scored on the
same test windows against the unrotated full-precision model: KL(full precision || quantized)
per token (mean) and perplexity. The first line checks the rotated full-precision model
itself (KL ~ 0: the rotation changes no output) and gives the mean max/rms of the g128 groups
of the linears reading the residual stream, before and after rotating (what rotation is meant
to lower: outliers within a group). With several ``--rotate-seeds`` the rotated KL is the mean
over seeds and its range is shown.

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


def group_peak(model: torch.nn.Module, hidden: int, group: int) -> float:
    """Mean over the g-groups of every linear reading the residual (in = hidden) of max|w| / rms(w)."""
    from quantmoe.anatomy import per_expert_view

    peaks = []
    with per_expert_view(model):
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features == hidden:
                w = module.weight.detach().float().reshape(module.out_features, -1, group)
                peaks.append((w.abs().amax(-1) / w.square().mean(-1).sqrt().clamp_min(1e-12)).flatten())
    return torch.cat(peaks).mean().item()


def run_model(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    fp, tok = load_model(name, dtype=getattr(torch, args.dtype))
    windows = make_windows(split_tokens("test", tok), 256, args.eval_windows)
    ref = reference_logprobs(fp, windows)
    calib = CalibrationConfig(num_windows=args.calib_windows)
    hidden = fp.config.hidden_size
    rotated = {}
    for seed in args.rotate_seeds:
        rotated[seed] = copy.deepcopy(fp)
        rotate_model(rotated[seed], seed=seed)  # seed 0 is what GPTQConfig(rotate=True) does
    check = evaluate(rotated[args.rotate_seeds[0]], windows, ref)
    peak, peak_rot = group_peak(fp, hidden, args.group_size), group_peak(rotated[args.rotate_seeds[0]], hidden,
                                                                        args.group_size)
    print(f"\n{name} ({args.dtype}), GPTQ g{args.group_size} sym, {args.calib_windows} calibration windows, KL on "
          f"{len(windows)} test windows of 256 tokens, rotation seeds {args.rotate_seeds}; rotated full precision: "
          f"KL {check.kl_mean:.2e}, ppl {check.ppl:.3f}; residual readers' group max/rms {peak:.2f} -> "
          f"{peak_rot:.2f}", flush=True)
    print(f"{'bits':>4} {'clip':>5} {'KL':>8} {'KL rot':>8} {'rot range':>17} {'rot/no':>7} {'ppl':>8} "
          f"{'ppl rot':>8} {'time s':>7}")
    for bits in args.bits:
        for clip in args.clip:
            plan = Plan.uniform(bits, group_size=args.group_size, symmetric=True, clip=clip)
            t0 = time.perf_counter()
            results = []
            for source in [fp, *rotated.values()]:
                model = copy.deepcopy(source)
                api.quantize(model, tok, plan, calib, GPTQConfig(), progress=False)
                dequantize_in_place(model)
                results.append(evaluate(model, windows, ref))
                del model
            base, rot = results[0], results[1:]
            kl = sum(r.kl_mean for r in rot) / len(rot)
            ppl = sum(r.ppl for r in rot) / len(rot)
            span = f"{min(r.kl_mean for r in rot):.4f}-{max(r.kl_mean for r in rot):.4f}"
            print(f"{bits:>4} {clip:>5} {base.kl_mean:>8.4f} {kl:>8.4f} {span:>17} {kl / base.kl_mean:>7.3f} "
                  f"{base.ppl:>8.2f} {ppl:>8.2f} {time.perf_counter() - t0:>7.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["mixtral-s", "deepseek-s"])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--clip", nargs="+", default=["none", "hmse"], choices=("none", "mse", "hmse"))
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--rotate-seeds", type=int, nargs="+", default=[0], help="seeds of Q (0: what --rotate uses)")
    args = ap.parse_args()
    print("command:", " ".join(sys.argv), flush=True)
    for name in args.model:
        run_model(name, args)


if __name__ == "__main__":
    main()
