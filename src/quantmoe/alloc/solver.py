"""Budget solver: the widths that minimize measured damage at a target average bit width.

Problem (a multiple-choice knapsack, solved exactly as a mixed-integer program with
``scipy.optimize.milp``): choose one width b_g for every group g of units so that

    minimize   sum_g damage(g, b_g)
    subject to (target - tolerance) * P  <=  sum_g b_g * params(g)  <=  target * P

where P is the number of quantizable parameters (the paper's average bits). A group is a
single linear, one expert (its gate/up/down move together) or all routed experts of a
block ("serving-compatible": serving engines want one format for all the experts of a
layer; with it, the linears engines fuse, q/k/v and a shared expert's gate/up, also share a
width, so the plan passes `quantmoe export --target vllm`'s layout checks). Widths can be restricted per role (e.g. attention at least 4 bits).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from quantmoe.alloc.damage import DamageTable
from quantmoe.anatomy import ModelAnatomy
from quantmoe.quant.grid import SUPPORTED_BITS
from quantmoe.quant.plan import Plan

log = logging.getLogger(__name__)

GRANULARITIES = ("linear", "expert", "block")


@dataclass(frozen=True)
class SolverConfig:
    target_bits: float
    widths: tuple[int, ...] = (2, 3, 4)
    granularity: str = "linear"  # of routed experts; other units are always single linears
    tolerance: float = 0.01
    role_min_bits: Mapping[str, int] | None = None
    role_max_bits: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"check `granularity`: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.widths:
            raise ValueError("check `widths`: give at least one bit width")
        if not 0 < self.tolerance < 1:
            raise ValueError("check `tolerance`: it must be in (0, 1) bits")
        bad = [w for w in self.widths if w not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"check `widths`: {bad[0]} bits is not one of {', '.join(map(str, SUPPORTED_BITS))}")
        if not min(self.widths) <= self.target_bits <= max(self.widths):
            raise ValueError(f"impossible budget: check `target_bits`: {self.target_bits} is outside "
                             f"[{min(self.widths)}, {max(self.widths)}], the range of the allowed widths "
                             f"{', '.join(map(str, sorted(self.widths)))}")


@dataclass(frozen=True)
class Solution:
    plan: Plan
    bits: Mapping[str, int]  # unit -> width
    average_bits: float
    damage: float
    groups: int


def _groups(anatomy: ModelAnatomy, granularity: str) -> list[list[str]]:
    from quantmoe.export.engines import FUSED_KINDS

    groups: dict[tuple, list[str]] = {}
    for u in anatomy.units:
        fused = next((kinds for kinds in FUSED_KINDS if u.kind in kinds), None)
        if u.role == "routed_expert" and granularity == "expert":
            key = ("expert", u.block, u.expert)
        elif u.role == "routed_expert" and granularity == "block":
            key = ("block", u.block)
        elif granularity == "block" and fused is not None:  # linears engines fuse (q/k/v, gate/up) share a width
            key = ("fused", u.name.rsplit(".", 1)[0], fused)
        else:
            key = ("linear", u.name)
        groups.setdefault(key, []).append(u.name)
    return list(groups.values())


def solve(anatomy: ModelAnatomy, table: DamageTable, config: SolverConfig, group_size: int | None = 128,
          symmetric: bool = True) -> Solution:
    widths = tuple(sorted(config.widths))
    missing = [w for w in widths if w not in table.widths]
    if missing:
        raise ValueError(f"check `widths`: the damage table has no column for {missing} bits; measure them first")
    col = [table.widths.index(w) for w in widths]
    row = {n: i for i, n in enumerate(table.units)}
    unit_of = {u.name: u for u in anatomy.units}
    groups = _groups(anatomy, config.granularity)
    n_g, n_w = len(groups), len(widths)
    cost = np.zeros((n_g, n_w))
    params = np.zeros(n_g)
    allowed = np.ones((n_g, n_w), dtype=bool)
    for g, names in enumerate(groups):
        for n in names:
            cost[g] += table.damage[row[n], col]
            params[g] += table.params[row[n]]
        role = unit_of[names[0]].role
        lo = (config.role_min_bits or {}).get(role, 0)
        hi = (config.role_max_bits or {}).get(role, 99)
        allowed[g] = [lo <= w <= hi for w in widths]
        if not allowed[g].any():
            raise ValueError(f"check the min/max bits of role {role!r}: no width in {widths} is allowed")
    total = params.sum()
    w_arr = np.array(widths, dtype=float)
    lowest = sum(params[g] * w_arr[allowed[g]].min() for g in range(n_g)) / total
    highest = sum(params[g] * w_arr[allowed[g]].max() for g in range(n_g)) / total
    if not lowest - 1e-9 <= config.target_bits <= highest + 1e-9:
        raise ValueError(f"impossible budget: {config.target_bits} bits is outside [{lowest:.3f}, {highest:.3f}], "
                         f"what widths {widths} with these role limits can reach")
    # x[g, w] binary, flattened row-major
    c = cost.reshape(-1) / max(cost.max(), 1e-30)  # scale for numerical comfort; argmin unchanged
    one_hot = np.zeros((n_g, n_g * n_w))
    for g in range(n_g):
        one_hot[g, g * n_w:(g + 1) * n_w] = 1
    budget_row = (params[:, None] * w_arr[None, :]).reshape(1, -1) / total
    constraints = [LinearConstraint(one_hot, 1, 1),
                   LinearConstraint(budget_row, config.target_bits - config.tolerance, config.target_bits)]
    upper = allowed.reshape(-1).astype(float)
    res = milp(c, constraints=constraints, integrality=np.ones_like(c), bounds=Bounds(0, upper),
               options={"time_limit": 120})
    if res.x is None:
        raise ValueError(f"no allocation reaches {config.target_bits} bits within {config.tolerance}: "
                         f"widen `tolerance`, allow more widths, or relax the role limits ({res.message})")
    choice = np.asarray(res.x).reshape(n_g, n_w).argmax(axis=1)
    bits = {n: widths[choice[g]] for g, names in enumerate(groups) for n in names}
    avg = float(sum(params[g] * widths[choice[g]] for g in range(n_g)) / total)
    damage = float(sum(cost[g, choice[g]] for g in range(n_g)))
    plan = Plan.from_dict({"default": {"bits": widths[0], "group_size": group_size, "symmetric": symmetric},
                           "modules": {n: {"bits": b} for n, b in bits.items()}})
    log.info("solver: %.4f average bits (target %.3f), estimated damage %.4g over %d groups",
             avg, config.target_bits, damage, n_g)
    return Solution(plan=plan, bits=bits, average_bits=avg, damage=damage, groups=n_g)
