"""A sweep file: models x runs (plans, policies, the solver) x calibration seeds x metrics.

Example ``sweep.yaml`` (every key but ``models`` and ``runs`` is optional)::

    name: demo
    store: runs/demo/results.sqlite      # relative to the current folder
    models: [mixtral-s, deepseek-s]      # embedded names, local folders or hub ids
    seeds: [0, 1, 2]                     # calibration seeds
    calibration: {split: calibration, num_windows: 64, seq_len: 256}
    quantizer: {method: gptq, group_size: 128, symmetric: true, damp: 0.01}
    eval:
      perplexity: {split: test, seq_len: 256, max_windows: 96}
      tasks: [qmoe_ending, qmoe_cloze]  # lm-eval tasks (empty: none)
    runs:
      - {name: full precision, full_precision: true}
      - {name: uniform 2-bit, policy: "uniform=2"}
      - {name: attention 4 / experts 2, policy: "experts=2,attention=4,shared=4"}
      - {name: solver 2.5, solver: {target_bits: 2.5}}

A run is a ``policy`` (compact rules, a preset name or a policy YAML file; see ``quantmoe
plan --help``), a ``plan`` (a plan YAML file), ``solver`` settings (the budget solver), or
``full_precision``. Every value is type- and range-checked first (``sweep_schema.py``, strict:
nothing is coerced); errors name the key path. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from quantmoe.calib.data import CalibrationConfig
from quantmoe.suggest import did_you_mean
from quantmoe.yamlfile import read_yaml

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSpec:
    """A model of the sweep: an embedded name, a local folder or a hub id."""

    name: str
    dtype: str = "float32"  # float32, bfloat16 or float16 (hub models: bfloat16)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class QuantizerSettings:
    method: str = "gptq"  # gptq or rtn
    group_size: int | None = 128
    symmetric: bool = True
    clip: str = "none"  # range search of each group: none, mse or hmse (quantmoe.quant.grid)
    damp: float = 0.01
    act_order: bool | str = False  # none, desc or gar; recorded false/true for none/desc (as before the modes)
    moe_mode: str = "routed"
    min_expert_tokens: int = 16
    block_size: int = 128  # GPTQ columns per lazy-update block
    static_groups: bool = False  # GPTQ group scale/zero from the unquantized weight
    rotate: bool = False  # residual-stream rotation folded into the weights first (quant/rotate.py)
    refine: int = 0  # sweeps of coordinate descent on GPTQ's codes (quant/gptq.py refine_codes)
    tune_steps: int = 0  # Adam steps of block-output scale tuning (quant/blocktune.py)
    tune_lr: float = 0.005

    def __post_init__(self) -> None:
        from quantmoe.quant.gptq import act_order_record
        from quantmoe.quant.grid import QuantSpec

        QuantSpec(bits=4, group_size=self.group_size, symmetric=self.symmetric, clip=self.clip)
        # kept as recorded (false, true or "gar"), so that rows stored before the modes keep their keys
        object.__setattr__(self, "act_order", act_order_record(self.act_order))
        self.gptq()  # validates now

    def gptq(self):
        from quantmoe.quant.pipeline import GPTQConfig

        return GPTQConfig(method=self.method, damp=self.damp, act_order=self.act_order, block_size=self.block_size,
                          static_groups=self.static_groups, rotate=self.rotate, refine=self.refine,
                          tune_steps=self.tune_steps, tune_lr=self.tune_lr)

    def identity(self) -> dict[str, Any]:
        """What these settings compute: settings added after the first stores count only when not at their
        default, so that rows stored before them keep their keys."""
        out = asdict(self)
        for key, default in (("block_size", 128), ("static_groups", False), ("clip", "none"), ("rotate", False),
                             ("refine", 0), ("tune_steps", 0), ("tune_lr", 0.005)):
            if out[key] == default:
                del out[key]
        return out


@dataclass(frozen=True)
class PerplexitySettings:
    split: str = "test"
    seq_len: int = 256
    max_windows: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.seq_len < 2 or (self.max_windows is not None and self.max_windows < 1):
            raise ValueError("check `eval.perplexity`: seq_len >= 2 and max_windows >= 1 (or null for all)")


@dataclass(frozen=True)
class EvalSettings:
    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None  # items per lm-eval task (None: all)
    task_batch_size: int = 16


@dataclass(frozen=True)
class StatisticsSettings:
    """Where the data-driven policies' statistics (routing, scorers, predictor) and the
    solver's damage table come from: computed once per model on the full-precision model."""

    split: str = "calibration"
    rank_split: str = "validation"
    windows: int = 64
    seq_len: int = 256
    seed: int = 0
    massive_threshold: float = 1000.0
    damage_windows: int = 32
    damage_metric: str = "fisher"


@dataclass(frozen=True)
class SolverSettings:
    target_bits: float
    widths: tuple[int, ...] = (2, 3, 4)
    granularity: str = "linear"
    tolerance: float = 0.01
    min_bits: Mapping[str, int] | None = None
    max_bits: Mapping[str, int] | None = None
    time_limit: float = 120.0  # seconds; then the best plan found, reported with its gap
    budget: str = "effective"  # effective bits (codes, scales, zeros) or average bits (the paper's)
    menu: tuple[str, ...] = ()  # choices like "3/g64/asym/hmse" (quantmoe.alloc.menu); parts left out: g128/sym/none

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "menu", tuple(self.menu))
        self.config()  # validates now

    def config(self):
        from quantmoe.alloc.solver import SolverConfig

        return SolverConfig(target_bits=self.target_bits, widths=self.widths, granularity=self.granularity,
                            tolerance=self.tolerance, role_min_bits=self.min_bits, role_max_bits=self.max_bits,
                            time_limit=self.time_limit, budget=self.budget, menu=self.menu_specs())

    def menu_specs(self):
        from quantmoe.alloc.menu import parse_choice, unique
        from quantmoe.quant.grid import QuantSpec

        return unique(parse_choice(c, QuantSpec(4)) for c in self.menu)


@dataclass(frozen=True)
class RaySettings:
    """What one (model, run, seed) task asks of a Ray cluster (``quantmoe bench --ray``), and how often a
    failed task is tried again. Scheduling only: not part of a run's identity."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gb: float | None = None  # None: no memory reservation
    max_retries: int = 2  # extra attempts after a crash or a dead worker; then the run is recorded as failed

    def __post_init__(self) -> None:
        if self.num_cpus <= 0 or self.num_gpus < 0 or (self.memory_gb is not None and self.memory_gb <= 0):
            raise ValueError("check `ray`: num_cpus > 0, num_gpus >= 0 and memory_gb > 0 (or null)")
        if self.max_retries < 0:
            raise ValueError(f"check `ray.max_retries`: {self.max_retries} is negative")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of Ray's ``.options()``."""
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_retries": self.max_retries,
                               "retry_exceptions": True}
        if self.memory_gb is not None:
            out["memory"] = int(self.memory_gb * 2**30)
        return out


@dataclass(frozen=True)
class RunSpec:
    """One allocation of the sweep; exactly one of policy, plan, solver, full_precision."""

    name: str
    policy: str | None = None
    plan: str | None = None
    solver: SolverSettings | None = None
    full_precision: bool = False
    models: tuple[str, ...] | None = None  # only these models of the sweep (default: all)

    def __post_init__(self) -> None:
        chosen = [k for k in ("policy", "plan", "solver") if getattr(self, k) is not None] + (
            ["full_precision"] if self.full_precision else [])
        if len(chosen) != 1:
            raise ValueError(f"check run {self.name!r}: give exactly one of policy, plan, solver, full_precision "
                             f"(got {', '.join(chosen) or 'none'})")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.name).strip("-").lower()

    def applies_to(self, model: str) -> bool:
        return self.models is None or model in self.models

    def identity(self) -> dict[str, Any]:
        """What the run computes (the name and model filter are labels and not part of it)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("name", "models") and v not in (None, False)}
        if self.solver is not None:  # settings added later count only when set: earlier rows keep their keys
            for key, old in (("time_limit", 120.0), ("budget", "average"), ("menu", ())):
                if getattr(self.solver, key) == old:
                    del out["solver"][key]
        if self.plan is not None:  # a plan file counts by its content
            out["plan"] = hashlib.sha256(Path(self.plan).read_bytes()).hexdigest()
        return out


@dataclass(frozen=True)
class SweepConfig:
    name: str
    models: tuple[ModelSpec, ...]
    runs: tuple[RunSpec, ...]
    seeds: tuple[int, ...] = (0,)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantizer: QuantizerSettings = field(default_factory=QuantizerSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    store: str = "runs/results.sqlite"
    device: str | None = None  # where each block is quantized (None: where the model is)
    save_checkpoints: bool = False  # keep every quantized checkpoint beside the store
    ray: RaySettings = field(default_factory=RaySettings)  # resources per run under `quantmoe bench --ray`

    def __post_init__(self) -> None:
        if not self.models or not self.runs:
            raise ValueError("check the sweep: it needs at least one model and one run")
        if not self.seeds:
            raise ValueError("check `seeds`: give at least one calibration seed")
        names = [r.name for r in self.runs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"check `runs`: run names must be unique ({', '.join(sorted(dup))} repeated)")
        known = [m.name for m in self.models]
        for run in self.runs:
            for name in run.models or ():
                if name not in known:
                    hint = did_you_mean(name, known)
                    raise ValueError(f"check run {run.name!r}: `models` names {name!r}, which is not a model of "
                                     f"the sweep{' (' + hint + ')' if hint else ''}")

    def calibration_for(self, seed: int) -> CalibrationConfig:
        from dataclasses import replace

        return replace(self.calibration, seed=seed, moe_mode=self.quantizer.moe_mode,
                       min_expert_tokens=self.quantizer.min_expert_tokens)


def _build(where: str, make: Callable[[], T]) -> T:
    """Run a dataclass constructor; its ValueError gets the key path in front."""
    try:
        return make()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _run_from(entry, where: str) -> RunSpec:
    data = entry.model_dump(exclude_unset=True)
    if data.get("policy") is not None:  # validated now; a YAML list of rules becomes its compact form
        from quantmoe.alloc.presets import format_policy, parse_policy

        policy = data["policy"]
        rules = _build(f"{where}.policy", lambda: parse_policy(policy))
        data["policy"] = format_policy(rules) if isinstance(policy, list) else policy
    if data.get("plan") is not None and not Path(data["plan"]).is_file():
        raise ValueError(f"{where}.plan: plan file {data['plan']} not found (paths are relative to the current folder)")
    if data.get("solver") is not None:
        solver = data["solver"]
        data["solver"] = _build(f"{where}.solver", lambda: SolverSettings(**solver))
    if data.get("models") is not None:
        data["models"] = tuple(data["models"])
    return _build(where, lambda: RunSpec(**data))


def sweep_from_dict(data: Any, source: str = "the sweep") -> SweepConfig:
    """Validate a loaded sweep document (types and ranges, then the cross-field rules) into a SweepConfig."""
    from quantmoe.bench.sweep_schema import parse_sweep_file

    doc = parse_sweep_file(data, source)
    given = doc.model_dump(exclude_unset=True)  # unset keys take the dataclasses' defaults

    def section(key: str, cls: type[T]) -> T:
        values = given.get(key, {})
        return _build(f"{source}: {key}", lambda: cls(**values))

    ev = dict(given.get("eval", {}))
    ev["perplexity"] = _build(f"{source}: eval.perplexity",
                              lambda: PerplexitySettings(**ev.get("perplexity", {})))
    if "tasks" in ev:
        ev["tasks"] = tuple(ev["tasks"])
    kwargs: dict[str, Any] = dict(
        name=doc.name if doc.name is not None else Path(source).stem,
        models=tuple(_build(f"{source}: models[{i}]", lambda m=m: ModelSpec(**m))
                     for i, m in enumerate(given["models"])),
        runs=tuple(_run_from(r, f"{source}: runs[{i}]") for i, r in enumerate(doc.runs)),
        calibration=section("calibration", CalibrationConfig), quantizer=section("quantizer", QuantizerSettings),
        eval=_build(f"{source}: eval", lambda: EvalSettings(**ev)),
        statistics=section("statistics", StatisticsSettings), ray=section("ray", RaySettings))
    if "seeds" in given:
        kwargs["seeds"] = tuple(given["seeds"])
    kwargs.update({k: given[k] for k in ("store", "device", "save_checkpoints") if k in given})
    return _build(source, lambda: SweepConfig(**kwargs))


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    data = read_yaml(path, "sweep file")
    return sweep_from_dict(data, str(path))
