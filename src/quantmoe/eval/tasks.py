"""lm-evaluation-harness tasks on an in-memory model.

The model goes through lm-eval's own ``HFLM`` wrapper and ``simple_evaluate``; nothing of
the harness is reimplemented here. Every task reports one headline metric (``HEADLINE``:
the paper's choice for its six tasks, else the task's first metric), and the headline of
a run is the plain mean of those, as in the paper's tables.

The local suite of the embedded models (``LOCAL_TASKS``, tag ``qmoe_suite``) lives in
``embedded/tasks/`` as lm-eval YAML over JSONL and is registered automatically.

Example::

    >>> model, tokenizer = load_model("mixtral-s")  # doctest: +SKIP
    >>> res = run_tasks(model, tokenizer, ["qmoe_suite"])  # doctest: +SKIP
    >>> res.mean, [(s.task, s.metric, round(s.value, 3)) for s in res.tasks]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from quantmoe.data.hfcache import ensure_datasets_cache
from quantmoe.suggest import did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Headline:
    metric: str
    num_fewshot: int


PAPER_TASKS = ("winogrande", "copa", "openbookqa", "hellaswag", "piqa", "mmlu")
LOCAL_TASKS = ("qmoe_cloze", "qmoe_ending")
LOCAL_SUITE = "qmoe_suite"  # lm-eval tag of LOCAL_TASKS
LOCAL_PREFIX = "qmoe_"
HEADLINE: dict[str, Headline] = {
    "winogrande": Headline("acc", 0),
    "copa": Headline("acc", 0),
    "openbookqa": Headline("acc_norm", 0),
    "hellaswag": Headline("acc_norm", 0),
    "piqa": Headline("acc", 0),
    "mmlu": Headline("acc", 5),
    "qmoe_ending": Headline("acc_norm", 0),
    "qmoe_cloze": Headline("acc", 0),
}
DEFAULT_BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics only; mean metrics have a closed form

# lm-eval warns about these on every in-memory run; they say nothing about this one
_EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Custom kwargs can be passed to `--metadata`",
                      "Passed an already-initialized model", "Overwriting default num_fewshot")


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str  # headline metric
    value: float
    stderr: float | None
    num_fewshot: int | None  # None: the task's own default
    samples: int  # documents evaluated


@dataclass(frozen=True)
class TaskResults:
    tasks: tuple[TaskScore, ...]
    limit: int | None
    seconds: float

    @property
    def mean(self) -> float:
        """Plain mean of the headline metrics (the paper's headline number)."""
        return sum(s.value for s in self.tasks) / len(self.tasks)

    def __getitem__(self, task: str) -> TaskScore:
        for s in self.tasks:
            if s.task == task:
                return s
        raise KeyError(f"{task!r} was not run: {', '.join(s.task for s in self.tasks)}")

    def as_dict(self) -> dict[str, object]:
        return {"mean": self.mean, "limit": self.limit, "seconds": self.seconds,
                "tasks": {s.task: dict(s.__dict__) for s in self.tasks}}


def local_tasks_dir() -> Path:
    """``embedded/tasks``: the YAML and JSONL of the local suite."""
    from quantmoe.models import embedded_root

    return embedded_root() / "tasks"


@functools.cache
def task_manager(include_defaults: bool = True):
    """lm-eval's TaskManager with the local suite; ``include_defaults=False`` indexes the
    local suite alone (milliseconds, instead of seconds for lm-eval's ~15,000 tasks)."""
    ensure_datasets_cache()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(local_tasks_dir()), include_defaults=include_defaults)


def resolve_tasks(names: Sequence[str], manager) -> list[str]:
    """Task and group names to run, in order: tags become their member tasks; an unknown
    name is a ValueError with the closest known names."""
    out: list[str] = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is None:
            hint = did_you_mean(name, manager.all_tasks) or "see `lm-eval ls tasks`"
            raise ValueError(f"unknown task {name!r}: {hint} (local suite: {', '.join(LOCAL_TASKS)})")
        members = sorted(entry.tags) if name in manager.all_tags else [name]
        out.extend(m for m in members if m not in out)
    return out


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _EXPECTED_WARNINGS)


@contextmanager
def _quiet_lm_eval(level: int) -> Iterator[None]:
    """lm-eval logs at ``level`` and without its expected warnings, for the run only."""
    import datasets

    root = logging.getLogger("lm_eval")
    noisy = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.evaluator")]
    saved = root.level
    bars = datasets.is_progress_bar_enabled()
    drop = _DropExpected()
    root.setLevel(level)
    for logger in noisy:
        logger.addFilter(drop)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        root.setLevel(saved)
        for logger in noisy:
            logger.removeFilter(drop)
        if bars:
            datasets.enable_progress_bars()


def _headline_metric(task: str, row: dict) -> str:
    if task in HEADLINE:
        return HEADLINE[task].metric
    for key in row:  # lm-eval keeps the task's metric order: "acc,none", "acc_stderr,none", ...
        metric, _, _filter = key.partition(",")
        if _filter and not metric.endswith("_stderr"):
            return metric
    raise ValueError(f"lm-eval reported no metric for {task!r} (a group without aggregate metrics?): "
                     "ask for its tasks instead")


def _score(task: str, results: dict, num_fewshot: int | None) -> TaskScore:
    row = results["results"][task]
    metric = _headline_metric(task, row)
    key = next((k for k in row if k.partition(",")[0] == metric), None)
    if key is None:
        raise ValueError(f"{task!r} reports no {metric!r}: it has {', '.join(sorted(row))}")
    stderr = row.get(key.replace(",", "_stderr,", 1))
    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    return TaskScore(task, metric, float(row[key]), stderr, num_fewshot, _samples(task, results))


def _samples(name: str, results: dict) -> int:
    """Documents evaluated for a task, or summed over a group's tasks."""
    counts = results.get("n-samples", {})
    if name in counts:
        return int(counts[name]["effective"])
    return sum(_samples(child, results) for child in results.get("group_subtasks", {}).get(name, []))


def run_tasks(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 16, seed: int = 0,
              bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS, log_level: int = logging.WARNING) -> TaskResults:
    """Evaluate ``model`` (in memory, on its own device) on lm-eval tasks.

    ``tasks``: lm-eval task, group or tag names; ``qmoe_suite`` is the local suite. The
    few-shot count is ``num_fewshot`` when given, else the paper's (``HEADLINE``), else
    the task's own. ``limit``: the first documents of each task only (for quick checks:
    the numbers are then not comparable with the literature). Seeds (Python, NumPy,
    torch, few-shot sampling) are all ``seed``, so a rerun gives the same numbers.
    """
    if not tasks:
        raise ValueError("check `tasks`: give at least one lm-eval task name")
    if limit is not None and limit < 1:
        raise ValueError(f"check `limit`: {limit} is not a positive number of documents")
    ensure_datasets_cache()
    local = task_manager(include_defaults=False)  # qmoe_* names are the local suite's alone
    only_local = all(t in local.task_index or t.startswith(LOCAL_PREFIX) for t in tasks)
    manager = local if only_local else task_manager(include_defaults=True)
    names = resolve_tasks(tasks, manager)
    start = time.perf_counter()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    shots = {n: num_fewshot if num_fewshot is not None else (HEADLINE[n].num_fewshot if n in HEADLINE else None)
             for n in names}
    scores: dict[str, TaskScore] = {}
    was_training = model.training
    model.eval()
    try:
        with _quiet_lm_eval(log_level):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            for k in dict.fromkeys(shots.values()):  # one harness call per few-shot count
                batch = [n for n in names if shots[n] == k]
                log.info("lm-eval: %s (%s-shot%s)", ", ".join(batch), "default" if k is None else k,
                         "" if limit is None else f", first {limit} documents")
                results = simple_evaluate(lm, tasks=batch, num_fewshot=k, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
                for n in batch:
                    scores[n] = _score(n, results, k)
    finally:
        model.train(was_training)
    return TaskResults(tuple(scores[n] for n in names), limit, time.perf_counter() - start)


def format_results(res: TaskResults, title: str = "") -> str:
    """A small plain-text table: task, metric, value +- stderr, shots, documents; then the mean."""
    head = f"{'task':<16} {'metric':<9} {'value':>7} {'stderr':>7} {'shots':>5} {'docs':>6}"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for s in res.tasks:
        stderr = f"{s.stderr:.4f}" if s.stderr is not None else "-"
        shots = "-" if s.num_fewshot is None else str(s.num_fewshot)
        lines.append(f"{s.task:<16} {s.metric:<9} {s.value:>7.4f} {stderr:>7} {shots:>5} {s.samples:>6}")
    lines.append(f"{'mean':<16} {'':<9} {res.mean:>7.4f}")
    return "\n".join(lines)
