"""Aggregate stored runs over calibration seeds: mean and standard deviation per (model, run)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantmoe.bench.store import ResultsStore, RunRecord

# headline metrics: (key, column title, format, lower is better)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("ppl", "ppl", "{:.2f}", True),
    ("kl_mean", "KL", "{:.4f}", True),
    ("kl_p99", "KL p99", "{:.3f}", True),
    ("top1_agreement", "top-1", "{:.3f}", False),
    ("task_mean", "task mean", "{:.3f}", False),
)


def default_report_dir(store: Path) -> Path:
    """Where `quantmoe bench`, `quantmoe report` and the demo put the report of a store."""
    return Path(store).parent / "report"


@dataclass(frozen=True)
class Aggregate:
    model: str
    run: str
    seeds: tuple[int | None, ...]
    average_bits: float
    effective_bits: float
    mean: dict[str, float]
    std: dict[str, float]  # sample standard deviation over seeds (0 for a single run)
    quant_seconds: float  # mean
    peak_rss_mb: float  # max
    checkpoint_bytes: int | None
    records: tuple[RunRecord, ...]

    @property
    def n(self) -> int:
        return len(self.records)


def aggregate(records: Sequence[RunRecord]) -> list[Aggregate]:
    """One Aggregate per (model, run), in first-seen order."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.model, r.run), []).append(r)
    out = []
    for (model, run), rs in groups.items():
        rs.sort(key=lambda r: -1 if r.seed is None else r.seed)
        keys = sorted({k for r in rs for k, v in r.metrics.items() if isinstance(v, (int, float))})
        mean, std = {}, {}
        for k in keys:
            vals = np.array([r.metrics[k] for r in rs if isinstance(r.metrics.get(k), (int, float))], dtype=float)
            mean[k] = float(vals.mean())
            std[k] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        sizes = [r.checkpoint_bytes for r in rs if r.checkpoint_bytes is not None]
        out.append(Aggregate(model=model, run=run, seeds=tuple(r.seed for r in rs),
                             average_bits=float(np.mean([r.average_bits for r in rs])),
                             effective_bits=float(np.mean([r.effective_bits for r in rs])), mean=mean, std=std,
                             quant_seconds=float(np.mean([r.quant_seconds for r in rs])),
                             peak_rss_mb=max(r.peak_rss_mb for r in rs),
                             checkpoint_bytes=int(np.mean(sizes)) if sizes else None, records=tuple(rs)))
    return out


def _cell(agg: Aggregate, key: str, fmt: str) -> str:
    if key not in agg.mean:
        return "-"
    text = fmt.format(agg.mean[key])
    return f"{text} ± {fmt.format(agg.std[key])}" if agg.n > 1 else text


def format_table(aggs: Sequence[Aggregate], model: str | None = None) -> str:
    """A Markdown table: bits, headline metrics as mean ± std over seeds, time and size."""
    rows = [a for a in aggs if model is None or a.model == model]
    present = [(k, t, f) for k, t, f, _ in METRICS if any(k in a.mean for a in rows)]
    head = ["model"] * (model is None) + ["run", "avg bits", "eff. bits", "seeds"] + [t for _, t, _ in present] + [
        "quantize s", "size MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in sorted(rows, key=lambda a: (a.model, -a.average_bits, a.run)):
        size = f"{a.checkpoint_bytes / 1e6:.2f}" if a.checkpoint_bytes else "-"
        cells = [a.model] * (model is None) + [a.run, f"{a.average_bits:.3f}", f"{a.effective_bits:.3f}",
                                               str(a.n)] + [_cell(a, k, f) for k, _, f in present] + [
            f"{a.quant_seconds:.1f}", size]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stored_table(store_path: str | Path, sweep: str | None = None) -> str:
    """``format_table`` of the aggregated runs of ``sweep`` in a results store."""
    with ResultsStore(store_path, create=False) as store:
        return format_table(aggregate(store.records(sweep=sweep)))
