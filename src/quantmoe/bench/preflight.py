"""Check a sweep (or one plan) against each model's config before any weights load.

The model is built on the ``meta`` device from its config alone (``inspect_model``), so a
plan naming a module that does not exist, a policy with a bad rule or a solver budget out of
reach fails in seconds, not after loading the weights and evaluating full precision.
Data-driven rules (top-K frequent experts, outliers, predicted blocks) are checked with a
placeholder ranking: their syntax and bits are checked now, the choice is made later on data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from quantmoe.anatomy import ModelAnatomy, inspect_model
from quantmoe.bench.sweep import RunSpec, SweepConfig
from quantmoe.quant.plan import Plan

log = logging.getLogger(__name__)


def model_anatomy(name: str, trust_remote_code: bool = False) -> ModelAnatomy:
    """The anatomy of an embedded name, local folder or hub id, from its config (meta device)."""
    from quantmoe.api import quantized_format
    from quantmoe.models import resolve_model

    source = resolve_model(name)
    kind = quantized_format(source)
    if kind is not None:
        raise ValueError(f"{name} is a quantized model ({kind} format); this command needs the "
                         "full-precision model: give the model it was quantized from")
    return inspect_model(source, trust_remote_code=trust_remote_code)


def check_plan(plan: Plan, anatomy: ModelAnatomy, where: str) -> None:
    """Resolve ``plan`` on ``anatomy``; a name or pattern that matches nothing is a ValueError naming ``where``."""
    try:
        plan.resolve(anatomy)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def check_solver(config: Any, anatomy: ModelAnatomy, where: str, group_size: int | None = 128,
                 symmetric: bool = True, clip: str = "none") -> None:
    """Run the solver on an all-zero damage table: roles, widths and the budget are checked, nothing measured.

    ``config`` is a ``quantmoe.alloc.solver.SolverConfig``.
    """
    from quantmoe.alloc.damage import DamageTable
    from quantmoe.alloc.solver import solve

    roles = {u.role for u in anatomy.units}
    for key, limits in (("min_bits", config.role_min_bits), ("max_bits", config.role_max_bits)):
        unknown = sorted(set(limits or {}) - roles)
        if unknown:
            raise ValueError(f"{where}: check solver `{key}`: {', '.join(unknown)} is not a role of this model "
                             f"(roles: {', '.join(sorted(roles))})")
    widths = tuple(s.bits for s in config.menu) or tuple(sorted(config.widths))
    table = DamageTable(units=tuple(u.name for u in anatomy.units), widths=widths,
                        damage=np.zeros((len(anatomy.units), len(widths))),
                        params=np.array([u.numel for u in anatomy.units], dtype=float), metric="none",
                        specs=tuple(config.menu))
    solver_log = logging.getLogger("quantmoe.alloc.solver")
    level = solver_log.level
    solver_log.setLevel(logging.WARNING)  # its summary of an all-zero table means nothing
    try:
        solve(anatomy, table, config, group_size=group_size, symmetric=symmetric, clip=clip)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    finally:
        solver_log.setLevel(level)


def check_run(run: RunSpec, anatomy: ModelAnatomy, model: str, config: SweepConfig) -> None:
    from quantmoe.alloc.policies import build_plan
    from quantmoe.alloc.presets import parse_policy
    from quantmoe.alloc.scorers import Evidence

    where = f"check run {run.name!r} of sweep {config.name!r} on {model}"
    q = config.quantizer
    if run.plan is not None:
        check_plan(Plan.from_yaml(Path(run.plan)), anatomy, where)
    elif run.policy is not None:
        try:
            plan = build_plan(parse_policy(run.policy), anatomy, Evidence(placeholder=True),
                              group_size=q.group_size, symmetric=q.symmetric, clip=q.clip)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        check_plan(plan, anatomy, where)
    elif run.solver is not None:
        check_solver(run.solver.config(), anatomy, where, q.group_size, q.symmetric, q.clip)


def check_sweep(config: SweepConfig) -> dict[str, ModelAnatomy]:
    """Check every run of ``config`` on every model it applies to; return the anatomies by model name."""
    anatomies = {}
    for spec in config.models:
        anatomy = model_anatomy(spec.name, trust_remote_code=spec.trust_remote_code)
        for run in config.runs:
            if run.applies_to(spec.name):
                check_run(run, anatomy, spec.name, config)
        anatomies[spec.name] = anatomy
    log.info("sweep %s: %d runs checked on %d models (configs only)", config.name, len(config.runs),
             len(config.models))
    return anatomies
