"""Run a sweep into the results store: resumable, one row per finished run.

For every model: load it once, then for every (run, calibration seed) whose key is not yet
in the store: build the plan, quantize a fresh copy, evaluate it (perplexity and KL to the
full-precision reference, lm-eval tasks), measure the checkpoint, and write the row in one
transaction. A full-precision run or a run whose plan keeps every linear at 16 bits
calibrates nothing and is run once, not once per seed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from quantmoe.bench.shared import ModelContext, bitmap, run_key
from quantmoe.bench.store import ResultsStore, RunRecord
from quantmoe.bench.sweep import RunSpec, SweepConfig
from quantmoe.memory import PeakMemory
from quantmoe.progress import quiet_library_bars, quiet_loggers, redirect_logging, sweep_bar
from quantmoe.quant.plan import Plan

log = logging.getLogger(__name__)

# per-run INFO chatter (plan bits, quantize summary, lm-eval task list): the run's one line says it
RUN_CHATTER = ("quantmoe.api", "quantmoe.eval.tasks", "quantmoe.alloc.solver", "quantmoe.alloc.solve_cli")


@dataclass(frozen=True)
class SweepOutcome:
    store: Path
    ran: int
    skipped: int
    seconds: float
    failed: int = 0  # runs recorded as failed (distributed sweeps; rerun the command to try them again)


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
    from quantmoe import api
    from quantmoe.safeout import check_folder_output, owner_tag, remove_stale_temporaries

    remove_stale_temporaries(store_dir, ".checkpoint-")  # what killed runs left
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{owner_tag()}-", dir=store_dir))
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


def pending_runs(ctx: ModelContext, done: set[str]) -> tuple[list[tuple[RunSpec, int | None, str]], int]:
    """The (run, seed, key) of ``ctx``'s model that are not in ``done``, and how many are."""
    config = ctx.sweep
    jobs = [(run, seed) for run in config.runs if run.applies_to(ctx.spec.name) for seed in _seeds(run, config)]
    keyed = [(run, seed, run_key(ctx.sha256, _identity(ctx, run, seed))) for run, seed in jobs]
    todo = [(run, seed, key) for run, seed, key in keyed if key not in done]
    return todo, len(keyed) - len(todo)


def one_run(ctx: ModelContext, run: RunSpec, seed: int | None, key: str, store_dir: Path,
            plan: Plan | None = None) -> tuple[RunRecord, float]:
    """Quantize (unless full precision) and evaluate one run: its record and its evaluation time in
    seconds; ``plan``: the run's plan when already built."""
    from quantmoe import api
    from quantmoe.quant.checkpoint import library_versions
    from quantmoe.quant.plan import bit_stats

    config, q = ctx.sweep, ctx.sweep.quantizer
    plan = plan if plan is not None else ctx.plan_for(run)
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
        t_eval = time.perf_counter()
        metrics = _evaluate(model, ctx)
        eval_seconds = time.perf_counter() - t_eval
    del model
    return RunRecord(
        key=key, sweep=config.name, model=ctx.spec.name, model_sha256=ctx.sha256, run=run.name,
        spec=run.identity() | {"name": run.name}, seed=seed, average_bits=stats.average_bits,
        effective_bits=stats.effective_bits if seed is not None else 16.0, plan=plan_bits,
        bitmap=bitmap(ctx.anatomy, plan_bits), quantizer=asdict(q) if seed is not None else {},
        calibration=asdict(calib) if seed is not None else {}, evaluation=asdict(config.eval),
        versions=library_versions(), metrics=metrics, fallbacks=fallbacks, quant_seconds=seconds,
        peak_rss_mb=peak.rss_mb, peak_device_mb=peak.device_mb, checkpoint_bytes=checkpoint,
        created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        engines=_engines(ctx.anatomy.units, specs) if seed is not None else {}), eval_seconds


def _engines(units, specs) -> dict[str, str]:
    """Per serving engine, "" when it loads the plan's GPTQ export, else the first reason it cannot."""
    from quantmoe.export.engines import servable

    out = {}
    for engine, found in servable(units, specs).items():
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        out[engine] = f"{found[0]}{more}" if found else ""
    return out


def describe(record: RunRecord, total: float | None = None, eval_seconds: float | None = None) -> str:
    m = record.metrics
    seed = "" if record.seed is None else f" seed {record.seed}"
    kl = f", KL {m['kl_mean']:.4f}" if m.get("kl_mean") is not None else ""
    tasks = f", task mean {m['task_mean']:.3f}" if "task_mean" in m else ""
    line = f"{record.model} | {record.run}{seed}: {record.average_bits:.3f} bits, ppl {m['ppl']:.2f}{kl}{tasks}"
    if total is not None:
        line += f" | {total:.1f} s (quantize {record.quant_seconds:.1f} s"
        line += ")" if eval_seconds is None else f", evaluate {eval_seconds:.1f} s)"
    return line


def run_sweep(config: SweepConfig, store_path: str | Path | None = None, cache_dir: str | Path | None = None,
              progress: bool = True) -> SweepOutcome:
    """Run every (model, run, seed) of ``config`` not yet in the store."""
    from quantmoe.cache import cache_root

    t0 = time.perf_counter()
    store_path = Path(store_path or config.store)
    cache = cache_root(str(cache_dir) if cache_dir else None) / "bench"
    ran = skipped = 0
    from quantmoe.bench.preflight import check_sweep

    check_sweep(config)  # on the configs alone: a bad plan fails before any weights load
    jobs_of = {spec.name: [(run, seed) for run in config.runs if run.applies_to(spec.name)
                           for seed in _seeds(run, config)] for spec in config.models}
    with ResultsStore(store_path) as store, redirect_logging(progress), \
            sweep_bar(sum(map(len, jobs_of.values())), progress) as bar:
        done = store.keys()
        for spec in config.models:
            bar.set_postfix_str(f"{spec.name}: loading weights, statistics", refresh=True)
            with quiet_library_bars():
                ctx = ModelContext.load(spec, config, cache)
                store.put_artifact(ctx.sha256, "routing", ctx.routing_summary())
            todo, already = pending_runs(ctx, done)
            skipped += already
            if already:
                log.info("%s: %d of %d runs already in %s", spec.name, already, already + len(todo), store_path)
                bar.total -= already  # the time left counts only the runs still to do
            for run, seed, key in todo:
                bar.set_postfix_str(f"{spec.name} | {run.name}{'' if seed is None else f' seed {seed}'}",
                                    refresh=True)
                t_run = time.perf_counter()
                with quiet_library_bars(), quiet_loggers(RUN_CHATTER if progress else ()):
                    record, eval_seconds = one_run(ctx, run, seed, key, store_path.parent)
                if store.add(record):
                    ran += 1
                    done.add(key)
                log.info("%s", describe(record, time.perf_counter() - t_run, eval_seconds))
                bar.update()
            del ctx
    return SweepOutcome(store=store_path, ran=ran, skipped=skipped, seconds=time.perf_counter() - t0)

