"""A stored run's plan as a plan YAML file (for ``quantmoe quantize --plan``).

The store keeps every run's bits per module and its quantizer settings; that is the whole
plan. The file gives the most common width as ``default`` and lists the other modules.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantmoe.bench.store import ResultsStore, RunRecord
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.plan import Plan


def plan_of(record: RunRecord) -> Plan:
    """The plan a stored run quantized with (exactly: every module gets its stored bits)."""
    q = record.quantizer or {}
    group_size, symmetric, clip = q.get("group_size", 128), q.get("symmetric", True), q.get("clip", "none")
    common = Counter(record.plan.values()).most_common(1)[0][0] if record.plan else 16
    default = QuantSpec(bits=common, group_size=group_size, symmetric=symmetric, clip=clip)
    return Plan(default=default, modules={n: {"bits": b} for n, b in sorted(record.plan.items()) if b != common})


def plan_yaml(record: RunRecord) -> str:
    seed = "" if record.seed is None else f", calibration seed {record.seed}"
    return (f"# plan of run {record.run!r} of sweep {record.sweep!r} on {record.model}{seed}\n"
            f"# model sha256 {record.model_sha256[:16]}, average bits {record.average_bits:.4f}\n"
            f"# quantmoe quantize {record.model} --plan THIS_FILE --out DIR\n" + plan_of(record).to_yaml())


def find_run(store_path: Path, run: str, model: str | None = None, seed: int | None = None,
             sweep: str | None = None) -> RunRecord:
    """The latest stored row of ``run`` (and ``model``/``seed``/``sweep`` when given); clear errors otherwise."""
    with ResultsStore(store_path, create=False) as store:
        records = store.records(sweep=sweep)
    names = sorted({r.run for r in records})
    rows = [r for r in records if r.run == run]
    if not rows:
        raise ValueError(f"no run named {run!r} in {store_path}: choose one of {', '.join(names) or '(none)'}")
    models = sorted({r.model for r in rows})
    if model is None and len(models) > 1:
        raise ValueError(f"run {run!r} was stored for {', '.join(models)}: choose one with --model")
    rows = [r for r in rows if model is None or r.model == model]
    if not rows:
        raise ValueError(f"run {run!r} has no rows for model {model!r}: it has {', '.join(models)}")
    if seed is not None:
        seeds = sorted({r.seed for r in rows if r.seed is not None})
        rows = [r for r in rows if r.seed == seed]
        if not rows:
            raise ValueError(f"run {run!r} has no calibration seed {seed}: it has {', '.join(map(str, seeds)) or 'none'}")
    return sorted(rows, key=lambda r: (r.created_at, r.key))[-1]
