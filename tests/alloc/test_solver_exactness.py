"""The solver's plan is optimal (checked by brute force) or says how far from optimal it may be."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import sparse

import quantmoe.alloc.solver as solver_module
from quantmoe.alloc.damage import DamageTable
from quantmoe.alloc.solver import MIP_REL_GAP, SolverConfig, solve


def _problem(n: int, seed: int, widths=(2, 3, 4)):
    """n single linears of assorted sizes and roles, with random damage falling with width."""
    rng = np.random.default_rng(seed)
    roles = ["attention", "routed_expert", "shared_expert"]
    rows = [int(rng.integers(1, 20)) for _ in range(n)]
    units = tuple(SimpleNamespace(name=f"u{i}", role=roles[i % 3], block=0, expert=None, numel=rows[i] * 64,
                                  in_features=64, out_features=rows[i]) for i in range(n))
    dmg = np.sort(rng.random((n, len(widths))) * 10, axis=1)[:, ::-1].copy()  # (units, widths), falling
    table = DamageTable(tuple(u.name for u in units), widths, dmg, np.array([u.numel for u in units], float), "t")
    return SimpleNamespace(units=units), table


def _brute_force(table, config) -> float:
    widths, params = table.widths, table.params
    limits = [(config.role_min_bits or {}).get(r, 0) for r in ("attention", "routed_expert", "shared_expert")]
    best = np.inf
    for c in itertools.product(range(len(widths)), repeat=len(params)):
        if any(widths[c[i]] < limits[i % 3] for i in range(len(params))):
            continue
        avg = sum(params[i] * widths[c[i]] for i in range(len(params))) / params.sum()
        if config.target_bits - config.tolerance <= avg <= config.target_bits:
            best = min(best, sum(table.damage[i, c[i]] for i in range(len(params))))
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target, tolerance, min_bits", [(2.5, 0.01, None), (3.0, 0.2, None),
                                                          (3.3, 0.05, {"attention": 3})])
def test_plan_is_optimal_by_brute_force(seed, target, tolerance, min_bits):
    anatomy, table = _problem(7, seed)
    config = SolverConfig(budget="average", target_bits=target, tolerance=tolerance, role_min_bits=min_bits)
    best = _brute_force(table, config)
    if not np.isfinite(best):
        with pytest.raises(ValueError):
            solve(anatomy, table, config)
        return
    sol = solve(anatomy, table, config)
    assert sol.optimal and sol.status == "optimal"
    assert target - tolerance - 1e-9 <= sol.average_bits <= target + 1e-9
    assert sol.damage == pytest.approx(best, rel=2 * MIP_REL_GAP)


def test_greedy_bound_is_a_lower_bound_and_its_plan_fits():
    for seed in range(20):
        anatomy, table = _problem(6, seed)
        c = table.damage / table.damage.max()
        spend = table.params[:, None] * np.array(table.widths)[None, :] / table.params.sum()
        choice, bound = solver_module._greedy(c, spend, np.ones_like(c, dtype=bool), 2.7)
        assert spend[np.arange(6), choice].sum() <= 2.7 + 1e-12
        best = _brute_force(SimpleNamespace(widths=table.widths, params=table.params, damage=c),
                            SolverConfig(budget="average", target_bits=2.7, tolerance=0.69))
        assert bound <= best + 1e-12 <= solver_module._value(c, choice) + 1e-12


def _time_limited(monkeypatch, keep_x: bool):
    """milp as it returns when stopped by its time limit: the real run's incumbent (or none), status 1,
    and a weaker dual bound than the optimum."""
    calls = []
    real = solver_module.milp

    def stopped(c, **kwargs):
        res = real(c, **kwargs)
        calls.append(kwargs)
        res.status, res.success, res.message = 1, False, "Time limit reached. (HiGHS Status 13)"
        res.mip_dual_bound = res.fun * 0.9
        res.mip_gap = 0.1
        if not keep_x:
            res.x = res.fun = None
        return res

    monkeypatch.setattr(solver_module, "milp", stopped)
    return calls


def test_time_limit_keeps_the_best_plan_and_reports_the_gap(monkeypatch, caplog):
    anatomy, table = _problem(7, 0)
    config = SolverConfig(budget="average", target_bits=3.0, tolerance=0.2, time_limit=5)
    exact = solve(anatomy, table, config)
    calls = _time_limited(monkeypatch, keep_x=True)
    sol = solve(anatomy, table, config)
    assert calls and calls[0]["options"]["time_limit"] == 5  # the exact program ran (the greedy was not enough)
    assert not sol.optimal and sol.status.startswith("time limit, gap ") and sol.status.endswith("%")
    assert 0 < sol.gap <= 0.1 + 1e-12  # the greedy's LP bound may be tighter than the stopped run's
    assert sol.bits == exact.bits and sol.damage == pytest.approx(exact.damage)  # the plan found is kept
    assert "time limit" in caplog.text


def test_time_limit_without_any_plan_says_to_raise_it(monkeypatch):
    anatomy, table = _problem(7, 0)
    _time_limited(monkeypatch, keep_x=False)
    config = SolverConfig(budget="average", target_bits=3.0, tolerance=0.2, time_limit=5)
    sol = solve(anatomy, table, config)  # the greedy's plan fits this budget: kept, with its gap
    assert not sol.optimal and sol.gap is not None and sol.gap > 0
    narrow = SolverConfig(budget="average", target_bits=3.0, tolerance=0.001, time_limit=5)  # the greedy's plan misses this window
    with pytest.raises(ValueError, match="time limit of 5 s: raise `time_limit`"):
        solve(anatomy, table, narrow)


def test_constraints_are_sparse(monkeypatch):
    seen = {}
    real = solver_module.milp

    def spy(c, constraints, **kwargs):
        seen["one_hot"] = constraints[0].A
        return real(c, constraints=constraints, **kwargs)

    monkeypatch.setattr(solver_module, "milp", spy)
    anatomy, table = _problem(7, 0)
    solve(anatomy, table, SolverConfig(budget="average", target_bits=3.0, tolerance=0.2))
    assert sparse.issparse(seen["one_hot"]) and seen["one_hot"].nnz == 7 * 3


def test_time_limit_must_be_positive():
    with pytest.raises(ValueError, match="time_limit"):
        SolverConfig(budget="average", target_bits=3.0, time_limit=0)


def test_large_problems_solved_by_the_greedy_match_the_exact_program(monkeypatch):
    anatomy, table = _problem(1000, 3)
    config = SolverConfig(budget="average", target_bits=2.6)
    real = solver_module.milp
    calls = []
    monkeypatch.setattr(solver_module, "milp", lambda *a, **k: calls.append(1) or real(*a, **k))
    sol = solve(anatomy, table, config)
    assert not calls and sol.optimal and 0 <= sol.gap <= MIP_REL_GAP  # proven by the greedy's LP bound
    scale = table.damage.max()
    spend = table.params[:, None] * np.array(table.widths, float)[None, :] / table.params.sum()
    exact = solver_module._milp(table.damage / scale, spend, np.ones(table.damage.shape, dtype=bool),
                                2.6 - config.tolerance, 2.6, time_limit=60)
    assert exact.status == 0
    assert exact.fun * scale * (1 - 2 * MIP_REL_GAP) <= sol.damage <= exact.fun * scale * (1 + 2 * MIP_REL_GAP)


def test_unknown_roles_in_limits_are_errors_not_ignored():
    with pytest.raises(ValueError, match="check `role_min_bits`: unknown role 'atention'; did you mean 'attention'"):
        SolverConfig(budget="average", target_bits=3.0, role_min_bits={"atention": 4})
    with pytest.raises(ValueError, match="check `role_max_bits`: unknown role 'experts'"):
        SolverConfig(budget="average", target_bits=3.0, role_max_bits={"experts": 3})
