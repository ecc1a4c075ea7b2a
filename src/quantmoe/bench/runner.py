"""Run a sweep into the results store: resumable, one row per finished run.

For every model: load it once, then for every (run, calibration seed) whose key is not yet
in the store: build the plan, quantize a fresh copy, evaluate it (perplexity and KL to the
full-precision reference, lm-eval tasks), measure the checkpoint, and write the row in one
transaction. A full-precision run or a run whose plan keeps every linear at 16 bits
calibrates nothing and is run once, not once per seed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quantmoe.bench.memory import PeakMemory
from quantmoe.bench.shared import ModelContext, bitmap, run_key
from quantmoe.bench.store import ResultsStore, RunRecord
from quantmoe.bench.sweep import RunSpec, SweepConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepOutcome:
    store: Path
    ran: int
    skipped: int
    seconds: float


def _seeds(run: RunSpec, config: SweepConfig) -> tuple[int | None, ...]:
    return (None,) if run.full_precision else config.seeds


def _identity(ctx: ModelContext, run: RunSpec, seed: int | None) -> dict[str, Any]:
    config = ctx.sweep
    ident: dict[str, Any] = {"run": run.identity(), "evaluation": asdict(config.eval)}
    if seed is not None:
        ident.update(seed=seed, calibration=asdict(config.calibration_for(seed)),
                     quantizer=config.quantizer.identity())
    if ctx.statistics_matter(run):
        ident["statistics"] = asdict(config.statistics)
    return ident


def _task_metrics(model: torch.nn.Module, ctx: ModelContext) -> dict[str, float]:
    ev = ctx.sweep.eval
    if not ev.tasks:
        return {}
    from quantmoe.eval.tasks import run_tasks

    results = run_tasks(model, ctx.tokenizer, list(ev.tasks), limit=ev.task_limit, batch_size=ev.task_batch_size)
    out = {f"task:{t.task}": t.value for t in results.tasks}
    out.update({f"task_stderr:{t.task}": t.stderr for t in results.tasks if t.stderr is not None})
    out["task_mean"] = results.mean
    return out


def dequantize_in_place(model: torch.nn.Module) -> None:
    """Swap every QuantLinear for the nn.Linear of its dequantized weight (the same outputs, bit for
    bit): evaluation then does not unpack the integer codes on every forward pass."""
    from quantmoe.quant.qlinear import QuantLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            model.set_submodule(name, module.dense())


def _evaluate(model: torch.nn.Module, ctx: ModelContext) -> dict[str, Any]:
    from quantmoe.eval.metrics import evaluate

    device = ctx.sweep.device
    if device is not None:
        model.to(device)
    metrics = evaluate(model, ctx.windows, ctx.reference, batch_size=ctx.sweep.eval.perplexity.batch_size).as_dict()
    metrics.update(_task_metrics(model, ctx))
    return metrics


def _checkpoint_bytes(result, ctx: ModelContext, plan, calib, gptq, store_dir: Path, label: str) -> int:
    """Save the quantized model (atomically) and measure it; kept only when the sweep asks to."""
    from quantmoe.quant import api
    from quantmoe.safeout import check_folder_output, remove_stale_temporaries

    remove_stale_temporaries(store_dir, ".checkpoint-")  # what killed runs left
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{os.getpid()}-", dir=store_dir))
    try:
        path = api.save(result, tmp / "model", ctx.tokenizer, plan, calib, gptq, ctx.spec.name, ctx.sha256)
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        if ctx.sweep.save_checkpoints:
            final = store_dir / "checkpoints" / label
            if final.exists():  # an earlier checkpoint of this run; anything else is refused, untouched
                check_folder_output(final, overwrite=True)
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            path.rename(final)
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _one_run(ctx: ModelContext, run: RunSpec, seed: int | None, key: str, store_dir: Path) -> RunRecord:
    from quantmoe.quant import api
    from quantmoe.quant.checkpoint import library_versions
    from quantmoe.quant.plan import bit_stats

    config, q = ctx.sweep, ctx.sweep.quantizer
    plan = ctx.plan_for(run)
    specs = plan.resolve(ctx.anatomy)
    stats = bit_stats(specs, ctx.anatomy.units)
    plan_bits = {name: s.bits for name, s in specs.items()}
    calib = config.calibration_for(0 if seed is None else seed)
    gptq = q.gptq()
    seconds, fallbacks, checkpoint = 0.0, (), None
    with PeakMemory() as peak:
        model = ctx.fresh_model()
        if seed is not None:
            result = api.quantize(model, ctx.tokenizer, plan, calib, gptq, device=config.device, progress=False)
            seconds, fallbacks = result.report.seconds, tuple(result.report.fallbacks)
            label = f"{Path(ctx.spec.name).name}-{run.slug}-seed{seed}"
            checkpoint = _checkpoint_bytes(result, ctx, plan, calib, gptq, store_dir, label)
            dequantize_in_place(model)
        metrics = _evaluate(model, ctx)
    del model
    return RunRecord(
        key=key, sweep=config.name, model=ctx.spec.name, model_sha256=ctx.sha256, run=run.name,
        spec=run.identity() | {"name": run.name}, seed=seed, average_bits=stats.average_bits,
        effective_bits=stats.effective_bits if seed is not None else 16.0, plan=plan_bits,
        bitmap=bitmap(ctx.anatomy, plan_bits), quantizer=asdict(q) if seed is not None else {},
        calibration=asdict(calib) if seed is not None else {}, evaluation=asdict(config.eval),
        versions=library_versions(), metrics=metrics, fallbacks=fallbacks, quant_seconds=seconds,
        peak_rss_mb=peak.rss_mb, peak_device_mb=peak.device_mb, checkpoint_bytes=checkpoint,
        created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"))


def _describe(record: RunRecord) -> str:
    m = record.metrics
    seed = "" if record.seed is None else f" seed {record.seed}"
    kl = f", KL {m['kl_mean']:.4f}" if m.get("kl_mean") is not None else ""
    tasks = f", task mean {m['task_mean']:.3f}" if "task_mean" in m else ""
    return (f"{record.model} | {record.run}{seed}: {record.average_bits:.3f} bits, ppl {m['ppl']:.2f}{kl}{tasks}"
            f" ({record.quant_seconds:.1f} s)")


def run_sweep(config: SweepConfig, store_path: str | Path | None = None, cache_dir: str | Path | None = None,
              progress: bool = True) -> SweepOutcome:
    """Run every (model, run, seed) of ``config`` not yet in the store."""
    from quantmoe.cache import cache_root

    t0 = time.perf_counter()
    store_path = Path(store_path or config.store)
    cache = cache_root(str(cache_dir) if cache_dir else None) / "bench"
    ran = skipped = 0
    with ResultsStore(store_path) as store:
        done = store.keys()
        for spec in config.models:
            ctx = ModelContext.load(spec, config, cache)
            store.put_artifact(ctx.sha256, "routing", ctx.routing_summary())
            jobs = [(run, seed) for run in config.runs if run.applies_to(spec.name) for seed in _seeds(run, config)]
            keyed = [(run, seed, run_key(ctx.sha256, _identity(ctx, run, seed))) for run, seed in jobs]
            todo = [(run, seed, key) for run, seed, key in keyed if key not in done]
            skipped += len(keyed) - len(todo)
            if len(todo) < len(keyed):
                log.info("%s: %d of %d runs already in %s", spec.name, len(keyed) - len(todo), len(keyed), store_path)
            bar = tqdm(todo, desc=spec.name, unit="run", disable=not progress)
            for run, seed, key in bar:
                bar.set_postfix_str(f"{run.name}{'' if seed is None else f' seed {seed}'}")
                record = _one_run(ctx, run, seed, key, store_path.parent)
                if store.add(record):
                    ran += 1
                    done.add(key)
                log.info("%s", _describe(record))
            del ctx
    return SweepOutcome(store=store_path, ran=ran, skipped=skipped, seconds=time.perf_counter() - t0)

