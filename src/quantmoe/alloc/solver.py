"""Budget solver: the settings that minimize measured damage at a target bit budget.

Problem (a multiple-choice knapsack, solved exactly as a mixed-integer program with
``scipy.optimize.milp``): choose one choice c_g for every group g of units so that

    minimize   sum_g damage(g, c_g)
    subject to (target - tolerance) * P  <=  sum_g bits(g, c_g)  <=  target * P

where P is the number of quantizable parameters. A choice is a width (``widths``, at the
base group size, grid and clipping) or any full setting of a menu (``menu``: bits, group
size, symmetric, clip; see ``quantmoe.alloc.menu``). ``budget`` says what bits count:
``effective`` (default) counts every stored bit, the codes plus each group's 16-bit scale and
its zero point (``quant.plan.effective_bits_of``), so a finer group size is paid for;
``average`` counts the codes only (the paper's average bits). A group is a
single linear, one expert (its gate/up/down move together) or all routed experts of a
block ("serving-compatible": serving engines want one format for all the experts of a
layer; with it, the linears engines fuse, q/k/v and a shared expert's gate/up, also share a
width, so the plan passes `quantmoe export --target vllm`'s layout checks). Widths can be
restricted per role (e.g. attention at least 4 bits).

The one-width-per-group constraints are a sparse (groups x groups*widths) matrix with one
block of ones per row, so a DeepSeek-V3-shaped problem (about 45,000 linears) builds in
megabytes (benches/bench_solver_scale.py). The solver stops at ``time_limit`` seconds: the
solution then says ``time limit, gap X%`` (X = HiGHS's relative gap between the plan found
and the best lower bound) and keeps the best plan found; without any plan by then it is an
error that says to raise the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from quantmoe.alloc.damage import DamageTable
from quantmoe.anatomy import QUANTIZABLE_ROLES, ModelAnatomy
from quantmoe.quant.grid import SUPPORTED_BITS, QuantSpec
from quantmoe.quant.plan import Plan, effective_bits_of
from quantmoe.suggest import did_you_mean

log = logging.getLogger(__name__)

GRANULARITIES = ("linear", "expert", "block")
BUDGETS = ("effective", "average")
MIP_REL_GAP = 1e-4  # a plan this close (relative) to the lower bound counts as optimal (HiGHS's default)


@dataclass(frozen=True)
class SolverConfig:
    target_bits: float
    widths: tuple[int, ...] = (2, 3, 4)
    granularity: str = "linear"  # of routed experts; other units are always single linears
    tolerance: float = 0.01
    role_min_bits: Mapping[str, int] | None = None
    role_max_bits: Mapping[str, int] | None = None
    time_limit: float = 120.0  # seconds; then the best plan found so far, with its optimality gap
    menu: tuple[QuantSpec, ...] = ()  # full settings per choice; empty: `widths` at the base settings
    budget: str = "effective"  # "effective" (codes, scales and zeros) or "average" (codes: the paper's)

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            hint = did_you_mean(str(self.budget), BUDGETS)
            raise ValueError(f"check `budget`: {self.budget!r} is not one of {', '.join(BUDGETS)}"
                             f"{'; ' + hint if hint else ''}")
        if self.menu:
            object.__setattr__(self, "widths", tuple(sorted({s.bits for s in self.menu})))
        if not self.time_limit > 0:
            raise ValueError(f"check `time_limit`: {self.time_limit} must be a positive number of seconds")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"check `granularity`: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not self.widths:
            raise ValueError("check `widths`: give at least one bit width")
        if not 0 < self.tolerance < 1:
            raise ValueError("check `tolerance`: it must be in (0, 1) bits")
        for key in ("role_min_bits", "role_max_bits"):
            for role in getattr(self, key) or {}:
                if role not in QUANTIZABLE_ROLES:
                    hint = did_you_mean(role, QUANTIZABLE_ROLES)
                    raise ValueError(f"check `{key}`: unknown role {role!r}; {hint + ' ' if hint else ''}"
                                     f"roles: {', '.join(QUANTIZABLE_ROLES)}")
        bad = [w for w in self.widths if w not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"check `widths`: {bad[0]} bits is not one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.budget == "effective" and self.target_bits < min(self.widths):  # scales and zeros only add bits
            raise ValueError(f"impossible budget: check `target_bits`: {self.target_bits} effective bits is below "
                             f"{min(self.widths)}, the narrowest allowed width (scales and zero points add to it)")
        if self.budget == "average" and not min(self.widths) <= self.target_bits <= max(self.widths):
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
    optimal: bool = True  # False: stopped by the time limit, `gap` away from the proven optimum at most
    gap: float | None = None  # HiGHS's relative MIP gap of the plan (optimal: within its 1e-4 tolerance)
    effective_bits: float = float("nan")  # codes, scales and zero points per weight
    specs: Mapping[str, QuantSpec] | None = None  # unit -> full settings

    @property
    def status(self) -> str:
        if self.optimal:
            return "optimal"
        return "time limit, gap " + ("unknown" if self.gap is None else f"{100 * self.gap:.2f}%")


def _groups(anatomy: ModelAnatomy, granularity: str) -> list[list[str]]:
    from quantmoe.export.engines import FUSED_KINDS

    groups: dict[tuple, list[str]] = {}
    for u in anatomy.units:
        fused = next((k for k in FUSED_KINDS if u.kind in k), None) if granularity == "block" else None
        if u.role == "routed_expert" and granularity == "expert":
            key = ("expert", u.block, u.expert)
        elif u.role == "routed_expert" and granularity == "block":
            key = ("block", u.block)
        elif fused is not None:  # with block granularity, linears engines fuse (q/k/v, gate/up) share a width
            key = ("fused", u.name.rsplit(".", 1)[0], fused)
        else:
            key = ("linear", u.name)
        groups.setdefault(key, []).append(u.name)
    return list(groups.values())


def _value(c: np.ndarray, choice: np.ndarray) -> float:
    return float(c[np.arange(len(choice)), choice].sum())


def _greedy(c: np.ndarray, spend: np.ndarray, allowed: np.ndarray,
            budget: float) -> tuple[np.ndarray | None, float]:
    """Greedy for the multiple-choice knapsack: (an integer choice spending <= budget, a lower bound).

    Start every group at its narrowest allowed width; the upgrades along each group's lower convex
    hull of (spend, cost), taken in order of damage saved per bit spent, give the LP relaxation's
    optimum (all upgrades that fit, then a fraction of the first that does not; Sinha & Zoltners
    1979): a lower bound on the optimum. The integer choice takes every upgrade that fits.
    """
    n_g = len(c)
    choice = np.array([np.flatnonzero(a)[0] for a in allowed])
    upgrades = []  # (cost per bit, group, step, from, to)
    for g in range(n_g):
        at, step = choice[g], 0
        while True:
            ahead = [j for j in np.flatnonzero(allowed[g]) if spend[g, j] > spend[g, at]]
            slopes = [(c[g, j] - c[g, at]) / (spend[g, j] - spend[g, at]) for j in ahead]
            if not slopes or min(slopes) >= 0:
                break
            j = ahead[int(np.argmin(slopes))]
            upgrades.append((min(slopes), g, step, at, j))
            at, step = j, step + 1
    upgrades.sort()
    used = float(spend[np.arange(n_g), choice].sum())
    if used > budget + 1e-12:
        return None, -np.inf
    value, bound, blocked = _value(c, choice), None, np.zeros(n_g, dtype=bool)
    for slope, g, _, a, b in upgrades:
        if blocked[g] or choice[g] != a:
            blocked[g] = True
            continue
        extra = spend[g, b] - spend[g, a]
        if used + extra <= budget + 1e-12:
            choice[g], used, value = b, used + extra, value + c[g, b] - c[g, a]
        else:
            if bound is None:  # the LP optimum takes this upgrade in part
                bound = value + slope * (budget - used)
            blocked[g] = True
    return choice, value if bound is None else min(bound, value)


def _milp(c: np.ndarray, spend: np.ndarray, allowed: np.ndarray, low: float, high: float, time_limit: float):
    """The exact program: x[g, w] binary (flattened row-major), one width per group, spend in [low, high]."""
    n_g, n_w = c.shape
    one_hot = sparse.kron(sparse.identity(n_g, format="csr"), np.ones((1, n_w)), format="csr")  # (groups, x)
    constraints = [LinearConstraint(one_hot, 1, 1), LinearConstraint(spend.reshape(1, -1), low, high)]
    return milp(c.reshape(-1), constraints=constraints, integrality=np.ones(c.size),
                bounds=Bounds(0, allowed.reshape(-1).astype(float)),
                options={"time_limit": time_limit, "mip_rel_gap": MIP_REL_GAP})


def solve(anatomy: ModelAnatomy, table: DamageTable, config: SolverConfig, group_size: int | None = 128,
          symmetric: bool = True, clip: str = "none") -> Solution:
    """The plan of least estimated damage within the budget. ``group_size``/``symmetric``/``clip`` are the
    base settings of a widths-only problem (and of the table's columns when it has no menu)."""
    base = QuantSpec(4, group_size, symmetric, clip)
    choices = config.menu or tuple(QuantSpec(w, group_size, symmetric, clip) for w in sorted(config.widths))
    columns = table.columns(base)
    missing = [s for s in choices if s not in columns]
    if missing:
        from quantmoe.alloc.menu import label

        raise ValueError(f"check `widths`/`menu`: the damage table has no column for {label(missing[0])}; "
                         "measure it first (the same menu for the damage table and the solver)")
    col = [columns.index(s) for s in choices]
    row = {n: i for i, n in enumerate(table.units)}
    unit_of = {u.name: u for u in anatomy.units}
    groups = _groups(anatomy, config.granularity)
    n_g, n_w = len(groups), len(choices)
    cost = np.zeros((n_g, n_w))
    bits_used = np.zeros((n_g, n_w))  # bits each choice stores for the group (codes, or codes + scales + zeros)
    params = np.zeros(n_g)
    allowed = np.ones((n_g, n_w), dtype=bool)
    for g, names in enumerate(groups):
        for n in names:
            unit = unit_of[n]
            cost[g] += table.damage[row[n], col]
            params[g] += table.params[row[n]]
            bits_used[g] += [unit.numel * (effective_bits_of(s, unit) if config.budget == "effective" else s.bits)
                             for s in choices]
        role = unit_of[names[0]].role
        lo = (config.role_min_bits or {}).get(role, 0)
        hi = (config.role_max_bits or {}).get(role, 99)
        allowed[g] = [lo <= s.bits <= hi for s in choices]
        if not allowed[g].any():
            raise ValueError(f"check the min/max bits of role {role!r}: no width in "
                             f"{tuple(sorted({s.bits for s in choices}))} is allowed")
    total = params.sum()
    spend = bits_used / total  # (groups, choices): the bits per weight each choice adds to the budget
    lowest = sum(spend[g][allowed[g]].min() for g in range(n_g))
    highest = sum(spend[g][allowed[g]].max() for g in range(n_g))
    if not lowest - 1e-9 <= config.target_bits <= highest + 1e-9:
        raise ValueError(f"impossible budget: {config.target_bits} {config.budget} bits is outside "
                         f"[{lowest:.3f}, {highest:.3f}], what these choices with these role limits can reach; "
                         f"change --target or the widths/menu")
    c = cost / max(cost.max(), 1e-30)  # (groups, choices), scaled for numerical comfort; argmin unchanged
    low, high = config.target_bits - config.tolerance, config.target_bits
    choice, bound = _greedy(c, spend, allowed, high)
    value = None if choice is None or spend[np.arange(n_g), choice].sum() < low else _value(c, choice)
    optimal, gap = False, None
    if value is not None and value - bound <= MIP_REL_GAP * max(abs(value), 1e-30):
        optimal, gap = True, (value - bound) / max(abs(value), 1e-30)  # within the MILP's own tolerance
    else:
        res = _milp(c, spend, allowed, low, high, config.time_limit)
        if res.x is not None and (value is None or res.fun < value):
            choice, value = np.asarray(res.x).reshape(n_g, n_w).argmax(axis=1), float(res.fun)
        if value is None:
            if res.status == 1:
                raise ValueError(f"the solver found no allocation within its time limit of {config.time_limit:g} s: "
                                 f"raise `time_limit` ({res.message})")
            raise ValueError(f"no allocation reaches {config.target_bits} bits within {config.tolerance}: "
                             f"widen `tolerance`, allow more widths, or relax the role limits ({res.message})")
        optimal = res.status == 0
        dual = res.get("mip_dual_bound")
        best_bound = max(bound, dual) if dual is not None and np.isfinite(dual) else bound
        gap = max(value - best_bound, 0.0) / max(abs(value), 1e-30)
    specs = {n: choices[choice[g]] for g, names in enumerate(groups) for n in names}
    bits = {n: s.bits for n, s in specs.items()}
    avg = float(sum(unit_of[n].numel * s.bits for n, s in specs.items()) / total)
    eff = float(sum(unit_of[n].numel * effective_bits_of(s, unit_of[n]) for n, s in specs.items()) / total)
    damage = float(sum(cost[g, choice[g]] for g in range(n_g)))
    solution = Solution(plan=plan_of_specs(specs, unit_of), bits=bits, average_bits=avg, damage=damage, groups=n_g,
                        optimal=optimal, gap=gap, effective_bits=eff, specs=specs)
    log.log(logging.INFO if optimal else logging.WARNING,
            "solver: %.4f average bits, %.4f effective (%s budget %.3f), estimated damage %.4g over %d groups (%s)",
            avg, eff, config.budget, config.target_bits, damage, n_g, solution.status)
    return solution


def plan_of_specs(specs: Mapping[str, QuantSpec], unit_of: Mapping) -> Plan:
    """default = the settings of most parameters; every other unit names only the settings that differ."""
    weight: dict[QuantSpec, int] = {}
    for n, s in specs.items():
        weight[s] = weight.get(s, 0) + unit_of[n].numel
    default = max(weight, key=lambda s: (weight[s], -s.bits))
    keys = ("bits", "group_size", "symmetric", "clip")
    modules = {n: {k: getattr(s, k) for k in keys if getattr(s, k) != getattr(default, k)}
               for n, s in specs.items() if s != default}
    return Plan.from_dict({"default": {k: getattr(default, k) for k in keys}, "modules": modules})
