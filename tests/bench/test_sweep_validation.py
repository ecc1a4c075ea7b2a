"""Every value of a sweep is type- and range-checked: the error names the key path and the expected type."""

import dataclasses

import pytest

from quantmoe.bench import sweep_schema
from quantmoe.bench.sweep import (
    EvalSettings,
    ModelSpec,
    PerplexitySettings,
    QuantizerSettings,
    SolverSettings,
    StatisticsSettings,
    SweepConfig,
    load_sweep,
    sweep_from_dict,
)
from quantmoe.calib.data import CalibrationConfig

BASE = {"models": ["mixtral-s"], "runs": [{"name": "u2", "policy": "uniform=2"}]}
RUN = {"name": "s", "solver": {"target_bits": 2.5}}


@pytest.mark.parametrize("data, message", [
    # silently overridden before: now refused, saying where the setting belongs
    ({**BASE, "calibration": {"moe_mode": "all"}}, r"sweep.yaml: calibration: `moe_mode` does not belong in "
                                                   r"`calibration`: set it under `quantizer`"),
    ({**BASE, "calibration": {"min_expert_tokens": 4}}, r"calibration: `min_expert_tokens` .*quantizer"),
    ({**BASE, "calibration": {"seed": 3}}, r"calibration: `seed` .*`seeds`"),
    # wrong types that were accepted or coerced
    ({**BASE, "save_checkpoints": "false"}, r'sweep.yaml: save_checkpoints: expected true or false, got "false"'),
    ({**BASE, "calibration": {"num_windows": 4.5}}, r"calibration.num_windows: expected an integer, got 4.5"),
    ({**BASE, "seeds": [True]}, r"seeds\[0\]: expected an integer, got true"),
    ({**BASE, "seeds": [0, -1]}, r"seeds: calibration seeds are integers >= 0"),
    ({**BASE, "seeds": []}, r"seeds: list should have at least 1 item"),
    ({**BASE, "eval": {"task_limit": "ten"}}, r'eval.task_limit: expected an integer, got "ten"'),
    ({**BASE, "eval": {"task_limit": 0}}, r"eval.task_limit: input should be greater than or equal to 1, got 0"),
    ({**BASE, "device": 3}, r"device: expected a string, got 3"),
    ({**BASE, "device": "gpu"}, r"device: 'gpu' is not a torch device"),
    ({**BASE, "eval": {"tasks": 5}}, r"eval.tasks: expected a list, got 5"),
    ({**BASE, "eval": {"tasks": ["qmoe_cloze", 5]}}, r"eval.tasks\[1\]: expected a string, got 5"),
    ({**BASE, "eval": {"perplexity": {"seq_len": 1}}}, r"eval.perplexity.seq_len: input should be greater than or "
                                                       r"equal to 2, got 1"),
    ({**BASE, "quantizer": {"symmetric": "false"}}, r'quantizer.symmetric: expected true or false, got "false"'),
    ({**BASE, "quantizer": {"group_size": 64.0}}, r"quantizer.group_size: expected an integer, got 64.0"),
    ({**BASE, "quantizer": {"group_size": True}}, r"quantizer.group_size: expected an integer, got true"),
    ({**BASE, "quantizer": {"damp": "0.01"}}, r'quantizer.damp: expected a number, got "0.01"'),
    ({**BASE, "quantizer": {"damp": 1.5}}, r"quantizer.damp: input should be less than 1, got 1.5"),
    ({**BASE, "quantizer": {"moe_mode": "every"}}, r"quantizer.moe_mode: expected one of 'routed', 'all' or "
                                                   r"'weighted', got \"every\""),
    ({**BASE, "statistics": {"damage_metric": "kl"}}, r"statistics.damage_metric: expected one of"),
    ({**BASE, "statistics": {"massive_threshold": 0}}, r"statistics.massive_threshold: input should be greater "
                                                       r"than 0"),
    ({**BASE, "models": [{"name": "mixtral-s", "dtype": "fp8"}]}, r"models\[0\].dtype: expected one of"),
    ({**BASE, "models": [{"name": "mixtral-s", "trust_remote_code": "yes"}]},
     r"models\[0\].trust_remote_code: expected true or false"),
    ({**BASE, "models": [5]}, r"models\[0\]: expected a mapping, got 5"),
    ({**BASE, "runs": [{"name": "x", "policy": 5}]}, r"runs\[0\].policy: expected compact rules"),
    ({**BASE, "runs": [{"name": 5, "policy": "uniform=2"}]}, r"runs\[0\].name: expected a string, got 5"),
    ({**BASE, "runs": [{"policy": "uniform=2"}]}, r"runs\[0\].name: missing: this key is required"),
    ({**BASE, "runs": [{"name": "x", "full_precision": "yes"}]}, r"runs\[0\].full_precision: expected true or false"),
    ({**BASE, "runs": [RUN, {"name": "t", "solver": {"target_bits": "x"}}]},
     r'runs\[1\].solver.target_bits: expected a number, got "x"'),
    ({**BASE, "runs": [{"name": "t", "solver": {"target_bits": 2.5, "widths": [2, "3"]}}]},
     r'runs\[0\].solver.widths\[1\]: expected an integer, got "3"'),
    ({**BASE, "runs": [{"name": "t", "solver": {"target_bits": 2.5, "min_bits": {"atention": 4}}}]},
     r"runs\[0\].solver.min_bits: unknown role 'atention'; did you mean 'attention'\?"),
    ({**BASE, "runs": [{"name": "t", "solver": {"target_bits": 2.5, "tolerance": 0}}]},
     r"runs\[0\].solver.tolerance: input should be greater than 0"),
    ({**BASE, "runs": [{"name": "t", "plan": "no/such/plan.yaml"}]}, r"runs\[0\].plan: plan file no/such/plan.yaml "
                                                                       r"not found"),
    # unknown keys: "did you mean" and the allowed keys of that very section
    ({**BASE, "seedz": [0]}, r"sweep.yaml: seedz: unknown key \(did you mean 'seeds'\?\); allowed: name, store, "),
    ({**BASE, "quantizer": {"act_ordr": True}}, r"quantizer.act_ordr: unknown key \(did you mean 'act_order'\?\); "
                                                r"allowed: method, group_size"),
    ({**BASE, "runs": [{"name": "t", "solver": {"target_bit": 2.5}}]},
     r"runs\[0\].solver.target_bit: unknown key \(did you mean 'target_bits'\?\)"),
    ({**BASE, "eval": {"perplexity": {"max_window": 3}}}, r"eval.perplexity.max_window: unknown key \(did you mean "
                                                          r"'max_windows'\?\)"),
    # cross-field rules of the dataclasses keep their messages, now with the key path
    ({**BASE, "quantizer": {"group_size": 100}}, r"sweep.yaml: quantizer: .*group_size"),
    ({**BASE, "runs": [{"name": "t", "solver": {"target_bits": 1.5}}]}, r"runs\[0\].solver: impossible budget"),
    ({**BASE, "runs": [{"name": "t", "policy": "uniformm=2"}]}, r"runs\[0\].policy: .*uniform"),
    ([1, 2], r"sweep.yaml: expected a mapping of sweep keys"),
])
def test_bad_values_name_the_key_and_the_expected_type(data, message):
    with pytest.raises(ValueError, match=message):
        sweep_from_dict(data, "sweep.yaml")


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as err:
        sweep_from_dict({**BASE, "seeds": ["a"], "device": 1, "save_checkpoints": "no"}, "s.yaml")
    assert str(err.value).count("\n") == 2 and "seeds[0]" in str(err.value) and "device" in str(err.value)


def test_valid_values_come_through_unchanged():
    cfg = sweep_from_dict({**BASE, "save_checkpoints": False, "device": "cpu", "seeds": [4, 7],
                           "eval": {"tasks": "qmoe_cloze", "task_limit": 10},
                           "quantizer": {"moe_mode": "all", "min_expert_tokens": 3, "damp": 0},
                           "calibration": {"num_windows": 4, "seq_len": 32},
                           "runs": [{"name": "a", "solver": {"target_bits": 3, "min_bits": {"attention": 4}},
                                     "models": "mixtral-s"}]}, "s.yaml")
    assert cfg.save_checkpoints is False and cfg.device == "cpu" and cfg.seeds == (4, 7)
    assert cfg.eval.tasks == ("qmoe_cloze",) and cfg.eval.task_limit == 10  # one name is a list of one
    assert cfg.runs[0].models == ("mixtral-s",) and cfg.runs[0].solver.target_bits == 3
    calib = cfg.calibration_for(7)  # the calibration of a run: seed from `seeds`, MoE settings from `quantizer`
    assert (calib.seed, calib.moe_mode, calib.min_expert_tokens, calib.num_windows) == (7, "all", 3, 4)


def _tuples(value):
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@pytest.mark.parametrize("schema, config", [
    (sweep_schema.CalibrationSection, CalibrationConfig), (sweep_schema.QuantizerSection, QuantizerSettings),
    (sweep_schema.PerplexitySection, PerplexitySettings), (sweep_schema.EvalSection, EvalSettings),
    (sweep_schema.StatisticsSection, StatisticsSettings), (sweep_schema.SolverSection, SolverSettings),
    (sweep_schema.ModelEntry, ModelSpec), (sweep_schema.SweepFile, SweepConfig),
])
def test_schema_matches_the_config_dataclasses(schema, config):
    """Every key the schema accepts is a field of the config, with the same default (the dataclass's
    default is what an unset key gets; the schema's must not tell another story)."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, info in schema.model_fields.items():
        assert name in fields, f"{schema.__name__}.{name} is not a field of {config.__name__}"
        f = fields[name]
        if info.is_required() or f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        schema_default = info.get_default(call_default_factory=True)
        if hasattr(schema_default, "model_dump"):  # a section: its keys' defaults, the rest is checked above
            given = _tuples(schema_default.model_dump())
            assert {k: v for k, v in dataclasses.asdict(default).items() if k in given} == given, name
        else:
            assert _tuples(schema_default) == default, name
    moved = set(fields) - set(schema.model_fields)
    assert moved <= {"seed", "moe_mode", "min_expert_tokens", "name", "models", "runs"}, moved


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [mixtral-s\nruns: []\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML at line \d+, column \d+"):
        load_sweep(path)
    path.write_bytes(b"models: [\xff]\n")
    with pytest.raises(ValueError, match="bad.yaml: not a UTF-8 text file"):
        load_sweep(path)


def test_the_bench_command_reports_a_bad_sweep_without_a_traceback(tmp_path, caplog, capsys):
    from quantmoe.cli import main

    path = tmp_path / "s.yaml"
    path.write_text("models: [mixtral-s]\nsave_checkpoints: 'false'\nruns: [{name: a, policy: uniform=2}]\n",
                    encoding="utf-8")
    assert main(["bench", str(path), "--quiet"]) == 2
    assert "save_checkpoints: expected true or false" in caplog.text
    assert "Traceback" not in capsys.readouterr().err


def test_solver_time_limit_is_settable_and_keeps_earlier_run_keys():
    default = sweep_from_dict({**BASE, "runs": [RUN]}).runs[0]
    assert default.solver.config().time_limit == 120.0
    assert "time_limit" not in default.identity()["solver"]  # rows stored before the setting still match
    short = sweep_from_dict({**BASE, "runs": [{"name": "s", "solver": {"target_bits": 2.5, "time_limit": 5}}]}).runs[0]
    assert short.solver.config().time_limit == 5 and short.identity()["solver"]["time_limit"] == 5
    with pytest.raises(ValueError, match=r"runs\[0\].solver.time_limit: input should be greater than 0"):
        sweep_from_dict({**BASE, "runs": [{"name": "s", "solver": {"target_bits": 2.5, "time_limit": 0}}]})
