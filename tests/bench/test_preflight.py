"""A plan, policy or solver budget that cannot work on the model fails before any weights load."""

import pytest
import yaml

import quantmoe.models as embedded
from quantmoe.bench.runner import run_sweep
from quantmoe.bench.sweep import sweep_from_dict
from quantmoe.cli import main


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: every check must happen on the config alone."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("weights were loaded before the plan was checked")

    monkeypatch.setattr(embedded, "load_model", refuse)
    return calls


def _bad_plan(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump({"default": {"bits": 4}, "modules": {"model.layers.9.mlp.experts.0.down_proj":
                                                                         {"bits": 8}}}))
    return path


def test_quantize_checks_the_plan_before_loading(tmp_path, no_weights, caplog):
    plan = _bad_plan(tmp_path)
    assert main(["quantize", "mixtral-s", "--plan", str(plan), "--out", str(tmp_path / "q"), "--eval", "test"]) == 2
    assert not no_weights and not (tmp_path / "q").exists()
    assert "model.layers.9.mlp.experts.0.down_proj" in caplog.text and str(plan) in caplog.text


def test_solve_checks_roles_and_budget_before_loading(no_weights, caplog):
    assert main(["solve", "mixtral-s", "--target", "2.5", "--min-bits", "shared_expert=4"]) == 2
    assert not no_weights and "shared_expert" in caplog.text
    assert main(["solve", "mixtral-s", "--target", "3.9", "--max-bits", "routed_expert=2"]) == 2
    assert not no_weights and "impossible budget" in caplog.text


def test_plan_command_checks_data_driven_rules_before_loading(no_weights, caplog):
    assert main(["plan", "mixtral-s", "--policy", "experts=2,topk=2:5"]) == 2
    assert not no_weights and "5" in caplog.text


@pytest.mark.parametrize("run, needle", [
    ({"name": "bad plan", "plan": "PLAN"}, "model.layers.9.mlp.experts.0.down_proj"),
    ({"name": "bad pattern", "policy": "experts=2,pattern=model\\.nowhere\\..*:4"}, "nowhere"),
    ({"name": "bad role", "solver": {"target_bits": 2.5, "min_bits": {"shared_expert": 4}}}, "shared_expert"),
    ({"name": "out of reach", "solver": {"target_bits": 3.9, "max_bits": {"routed_expert": 2}}},
     "impossible budget"),
])
def test_sweep_is_checked_before_loading(tmp_path, no_weights, run, needle):
    if run.get("plan") == "PLAN":
        run = {**run, "plan": str(_bad_plan(tmp_path))}
    config = sweep_from_dict({"name": "bad", "models": ["mixtral-s"], "seeds": [0],
                              "runs": [{"name": "full precision", "full_precision": True}, run]})
    with pytest.raises(ValueError, match="bad") as err:
        run_sweep(config, tmp_path / "r.sqlite", cache_dir=tmp_path / "cache", progress=False)
    assert needle in str(err.value) and run["name"] in str(err.value)
    assert not no_weights and not (tmp_path / "r.sqlite").exists()


def test_the_shipped_sweeps_pass_the_check():
    from pathlib import Path

    from quantmoe.bench.preflight import check_sweep
    from quantmoe.bench.sweep import load_sweep

    root = Path(__file__).resolve().parents[2] / "sweeps"
    assert set(check_sweep(load_sweep(root / "demo.yaml"))) == {"mixtral-s", "deepseek-s"}
    assert set(check_sweep(load_sweep(root / "quick.yaml"))) == {"mixtral-s"}
    quality = load_sweep(root / "quality.yaml")
    assert set(check_sweep(quality)) == {"mixtral-s", "deepseek-s"}
    menus = {r.name: r.solver.menu_specs() for r in quality.runs if r.solver and r.solver.menu}
    assert len(menus) == 3 and all(len(m) == 19 for m in menus.values())  # the anchor is shared, not lost
