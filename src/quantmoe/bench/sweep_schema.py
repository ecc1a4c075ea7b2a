"""The types and ranges of a sweep file, checked with pydantic (strict: no coercion).

Strict mode means a YAML value must already have the right type: ``num_windows: 4.5``,
``save_checkpoints: "false"`` or ``seeds: [true]`` are errors, not silently converted. Every
error names the key path and the expected type, e.g. ``sweep.yaml: runs[3].solver.target_bits:
expected a number, got "x"``; an unknown key gets "did you mean". ``sweep.py`` turns the
validated document into its frozen dataclasses (which check the cross-field rules).
"""

from __future__ import annotations

import json
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantmoe.anatomy import QUANTIZABLE_ROLES
from quantmoe.suggest import did_you_mean


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _one_or_many(value: Any) -> Any:
    """A single name stands for a list of one (``tasks: qmoe_cloze`` is ``[qmoe_cloze]``)."""
    return [value] if isinstance(value, str) else value


class ModelEntry(_Section):
    name: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class CalibrationSection(_Section):
    split: str = "calibration"
    num_windows: int = Field(128, ge=1)
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _not_here(cls, data: Any) -> Any:
        moved = {"seed": "calibration seeds are the sweep's `seeds` list",
                 "moe_mode": "set it under `quantizer` (quantizer.moe_mode)",
                 "min_expert_tokens": "set it under `quantizer` (quantizer.min_expert_tokens)"}
        for key, where in moved.items():
            if isinstance(data, dict) and key in data:
                raise ValueError(f"`{key}` does not belong in `calibration`: {where}")
        return data


class QuantizerSection(_Section):
    method: Literal["gptq", "rtn"] = "gptq"
    group_size: int | None = Field(128, ge=1)
    symmetric: bool = True
    clip: Literal["none", "mse", "hmse"] = "none"
    damp: float = Field(0.01, ge=0, lt=1)
    act_order: bool | Literal["none", "desc", "gar"] = False  # false = none, true = desc
    static_groups: bool = False
    rotate: bool = False
    refine: int = Field(0, ge=0)
    tune_steps: int = Field(0, ge=0)
    tune_lr: float = Field(0.005, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    moe_mode: Literal["routed", "all", "weighted"] = "routed"
    min_expert_tokens: int = Field(16, ge=0)


class PerplexitySection(_Section):
    split: str = "test"
    seq_len: int = Field(256, ge=2)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)


class EvalSection(_Section):
    perplexity: PerplexitySection = PerplexitySection()
    tasks: list[str] = []
    task_limit: int | None = Field(None, ge=1)
    task_batch_size: int = Field(16, ge=1)

    _tasks = field_validator("tasks", mode="before")(_one_or_many)


class StatisticsSection(_Section):
    split: str = "calibration"
    rank_split: str = "validation"
    windows: int = Field(64, ge=1)
    seq_len: int = Field(256, ge=2)
    seed: int = Field(0, ge=0)
    massive_threshold: float = Field(1000.0, gt=0)
    damage_windows: int = Field(32, ge=1)
    damage_metric: Literal["fisher", "output", "kfac"] = "fisher"


def _role_bits(value: dict[str, int] | None) -> dict[str, int] | None:
    for role in value or {}:
        if role not in QUANTIZABLE_ROLES:
            hint = did_you_mean(role, QUANTIZABLE_ROLES)
            raise ValueError(f"unknown role {role!r}; {hint + ' ' if hint else ''}"
                             f"roles: {', '.join(QUANTIZABLE_ROLES)}")
    return value


class RaySection(_Section):
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    max_retries: int = Field(2, ge=0)

    @field_validator("num_cpus", "num_gpus", "memory_gb", mode="before")
    @classmethod
    def _whole_numbers_too(cls, value: Any) -> Any:
        """Strict floats refuse ``num_gpus: 1``; an integer is a number here (a bool is not)."""
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class SolverSection(_Section):
    target_bits: float
    widths: list[int] = Field([2, 3, 4], min_length=1)
    granularity: Literal["linear", "expert", "block"] = "linear"
    tolerance: float = Field(0.01, gt=0, lt=1)
    min_bits: dict[str, int] | None = None
    max_bits: dict[str, int] | None = None
    time_limit: float = Field(120.0, gt=0)
    budget: Literal["effective", "average"] = "effective"
    menu: list[str] = []

    _roles = field_validator("min_bits", "max_bits")(_role_bits)


class RunEntry(_Section):
    name: str
    policy: Any = None  # compact rules (a string) or a list of rules; checked by parse_policy
    plan: str | None = None
    solver: SolverSection | None = None
    full_precision: bool = False
    models: list[str] | None = None

    _models = field_validator("models", mode="before")(_one_or_many)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_type(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError(f"expected compact rules (a string such as \"uniform=2\") or a list of rules, "
                             f"got {_shown(value)}")
        return value


class SweepFile(_Section):
    name: str | None = None
    store: str = "runs/results.sqlite"
    models: list[ModelEntry] = Field(min_length=1)
    runs: list[RunEntry] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    calibration: CalibrationSection = CalibrationSection()
    quantizer: QuantizerSection = QuantizerSection()
    eval: EvalSection = EvalSection()
    statistics: StatisticsSection = StatisticsSection()
    device: str | None = None
    save_checkpoints: bool = False
    ray: RaySection = RaySection()

    @field_validator("models", mode="before")
    @classmethod
    def _model_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": m} if isinstance(m, str) else m for m in value]
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if any(s < 0 for s in value):
            raise ValueError(f"calibration seeds are integers >= 0, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is not None:
            import torch

            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
        return value


# --- error messages ------------------------------------------------------------------------------

EXPECTED = {"int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true or false",
            "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
            "model_type": "expected a mapping", "missing": "missing: this key is required"}


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def key_path(loc: tuple[int | str, ...]) -> str:
    """('runs', 3, 'solver', 'widths', 0) -> 'runs[3].solver.widths[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys of the section that holds ``loc``'s last key."""
    model: type[BaseModel] | None = SweepFile
    for part in loc[:-1]:
        if isinstance(part, str) and model is not None and part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _describe(err: dict[str, Any]) -> str:
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = did_you_mean(str(loc[-1]), allowed)
        return f"unknown key{' (' + hint + ')' if hint else ''}; allowed: {', '.join(allowed)}"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    if kind == "missing":
        return EXPECTED[kind]
    got = f", got {_shown(err['input'])}"
    if kind in EXPECTED:
        return EXPECTED[kind] + got
    if kind == "literal_error":
        return f"expected one of {err['ctx']['expected']}{got}"
    return err["msg"][0].lower() + err["msg"][1:] + got  # ranges: "input should be greater than or equal to 1"


def validation_message(error: ValidationError, source: str, limit: int = 5) -> str:
    """One line per problem (at most ``limit``): ``SOURCE: key.path: what is wrong``."""
    errors = error.errors()
    lines = [f"{source}: {key_path(tuple(e['loc']))}: {_describe(e)}" for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"... and {len(errors) - limit} more")
    return "\n".join(lines)


def parse_sweep_file(data: Any, source: str) -> SweepFile:
    """Validate a loaded sweep document; ValueError with every problem's key path otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of sweep keys ({', '.join(SweepFile.model_fields)}), "
                         f"got {_shown(data)}")
    try:
        return SweepFile.model_validate(data)
    except ValidationError as err:
        raise ValueError(validation_message(err, source)) from None

