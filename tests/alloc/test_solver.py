import itertools

import numpy as np
import pytest
import torch

from quantmoe.alloc.damage import DamageTable, measure_damage
from quantmoe.alloc.solver import SolverConfig, solve
from quantmoe.anatomy import describe, tiny_model
from quantmoe.quant.plan import bit_stats


@pytest.fixture(scope="module")
def measured():
    model = tiny_model("qwen2_moe")
    anatomy = describe(model)
    windows = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    tables = {m: measure_damage(model, anatomy, windows, (2, 3, 4, 8), group_size=16, metric=m)
              for m in ("fisher", "output", "kfac")}
    return anatomy, tables


def test_measured_damage_falls_with_width(measured):
    _, tables = measured
    for table in tables.values():
        assert (table.damage[:, 0] > table.damage[:, 2]).all()
        assert (table.damage[:, 2] >= table.damage[:, 3]).all()
        assert (table.damage[:, 3] < 1e-2 * table.damage[:, 0]).all()


@pytest.mark.parametrize("target", [2.25, 2.5, 3.0, 3.7])
@pytest.mark.parametrize("granularity", ["linear", "expert", "block"])
def test_solver_hits_the_budget(measured, target, granularity):
    anatomy, tables = measured
    sol = solve(anatomy, tables["fisher"], SolverConfig(budget="average", target_bits=target, granularity=granularity))
    stats = bit_stats(sol.plan.resolve(anatomy), anatomy.units)
    assert target - 0.01 <= stats.average_bits <= target + 1e-9
    assert stats.average_bits == pytest.approx(sol.average_bits)
    if granularity == "block":  # serving-compatible: one width for all routed experts of a block
        for block in anatomy.blocks:
            widths = {sol.bits[n] for expert in block.experts for n in expert}
            assert len(widths) <= 1
    if granularity == "expert":
        for block in anatomy.blocks:
            for expert in block.experts:
                assert len({sol.bits[n] for n in expert}) == 1


def test_solver_is_optimal_on_a_small_problem(measured):
    anatomy, _ = measured
    units = anatomy.units[:5]
    rng = np.random.default_rng(0)
    dmg = np.sort(rng.random((5, 3)) * 10, axis=1)[:, ::-1].copy()
    table = DamageTable(tuple(u.name for u in units), (2, 3, 4), dmg,
                        np.array([u.numel for u in units], dtype=float), "fisher")

    class Sub:
        pass

    sub = Sub()
    sub.units = units
    target = 3.0
    sol = solve(sub, table, SolverConfig(budget="average", target_bits=target, widths=(2, 3, 4), tolerance=0.25))
    params = table.params
    best = min((sum(dmg[i, c[i]] for i in range(5)), c) for c in itertools.product(range(3), repeat=5)
               if target - 0.25 <= sum(params[i] * (2, 3, 4)[c[i]] for i in range(5)) / params.sum() <= target)
    assert sol.damage == pytest.approx(best[0])


def test_role_limits_and_impossible_budgets(measured):
    anatomy, tables = measured
    sol = solve(anatomy, tables["output"], SolverConfig(budget="average", target_bits=2.5, role_min_bits={"attention": 4}))
    assert all(sol.bits[u.name] >= 4 for u in anatomy.units_by_role("attention"))
    with pytest.raises(ValueError, match="impossible budget"):
        solve(anatomy, tables["output"], SolverConfig(budget="average", target_bits=1.9))
    with pytest.raises(ValueError, match="impossible budget"):
        solve(anatomy, tables["output"], SolverConfig(budget="average", target_bits=4.5))
    with pytest.raises(ValueError, match="not one of 2, 3, 4, 8, 16"):
        SolverConfig(budget="average", target_bits=3.0, widths=(2, 3, 5))
    with pytest.raises(ValueError, match="no column for"):  # 16 bits was not measured
        solve(anatomy, tables["output"], SolverConfig(budget="average", target_bits=3.0, widths=(2, 3, 16)))
