import pytest

from quantmoe.bench.sweep import load_sweep, sweep_from_dict

BASE = {"models": ["mixtral-s"], "runs": [{"name": "u2", "policy": "uniform=2"}]}


def test_defaults_and_overrides():
    cfg = sweep_from_dict({**BASE, "seeds": [0, 1, 2], "calibration": {"num_windows": 16},
                           "quantizer": {"group_size": None, "symmetric": False},
                           "eval": {"perplexity": {"max_windows": 8}, "tasks": ["qmoe_cloze"]}}, "s.yaml")
    assert cfg.name == "s" and cfg.seeds == (0, 1, 2)
    assert cfg.calibration.num_windows == 16 and cfg.quantizer.group_size is None
    assert cfg.eval.perplexity.max_windows == 8 and cfg.eval.tasks == ("qmoe_cloze",)
    calib = cfg.calibration_for(2)
    assert calib.seed == 2 and calib.num_windows == 16


def test_policy_list_becomes_compact_form():
    cfg = sweep_from_dict({**BASE, "runs": [{"name": "a", "policy": [{"experts": 2}, {"attention": 4}]}]})
    assert cfg.runs[0].policy == "experts=2,attention=4"


@pytest.mark.parametrize("data, message", [
    ({**BASE, "seedz": [0]}, "did you mean 'seeds'"),
    ({**BASE, "calibration": {"num_window": 3}}, "did you mean 'num_windows'"),
    ({**BASE, "runs": [{"name": "x"}]}, "exactly one of policy"),
    ({**BASE, "runs": [{"name": "x", "policy": "uniform=2", "solver": {"target_bits": 2.5}}]}, "exactly one"),
    ({**BASE, "runs": [{"name": "x", "policy": "uniformm=2"}]}, "uniform"),
    ({**BASE, "runs": [{"name": "x", "solver": {"target_bits": 2.5, "granularity": "row"}}]}, "granularity"),
    ({**BASE, "runs": [{"name": "x", "policy": "uniform=2"}, {"name": "x", "policy": "uniform=3"}]}, "unique"),
    ({**BASE, "quantizer": {"method": "awq"}}, "method"),
    ({**BASE, "runs": [{"name": "x", "solver": {"target_bits": 1.5, "budget": "average"}}]}, "impossible budget"),
    ({**BASE, "runs": [{"name": "x", "solver": {"target_bits": 3, "budget": "avg"}}]}, "budget"),
    ({**BASE, "runs": [{"name": "x", "solver": {"target_bits": 3, "menu": ["3/g100"]}}]}, "group_size"),
    ({**BASE, "runs": [{"name": "x", "solver": {"target_bits": 2.5, "widths": [2, 5]}}]}, "bits"),
    ({**BASE, "quantizer": {"group_size": 100}}, "group_size"),
    ({**BASE, "seeds": "0"}, "seeds"),
    ({**BASE, "quantizer": {"clip": "mse2"}}, "clip"),
    ({"runs": BASE["runs"]}, "models"),
])
def test_bad_sweeps_name_the_fix(data, message):
    with pytest.raises(ValueError, match=message):
        sweep_from_dict(data)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep file"):
        load_sweep(tmp_path / "nope.yaml")


def test_shipped_sweeps_parse():
    from pathlib import Path

    sweeps = sorted(Path(__file__).resolve().parents[2].joinpath("sweeps").glob("*.yaml"))
    assert sweeps, "the repository ships example sweeps"
    for path in sweeps:
        assert load_sweep(path).runs


def test_demo_sweep_uses_the_local_task_suite():
    from pathlib import Path

    from quantmoe.eval.tasks import LOCAL_TASKS

    demo = load_sweep(Path(__file__).resolve().parents[2] / "sweeps" / "demo.yaml")
    assert demo.eval.tasks and set(demo.eval.tasks) <= set(LOCAL_TASKS)
    assert {m.name for m in demo.models} == {"mixtral-s", "deepseek-s"} and demo.seeds == (0, 1, 2)


def test_quantizer_clip_reaches_plans_and_identity():
    from quantmoe.alloc.policies import build_plan
    from quantmoe.alloc.presets import parse_policy
    from quantmoe.anatomy import describe_config
    from quantmoe.models import read_model_config, resolve_model

    plain = sweep_from_dict(BASE, "s.yaml")
    clipped = sweep_from_dict({**BASE, "quantizer": {"clip": "hmse"}}, "s.yaml")
    assert "clip" not in plain.quantizer.identity()  # rows stored before `clip` keep their keys
    assert clipped.quantizer.identity()["clip"] == "hmse"
    anatomy = describe_config(read_model_config(resolve_model("mixtral-s")))
    q = clipped.quantizer
    plan = build_plan(parse_policy("uniform=2"), anatomy, group_size=q.group_size, symmetric=q.symmetric, clip=q.clip)
    assert {s.clip for s in plan.resolve(anatomy).values()} == {"hmse"}


def test_quantizer_rotate_reaches_gptq_config_and_identity():
    plain = sweep_from_dict(BASE, "s.yaml")
    rotated = sweep_from_dict({**BASE, "quantizer": {"rotate": True}}, "s.yaml")
    assert "rotate" not in plain.quantizer.identity()  # rows stored before `rotate` keep their keys
    assert rotated.quantizer.identity()["rotate"] is True
    assert rotated.quantizer.gptq().rotate is True and plain.quantizer.gptq().rotate is False
