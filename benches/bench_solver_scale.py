"""The budget solver at DeepSeek-V3 scale: about 45,000 linears, on the meta device.

The model is built from its config's shapes on the meta device (no weights, as `quantmoe plan
mixtral-8x7b` does); measured damage is replaced by synthetic values with the usual shape
(damage falls about 4x per extra bit, scales with the linear's size, varies per linear). Prints
the problem size, the time to build and solve it, the status (optimal, or time limit with its
gap) and the average bits reached, per granularity.

    python benches/bench_solver_scale.py [--target 2.5] [--widths 2,3,4] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np


def synthetic_table(anatomy, widths: tuple[int, ...], seed: int = 0):
    from quantmoe.alloc.damage import DamageTable

    rng = np.random.default_rng(seed)
    params = np.array([u.numel for u in anatomy.units], dtype=np.float64)
    sensitivity = rng.lognormal(0.0, 1.0, len(params)) * params  # (units,)
    damage = sensitivity[:, None] * 4.0 ** (-np.array(widths, dtype=np.float64))[None, :]  # (units, widths)
    return DamageTable(tuple(u.name for u in anatomy.units), widths, damage, params, "synthetic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=2.5)
    ap.add_argument("--widths", default="2,3,4")
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--granularity", nargs="+", default=["linear", "expert", "block"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoConfig

    from quantmoe.alloc.solver import SolverConfig, solve
    from quantmoe.anatomy import describe_config

    widths = tuple(int(w) for w in args.widths.split(","))
    t0 = time.perf_counter()
    anatomy = describe_config(AutoConfig.for_model("deepseek_v3"))  # DeepSeek-V3's shapes are the defaults
    t_describe = time.perf_counter() - t0
    table = synthetic_table(anatomy, widths)
    params = sum(u.numel for u in anatomy.units)
    print(f"DeepSeek-V3 shapes (meta device, {t_describe:.1f} s to describe): {len(anatomy.units):,} linears, "
          f"{params / 1e9:.1f}B quantizable weights; widths {widths}, target {args.target} bits")
    for granularity in args.granularity:
        config = SolverConfig(budget="average", target_bits=args.target, widths=widths, granularity=granularity,
                              time_limit=args.time_limit)
        t0 = time.perf_counter()
        sol = solve(anatomy, table, config)
        seconds = time.perf_counter() - t0
        print(f"  {granularity:<7} {sol.groups:>6,} groups x {len(widths)} widths = {sol.groups * len(widths):>7,} "
              f"binaries: {seconds:6.1f} s, {sol.status}, {sol.average_bits:.4f} average bits")
    if "linear" in args.granularity:  # the sparse exact program alone, as when the greedy is not enough
        from quantmoe.alloc import solver as solver_module

        damage = table.damage / table.damage.max()
        spend = table.params[:, None] * np.array(widths, dtype=np.float64)[None, :] / table.params.sum()
        t0 = time.perf_counter()
        res = solver_module._milp(damage, spend, np.ones(damage.shape, dtype=bool), args.target - 0.01, args.target,
                                  args.time_limit)
        seconds = time.perf_counter() - t0
        status = "optimal" if res.status == 0 else f"status {res.status} ({res.message})"
        gap = "" if res.mip_gap is None else f", gap {100 * res.mip_gap:.3f}%"
        print(f"  linear, sparse MILP alone (HiGHS, time limit {args.time_limit:g} s): {seconds:.1f} s, {status}{gap}")


if __name__ == "__main__":
    main()
