"""Quality at equal *effective* bits: the solver over a menu of quantizer choices vs uniform GPTQ.

The solver picks, per linear (or per block's routed experts with ``--granularity block``),
one choice of the menu (width x group size x grid x clipping) so that the effective bits
(codes + each group's 16-bit scale and zero point) meet the target; its damage table is
measured on calibration windows (``--damage-windows``). Every plan, the solver's and the
uniform references', is quantized with GPTQ on the same calibration windows and scored on
the same test windows: mean per-token KL(full precision || quantized) and perplexity.

The goal it tracks: at 3.0 effective bits, the KL of uniform 4-bit g128 (about 4.16
effective bits on the embedded models).

    .venv/bin/python benches/bench_effective_budget.py --model mixtral-s --targets 2.5 3.0 3.5
    .venv/bin/python benches/bench_effective_budget.py --model deepseek-s --targets 3.0 --metric kfac \
        --act-order desc --refine 4 --damage-windows 64 --tune-steps 100    # the strongest settings measured so far
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from quantmoe import api
from quantmoe.alloc.damage import measure_damage
from quantmoe.alloc.menu import label, menu_product
from quantmoe.alloc.solver import SolverConfig, solve
from quantmoe.anatomy import describe
from quantmoe.atomic import atomic_write_text
from quantmoe.bench.runner import dequantize_in_place
from quantmoe.calib.data import CalibrationConfig, calibration_windows
from quantmoe.data import calibration_tokens, split_tokens
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.models import load_model
from quantmoe.quant.grid import CLIP_MODES
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan, bit_stats


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-s")
    ap.add_argument("--targets", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    ap.add_argument("--widths", default="2,3,4,8")
    ap.add_argument("--group-sizes", default="32,64,128,0", help="0 = per-channel")
    ap.add_argument("--grids", default="sym,asym")
    ap.add_argument("--clips", default="hmse")
    ap.add_argument("--metric", default="fisher", choices=("fisher", "output", "kfac"))
    ap.add_argument("--granularity", default="linear", choices=("linear", "expert", "block"))
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--damage-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--act-order", default="none", choices=("none", "desc", "gar"),
                    help="GPTQ act-order of every plan but the reference (uniform 4-bit g128 stays plain)")
    ap.add_argument("--refine", type=int, default=0,
                    help="GPTQ refinement sweeps of every plan but the reference, and of the damage measurement")
    ap.add_argument("--tune-steps", type=int, default=0,
                    help="block-output scale tuning steps of every plan but the reference (not of the damage table)")
    ap.add_argument("--tune-lr", type=float, default=0.005)
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    args = ap.parse_args()
    print("command:", " ".join(sys.argv), flush=True)
    clips = args.clips.split(",")
    if bad := [c for c in clips if c not in CLIP_MODES]:
        ap.error(f"--clips: {bad[0]!r} is not one of {', '.join(CLIP_MODES)}")
    menu = menu_product(_ints(args.widths), [g or None for g in _ints(args.group_sizes)],
                        [g == "sym" for g in args.grids.split(",")], clips)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    fp, tok = load_model(args.model)
    anatomy = describe(fp)
    windows = make_windows(split_tokens("test", tok), 256, args.eval_windows)
    ref = reference_logprobs(fp, windows)
    calib = CalibrationConfig(num_windows=args.calib_windows)

    def run(plan: Plan, act_order: str = args.act_order, refine: int = args.refine,
            tune: int = args.tune_steps) -> tuple[float, float, float, float]:
        model = copy.deepcopy(fp)
        api.quantize(model, tok, plan, calib, GPTQConfig(act_order=act_order, refine=refine, tune_steps=tune,
                                                         tune_lr=args.tune_lr), progress=False)
        dequantize_in_place(model)
        res = evaluate(model, windows, ref)
        stats = bit_stats(plan.resolve(anatomy), anatomy.units)
        return stats.effective_bits, stats.average_bits, res.kl_mean, res.ppl

    lines = [f"# {args.model}: solver at equal effective bits vs uniform GPTQ", "",
             f"KL = mean per-token KL(full precision || quantized) on {len(windows)} test windows of 256 tokens; "
             f"GPTQ calibrated on {args.calib_windows} windows; solver damage ({args.metric}) on "
             f"{args.damage_windows} windows, granularity {args.granularity}, menu of {len(menu)} choices "
             f"(widths {args.widths}, groups {args.group_sizes}, grids {args.grids}, clips {args.clips}); "
             f"act-order {args.act_order}, refine {args.refine}, block tuning {args.tune_steps} steps (the uniform "
             f"4-bit g128 reference: plain GPTQ, act-order none, refine 0, no tuning).", "",
             "| plan | eff. bits | avg bits | KL | ppl | KL / uniform 4-bit g128 |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    reference = None
    for name, plan in (("uniform 4-bit g128", Plan.uniform(4)), ("uniform 4-bit g128 hmse", Plan.uniform(4, clip="hmse")),
                       ("uniform 3-bit g128 hmse", Plan.uniform(3, clip="hmse"))):
        eff, avg, kl, ppl = (run(plan, "none", 0, 0) if reference is None else run(plan))
        reference = reference or kl
        lines.append(f"| {name} | {eff:.3f} | {avg:.3f} | {kl:.4f} | {ppl:.2f} | {kl / reference:.2f}x |")
        print(lines[-1], flush=True)
    t0 = time.perf_counter()
    damage = measure_damage(copy.deepcopy(fp), anatomy, calibration_windows(
        calibration_tokens("calibration", tok), args.damage_windows, 256, 0), (), metric=args.metric, menu=menu,
        act_order=args.act_order, refine=args.refine)
    print(f"damage table: {len(menu)} choices x {len(anatomy.units)} linears in {time.perf_counter() - t0:.0f} s",
          flush=True)
    for target in args.targets:
        sol = solve(anatomy, damage, SolverConfig(target_bits=target, menu=menu, granularity=args.granularity))
        used: dict[str, int] = {}
        for unit in anatomy.units:
            key = label(sol.specs[unit.name])
            used[key] = used.get(key, 0) + unit.numel
        top = ", ".join(f"{k} {v / sum(used.values()):.0%}" for k, v in sorted(used.items(), key=lambda kv: -kv[1])[:4])
        eff, avg, kl, ppl = run(sol.plan)
        lines.append(f"| solver @ {target} effective ({top}) | {eff:.3f} | {avg:.3f} | {kl:.4f} | {ppl:.2f} | "
                     f"{kl / reference:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
