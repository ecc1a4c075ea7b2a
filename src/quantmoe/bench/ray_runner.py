"""Run a sweep on a Ray cluster: each (model, run, calibration seed) is one Ray task.

The driver does, per model, what every run of it shares (the reference log-probabilities,
the routing statistics and scorers, the solver's damage table: all cached on disk under the
cache folder, keyed by content) and builds each run's plan, then submits one task per
pending (run, seed) with the resources of the sweep's ``ray`` section. A task loads the model
itself (a worker keeps the last one it loaded), reads the shared work from the cache folder,
quantizes and evaluates, and returns its row. Only the driver writes the results store, one
row per finished task as it arrives, exactly as the local runner does: resume, identical
reruns and reports are unchanged. A task that raises or whose worker dies is retried
``ray.max_retries`` times, then recorded in the store's ``failures`` table with its error
and run again by the next invocation.

Paths in the sweep (local model folders, plan files, the store and the cache folder) must be
readable at the same path on every node of a cluster (a shared file system).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quantmoe.bench.runner import SweepOutcome, describe, one_run, pending_runs
from quantmoe.bench.shared import ModelContext
from quantmoe.bench.store import FailedRun, ResultsStore, RunRecord
from quantmoe.bench.sweep import ModelSpec, RunSpec, SweepConfig
from quantmoe.quant.plan import Plan

log = logging.getLogger(__name__)

LOCAL_CPUS = 2  # `--ray` without an address: a local Ray instance with this many CPUs

# environment the workers need to find models and caches the way the driver does
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_DATASETS_CACHE", "TOKENIZERS_PARALLELISM", "QUANTMOE_CACHE")


@dataclass(frozen=True)
class RunTask:
    """Everything a worker needs to compute one row (absolute paths; ``cwd`` for the sweep's relative ones)."""

    spec: ModelSpec
    sweep: SweepConfig
    sha256: str  # the driver's weight hash: a worker that loads other weights fails instead of storing them
    run: RunSpec
    seed: int | None
    key: str
    plan: Plan
    cache_dir: str
    store_dir: str
    cwd: str
    threads: int


_WORKER: dict[str, ModelContext] = {}  # the model context a worker process loaded last


def _context(task: RunTask) -> ModelContext:
    ctx = _WORKER.get("ctx")
    if ctx is None or ctx.sha256 != task.sha256 or ctx.spec != task.spec or ctx.sweep != task.sweep:
        _WORKER.clear()  # free the previous model before loading the next
        ctx = ModelContext.load(task.spec, task.sweep, Path(task.cache_dir))
        if ctx.sha256 != task.sha256:
            raise RuntimeError(f"model {task.spec.name} on this worker has weights {ctx.sha256[:12]}, the driver's "
                               f"have {task.sha256[:12]}: every node must see the same model files")
        _WORKER["ctx"] = ctx
    return ctx


def execute(task: RunTask) -> RunRecord:
    """One (model, run, seed) on a worker: quantize, evaluate, return the row (the driver stores it)."""
    torch.set_num_threads(task.threads)
    with contextlib.chdir(task.cwd):
        return one_run(_context(task), task.run, task.seed, task.key, Path(task.store_dir), plan=task.plan)[0]


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("`--ray` needs Ray: pip install 'quantmoe[ray]'") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address`` (or start a local instance); True when this call started Ray."""
    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                              "logging_level": logging.WARNING}
    if address is None:
        ray.init(num_cpus=LOCAL_CPUS, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def _error_text(err: Exception) -> str:
    cause = getattr(err, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0] if first else ''}"


def run_sweep_ray(config: SweepConfig, store_path: str | Path | None = None, cache_dir: str | Path | None = None,
                  address: str | None = None, progress: bool = True, threads: int | None = None,
                  task_fn: Callable[[RunTask], RunRecord] = execute) -> SweepOutcome:
    """Run every (model, run, seed) of ``config`` not yet in the store as Ray tasks (see the module docstring).

    ``address``: a Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``); None starts a local Ray.
    ``threads``: torch threads per task (default: the task's ``ray.num_cpus``, at least 1).
    ``task_fn``: what a task runs (``execute``; a wrapper of it to inject faults).
    """
    from quantmoe.bench.preflight import check_sweep
    from quantmoe.cache import cache_root

    check_sweep(config)  # on the configs alone: a bad plan fails before Ray starts or any weights load
    ray = _ray()
    t0 = time.perf_counter()
    store_path = Path(store_path or config.store).absolute()
    cache = (cache_root(str(cache_dir) if cache_dir else None) / "bench").absolute()
    per_task = threads or max(1, int(config.ray.num_cpus))
    started = _connect(ray, address)
    ran = skipped = failed = 0
    try:
        remote = ray.remote(task_fn).options(**config.ray.options())
        with ResultsStore(store_path) as store:
            done = store.keys()
            pending: dict[Any, RunTask] = {}
            for spec in config.models:
                ctx = ModelContext.load(spec, config, cache)
                store.put_artifact(ctx.sha256, "routing", ctx.routing_summary())
                todo, already = pending_runs(ctx, done)
                skipped += already
                if already:
                    log.info("%s: %d of %d runs already in %s", spec.name, already, already + len(todo), store_path)
                if todo:
                    ctx.reference  # noqa: B018 -- computed once here, read from the cache folder by every task
                plans = {run.name: ctx.plan_for(run) for run, _, _ in todo}  # the shared statistics, once
                for run, seed, key in todo:
                    task = RunTask(spec=spec, sweep=config, sha256=ctx.sha256, run=run, seed=seed, key=key,
                                   plan=plans[run.name], cache_dir=str(cache), store_dir=str(store_path.parent),
                                   cwd=os.getcwd(), threads=per_task)
                    pending[remote.remote(task)] = task
                del ctx
            bar = tqdm(total=len(pending), desc=config.name, unit="run", disable=not progress)
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayError as err:
                    failed += 1
                    store.add_failure(FailedRun(
                        key=task.key, sweep=config.name, model=task.spec.name, run=task.run.name, seed=task.seed,
                        attempts=config.ray.max_retries + 1, error=_error_text(err),
                        created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds")))
                    log.error("%s | %s%s failed after %d attempts: %s", task.spec.name, task.run.name,
                              "" if task.seed is None else f" seed {task.seed}", config.ray.max_retries + 1,
                              _error_text(err))
                else:
                    if store.add(record):
                        ran += 1
                        done.add(record.key)
                    log.info("%s", describe(record))
                bar.update()
            bar.close()
    finally:
        if started:
            ray.shutdown()
    return SweepOutcome(store=store_path, ran=ran, skipped=skipped, seconds=time.perf_counter() - t0, failed=failed)
