"""How additive is the solver's damage model? Predicted (sum of single-unit damages) vs measured KL.

The solver assumes the damage of a plan is the sum of what each unit costs when quantized
alone on the full-precision model. This bench draws a spread of plans — uniform ones, the
solver's at several effective budgets, and random mixes of the menu — quantizes each with
GPTQ (the real, sequential pipeline: later blocks see earlier blocks quantized), measures the
mean per-token KL to full precision on test windows, and reports the Pearson correlation
(raw and of logs) and Spearman rank correlation between predicted damage and measured KL,
with a scatter plot.

    .venv/bin/python benches/bench_damage_additivity.py --model mixtral-s --plot docs/results/additivity-mixtral-s.png
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from quantmoe import api
from quantmoe.alloc.damage import measure_damage
from quantmoe.alloc.menu import label, menu_product
from quantmoe.alloc.solver import SolverConfig, plan_of_specs, solve
from quantmoe.anatomy import describe
from quantmoe.bench.runner import dequantize_in_place
from quantmoe.calib.data import CalibrationConfig, calibration_windows
from quantmoe.data import calibration_tokens, split_tokens
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.models import load_model
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import bit_stats


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-s")
    ap.add_argument("--metric", default="fisher", choices=("fisher", "output", "kfac"))
    ap.add_argument("--random-plans", type=int, default=12)
    ap.add_argument("--targets", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--damage-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write the scatter plot (PNG) here")
    args = ap.parse_args()
    print("command:", " ".join(sys.argv), flush=True)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    fp, tok = load_model(args.model)
    anatomy = describe(fp)
    windows = make_windows(split_tokens("test", tok), 256, args.eval_windows)
    ref = reference_logprobs(fp, windows)
    calib = CalibrationConfig(num_windows=args.calib_windows)
    menu = menu_product((2, 3, 4), (128, None), (True, False), ("hmse",))
    damage = measure_damage(copy.deepcopy(fp), anatomy, calibration_windows(
        calibration_tokens("calibration", tok), args.damage_windows, 256, 0), (), metric=args.metric, menu=menu)
    row = {n: i for i, n in enumerate(damage.units)}
    unit_of = {u.name: u for u in anatomy.units}
    rng = np.random.default_rng(args.seed)
    plans: list[tuple[str, dict]] = [(f"uniform {label(s)}", {u.name: s for u in anatomy.units}) for s in menu[::2]]
    for target in args.targets:
        sol = solve(anatomy, damage, SolverConfig(target_bits=target, menu=menu))
        plans.append((f"solver {target}", dict(sol.specs)))
    for i in range(args.random_plans):  # random mixes, from mostly narrow to mostly wide
        p = rng.dirichlet(np.ones(len(menu)) * 0.5)
        plans.append((f"random {i}", {u.name: menu[rng.choice(len(menu), p=p)] for u in anatomy.units}))
    print(f"{'plan':<26} {'eff.bits':>8} {'predicted':>10} {'KL':>8}", flush=True)
    predicted, measured = [], []
    for name, specs in plans:
        pred = float(sum(damage.damage[row[n], menu.index(s)] for n, s in specs.items()))
        plan = plan_of_specs(specs, unit_of)
        model = copy.deepcopy(fp)
        api.quantize(model, tok, plan, calib, GPTQConfig(), progress=False)
        dequantize_in_place(model)
        kl = evaluate(model, windows, ref).kl_mean
        eff = bit_stats(plan.resolve(anatomy), anatomy.units).effective_bits
        predicted.append(pred)
        measured.append(kl)
        print(f"{name:<26} {eff:>8.3f} {pred:>10.4g} {kl:>8.4f}", flush=True)
        del model
    x, y = np.array(predicted), np.array(measured)
    pearson = float(np.corrcoef(x, y)[0, 1])
    log_pearson = float(np.corrcoef(np.log(x), np.log(y))[0, 1])
    spearman = float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])
    slope = np.polyfit(np.log(x), np.log(y), 1)[0]
    print(f"{len(plans)} plans, damage metric {args.metric}: Pearson {pearson:.3f}, Pearson of logs "
          f"{log_pearson:.3f}, Spearman {spearman:.3f}, log-log slope {slope:.2f} (1 = proportional). "
          f"Wall time {time.perf_counter() - t_start:.0f} s.", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        kinds = {"uniform": "s", "solver": "*", "random": "o"}
        for kind, marker in kinds.items():
            idx = [i for i, (n, _) in enumerate(plans) if n.startswith(kind)]
            ax.scatter(x[idx], y[idx], marker=marker, label=kind, s=60 if marker == "*" else 30)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted damage (sum over units, {args.metric})")
        ax.set_ylabel("measured KL per token")
        ax.set_title(f"{args.model}: Spearman {spearman:.2f}, log Pearson {log_pearson:.2f}")
        ax.legend()
        fig.tight_layout()
        out = Path(args.plot)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)


if __name__ == "__main__":
    main()
