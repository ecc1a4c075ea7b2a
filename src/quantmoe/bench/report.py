"""A benchmark report built from the results store alone: ``report.md``, ``report.html``, PNGs.

Nothing is loaded or recomputed: every number comes from stored rows (``RunRecord``) and
per-model artifacts (routing statistics). Per model the report has the summary table (mean
± std over calibration seeds, full precision as the reference row), quality against average
bits with the Pareto frontier, bit maps of the best mixed-precision plans and the routing
frequency; then how the results were made. The same store gives the same Markdown.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantmoe.atomic import atomic_write_text
from quantmoe.bench import plots
from quantmoe.bench.document import Block, Bullets, Heading, Image, Paragraph, Table, to_html, to_markdown
from quantmoe.bench.store import ResultsStore, RunRecord
from quantmoe.bench.summary import METRICS, Aggregate, aggregate

log = logging.getLogger(__name__)

MIN_SEEDS = 3  # fewer calibration seeds than this and a run's ± is flagged
MAX_BITMAPS = 4  # bit maps per model
BITS_TOLERANCE = 0.005  # average bits within this count as "at most" a budget (the solver's 2.5 is 2.4999...)
# quality plots: (metric, title, log scale, higher is better)
BITS_AXES = {"average_bits": "average bits per weight",  # the report's two x axes
             "effective_bits": "effective bits per weight (codes + scales + zeros)"}
QUALITY = (("kl_mean", "KL to full precision", True, False), ("ppl", "perplexity", False, False),
           ("task_mean", "task mean", False, True))


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = False) -> tuple[int, ...]:
    """Indices of the (bits, quality) points that no other point beats, by increasing bits.

    A point is beaten by one with at most its bits and better quality, or fewer bits and
    quality as good; of identical points the first is kept.

    >>> pareto_front([(2.0, 0.5), (3.0, 0.2), (3.0, 0.3), (4.0, 0.25), (2.5, 0.1)])
    (0, 4)
    >>> pareto_front([(2.0, 40.0), (3.0, 55.0), (4.0, 50.0)], higher_is_better=True)
    (0, 1)
    """
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1], i))
    front, best = [], math.inf
    for i in order:
        if sign * points[i][1] < best:
            front.append(i)
            best = sign * points[i][1]
    return tuple(front)


def _is_reference(agg: Aggregate) -> bool:
    return all(r.spec.get("full_precision") or (r.seed is None and r.average_bits >= 16) for r in agg.records)


def _is_mixed(agg: Aggregate) -> bool:
    return len(set(agg.records[0].plan.values())) > 1


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-").lower() or "model"


def _latest(records: Sequence[RunRecord]) -> tuple[list[RunRecord], int]:
    """One row per (model, run, seed): the latest, when a changed setting stored the run again."""
    rows: dict[tuple[str, str, int | None], RunRecord] = {}
    for r in sorted(records, key=lambda r: (r.created_at, r.key)):
        rows[(r.model, r.run, r.seed)] = r
    return list(rows.values()), len(records) - len(rows)


def _fmt(agg: Aggregate, key: str, fmt: str) -> str:
    if key not in agg.mean:
        return "-"
    text = fmt.format(agg.mean[key])
    return f"{text} ± {fmt.format(agg.std[key])}" if agg.n > 1 else text


def _frontier(aggs: Sequence[Aggregate], metric: str, higher_is_better: bool,
              bits: str = "average_bits") -> list[Aggregate]:
    """The Pareto-optimal runs over ``bits`` (``average_bits`` or ``effective_bits``), by increasing bits."""
    have = [a for a in aggs if metric in a.mean and math.isfinite(a.mean[metric])]
    return [have[i] for i in pareto_front([(getattr(a, bits), a.mean[metric]) for a in have], higher_is_better)]


def _serves(agg: Aggregate) -> str:
    """The engines that load the GPTQ export of every seed's plan ("-": not recorded, e.g. full precision)."""
    if not all(r.engines for r in agg.records):
        return "-"
    ok = [e for e in agg.records[0].engines if all(r.engines.get(e) == "" for r in agg.records)]
    return ", ".join(ok) or "none"


def _rows_in(ref: Aggregate | None, quant: Sequence[Aggregate]) -> list[Aggregate]:
    return ([ref] if ref else []) + sorted(quant, key=lambda a: (-a.average_bits, a.run))


def _label(a: Aggregate, ref: Aggregate | None) -> str:
    return f"{a.run} (reference)" if a is ref else a.run


def _table(ref: Aggregate | None, quant: Sequence[Aggregate], front: Sequence[Aggregate]) -> Table:
    """Quality of every run (its cost, serving engines and plan file are in `_cost_table`, so that each
    table fits a 1400-px page with three seeds' "mean ± std" cells on one line)."""
    rows_in = _rows_in(ref, quant)
    metrics = [(k, t, f) for k, t, f, _ in METRICS if any(k in a.mean for a in rows_in)]
    tasks = sorted({k for a in rows_in for k in a.mean if k.startswith("task:")})
    head = ["run", "avg bits", "eff. bits", "seeds", *(t for _, t, _ in metrics),
            *(t.removeprefix("task:") for t in tasks), "Pareto"]
    if "ppl" in head:
        head.insert(head.index("ppl") + 1, "ppl vs full")
    rows = []
    for a in rows_in:
        ppl = "reference" if a is ref else (f"{100 * (a.mean['ppl'] / ref.mean['ppl'] - 1):+.1f}%"
                                            if ref and "ppl" in a.mean and "ppl" in ref.mean else "-")
        cells = [_fmt(a, k, f) for k, _, f in metrics]
        if "ppl" in head:
            cells.insert([k for k, _, _ in metrics].index("ppl") + 1, ppl)
        rows.append((_label(a, ref), f"{a.average_bits:.3f}", f"{a.effective_bits:.3f}", str(a.n), *cells,
                     *(_fmt(a, t, "{:.3f}") for t in tasks), "✓" if any(a is f for f in front) else ""))
    return Table(tuple(head), tuple(rows))


def _cost_table(ref: Aggregate | None, quant: Sequence[Aggregate], links: Mapping[str, str] | None = None) -> Table:
    """Per run: quantization time, peak RSS, checkpoint size, the engines that serve it and its plan file."""
    rows = []
    for a in _rows_in(ref, quant):
        size = f"{a.checkpoint_bytes / 1e6:.2f}" if a.checkpoint_bytes else "-"
        rows.append((_label(a, ref), f"{a.effective_bits:.3f}", f"{a.quant_seconds:.1f}", f"{a.peak_rss_mb:.0f}",
                     size, _serves(a), (links or {}).get(a.run, "-")))
    return Table(("run", "eff. bits", "quantize s", "peak RSS MB", "size MB", "serves", "plan"), tuple(rows))


def _series(ref: Aggregate | None, quant: Sequence[Aggregate], bits: str = "average_bits",
            metrics: Sequence[str] | None = None) -> list[plots.Series]:
    out = []
    for key, title, log_scale, higher in QUALITY:
        have = [a for a in quant if key in a.mean and math.isfinite(a.mean[key])]
        if not have or (metrics is not None and key not in metrics):
            continue
        front = _frontier(have, key, higher, bits)
        out.append(plots.Series(
            title=title, log=log_scale, higher_is_better=higher, labels=tuple(a.run for a in have),
            bits=tuple(getattr(a, bits) for a in have), mean=tuple(a.mean[key] for a in have),
            std=tuple(a.std[key] for a in have), frontier=tuple(next(i for i, h in enumerate(have) if h is a)
                                                                for a in front),
            reference=ref.mean.get(key) if ref else None, xlabel=BITS_AXES[bits]))
    return out



def _effective_section(ref: Aggregate | None, quant: Sequence[Aggregate], metric: str, name: str, out: Path,
                       slug: str, model: str) -> list[Block]:
    """Quality against effective bits (what the file and the memory pay: scales and zeros counted)."""
    front = _frontier(quant, metric, higher_is_better=False, bits="effective_bits")
    if not front:
        return []
    png = f"effective-{slug}.png"
    plots.quality_png(model, _series(ref, quant, "effective_bits", (metric,)), out / png)
    uniform = [a for a in quant if not _is_mixed(a) and metric in a.mean]
    rows = []
    for a in front:
        base = min((u for u in uniform if u.effective_bits >= a.effective_bits - BITS_TOLERANCE),
                   key=lambda u: (u.effective_bits, u.run), default=None)
        vs = "-" if base is None or base.mean[metric] <= 0 else \
            f"{a.mean[metric] / base.mean[metric]:.2f}× {base.run} ({base.effective_bits:.2f})"
        rows.append((a.run, f"{a.effective_bits:.3f}", f"{a.average_bits:.3f}", _fmt(a, metric, "{:.4f}"), vs))
    return [Heading(3, "Quality vs effective bits"),
            Paragraph("Effective bits count each group's 16-bit scale and zero point as well as the codes: what "
                      f"the checkpoint and the serving memory pay. The Pareto front by {name} over effective bits, "
                      f"each against the cheapest uniform run with at least its effective bits ({name} ratio; "
                      "below 1.00× the mixed plan is better with fewer bits):"),
            Table(("run", "eff. bits", "avg bits", name, "vs uniform at ≥ its eff. bits"), tuple(rows)),
            Image(png, f"{model}: {name} vs effective bits")]


def _pick_bitmaps(quant: Sequence[Aggregate], front: Sequence[Aggregate], metric: str,
                  name: str) -> tuple[list[Aggregate], str]:
    mixed = [a for a in front if _is_mixed(a)]
    if len(mixed) > MAX_BITMAPS:  # spread over the frontier
        mixed = [mixed[int(i)] for i in sorted({round(x) for x in np.linspace(0, len(mixed) - 1, MAX_BITMAPS)})]
    if mixed:
        return mixed, f"The Pareto-optimal mixed-precision plans (by {name})"
    others = sorted((a for a in quant if _is_mixed(a) and metric in a.mean), key=lambda a: (a.mean[metric], a.run))
    return others[:2], f"No mixed-precision plan is Pareto-optimal by {name}; the ones with the lowest {name}"


def _routing_note(routing: Mapping[str, Any]) -> str:
    m, blocks = plots.routing_matrix(routing["frequency"])
    hi, lo = np.unravel_index(np.nanargmax(m), m.shape), np.unravel_index(np.nanargmin(m), m.shape)
    return (f"Share of routing slots per expert, relative to a uniform router (1 = uniform), over "
            f"{routing['tokens']:,} `{routing['split']}` tokens. Busiest: block {blocks[hi[0]]} expert {hi[1]} "
            f"({m[hi]:.2f}×); idlest: block {blocks[lo[0]]} expert {lo[1]} ({m[lo]:.2f}×).")


def _at_most(front: Sequence[Aggregate], bits: float) -> Aggregate | None:
    """The frontier run with the most bits not above ``bits`` (the best one can do with no more bits)."""
    below = [f for f in front if f.average_bits <= bits + BITS_TOLERANCE]
    return below[-1] if below else None


def _is_heuristic(agg: Aggregate) -> bool:
    """A policy run that mixes widths (the paper's heuristics), not uniform, not the solver or a plan file."""
    return "policy" in agg.records[0].spec and _is_mixed(agg)


def _budgets(quant: Sequence[Aggregate]) -> list[float]:
    """Half-bit budgets from the fewest to the most average bits of the quantized runs (up to 8)."""
    bits = [a.average_bits for a in quant if a.average_bits < 16]
    if not bits:
        return []
    lo, hi = math.ceil(min(bits) * 2 - 1e-6) / 2, min(8.0, max(bits))
    return [float(b) for b in np.arange(lo, hi + 0.25, 0.5)]


def _verdict(quant: Sequence[Aggregate], front: Sequence[Aggregate], metric: str, name: str) -> list[Block]:
    """Best allocation per budget, the Pareto front, and each heuristic against the front at its bits."""
    have = [a for a in quant if metric in a.mean]
    if not have:
        return []
    key = lambda a: (a.mean[metric], a.average_bits, a.run)  # noqa: E731
    rows = []
    for budget in _budgets(have):
        within = [a for a in have if a.average_bits <= budget + BITS_TOLERANCE]
        if not within:
            continue
        best = min(within, key=key)
        tasks = [a for a in within if "task_mean" in a.mean]
        by_task = max(tasks, key=lambda a: (a.mean["task_mean"], -a.average_bits, a.run)) if tasks else None
        if by_task is None:
            task_cell = "-"
        elif by_task is best or best.mean.get("task_mean") == by_task.mean["task_mean"]:
            task_cell = "same"
        else:
            task_cell = f"{by_task.run} ({by_task.mean['task_mean']:.3f})"
        rows.append((f"≤ {budget:.1f}", best.run, f"{best.average_bits:.2f}", _fmt(best, metric, "{:.4f}"),
                     task_cell))
    blocks: list[Block] = [Heading(3, "Verdict"),
                           Paragraph(f"Best allocation within each budget of average bits, by {name} (lower is "
                                     "better) and by task mean where that picks another run:"),
                           Table(("budget (bits)", f"best by {name}", "bits", name, "best by task mean"),
                                 tuple(rows)),
                           Paragraph(f"Pareto front by {name}: " + " → ".join(
                               f"{a.run} ({a.average_bits:.2f} bits, {a.mean[metric]:.4f})" for a in front) + ".")]
    heur = []
    for a in sorted((a for a in have if _is_heuristic(a)), key=lambda a: (a.average_bits, a.run)):
        ref = _at_most(front, a.average_bits)
        if any(a is f for f in front):
            heur.append((a.run, f"{a.average_bits:.2f}", f"{a.mean[metric]:.4f}", "on the front", "-", "1.00×"))
        elif ref is not None:
            ratio = a.mean[metric] / ref.mean[metric] if ref.mean[metric] > 0 else math.inf
            heur.append((a.run, f"{a.average_bits:.2f}", f"{a.mean[metric]:.4f}",
                         f"{ref.run} ({ref.average_bits:.2f} bits)", f"{ref.mean[metric]:.4f}", f"{ratio:.2f}×"))
    if heur:
        blocks += [Paragraph(f"Each paper heuristic against the front at equal bits: the frontier run with at most "
                             f"the heuristic's average bits, and the ratio of their {name} (1.00× = on the front)."),
                   Table(("heuristic", "bits", name, "front at ≤ its bits", f"front {name}", "ratio"), tuple(heur))]
    return blocks


def _plan_files(aggs: Sequence[Aggregate], out: Path, slug: str, store_dir: Path) -> dict[str, str]:
    """Write each run's plan YAML under ``plans/``; return run -> Markdown links (plan, and checkpoint if kept)."""
    from quantmoe.bench.plans import plan_yaml

    links = {}
    for a in aggs:
        parts = []
        distinct = {json.dumps(r.plan, sort_keys=True): r for r in a.records}
        for r in distinct.values():
            seed = "" if len(distinct) == 1 or r.seed is None else f"-seed{r.seed}"
            name = f"plans/{slug}-{_slug(a.run)}{seed}.yaml"
            atomic_write_text(out / name, plan_yaml(r))
            parts.append(f"[yaml{seed.replace('-', ' ')}]({name})")
        for r in a.records:
            if r.seed is None:
                continue
            ckpt = store_dir / "checkpoints" / f"{Path(r.model).name}-{_slug(r.run)}-seed{r.seed}"
            if ckpt.is_dir():
                parts.append(f"[checkpoint seed {r.seed}]({Path(os.path.relpath(ckpt, out)).as_posix()})")
        links[a.run] = " ".join(parts)
    return links


def _model_section(model: str, aggs: Sequence[Aggregate], routing: Any, out: Path, slug: str,
                   store_dir: Path) -> list[Block]:
    ref = next((a for a in aggs if _is_reference(a)), None)
    quant = [a for a in aggs if a is not ref]
    metric = "kl_mean" if quant and all("kl_mean" in a.mean for a in quant) else "ppl"
    metric_name = {"kl_mean": "KL", "ppl": "perplexity"}[metric]
    front = _frontier(quant, metric, higher_is_better=False)
    seeds = sorted({len(a.seeds) for a in quant})
    blocks: list[Block] = [
        Heading(2, model),
        *_verdict(quant, front, metric, metric_name),
        Heading(3, "All runs"),
        Paragraph(f"Weights sha256 `{aggs[0].records[-1].model_sha256[:16]}`. {_count(len(quant), 'quantized run')}, "
                  f"each the mean ± std over {' to '.join(map(str, seeds)) or 0} calibration seeds; "
                  + ("full precision is the reference row (one run: it calibrates nothing). " if ref else
                     "no full-precision run is stored. ")
                  + f"Pareto (✓): no other run has at most its bits and lower {metric_name}; KL is to the "
                  "full-precision model's next-token distribution on the same windows."),
        _table(ref, quant, front),
        Heading(3, "Cost, serving and plans"),
        Paragraph("Quantize s: the mean over seeds; peak RSS: the largest. Serves: the engines that load the "
                  "run's GPTQ export (`quantmoe export --target ENGINE`; `quantmoe plan` gives the reasons for the "
                  "others). Plan: the run's plan file (one per seed where the seeds' plans differ) and its "
                  "checkpoints where the sweep kept them, to quantize or serve it again."),
        _cost_table(ref, quant, _plan_files(aggs, out, slug, store_dir))]
    series = _series(ref, quant)
    if series:
        name = f"quality-{slug}.png"
        plots.quality_png(model, series, out / name)
        blocks += [Heading(3, "Quality vs bits"), Image(name, f"{model}: quality vs average bits"),
                   Paragraph("Points: mean over seeds, bars: ± std. Step line: Pareto frontier. "
                             "Dashed: full precision (KL is 0 there, so it has no line on the log scale).")]
    blocks += _effective_section(ref, quant, metric, metric_name, out, slug, model)
    picked, why = _pick_bitmaps(quant, front, metric, metric_name)
    blocks.append(Heading(3, "Bit maps"))
    if picked:
        name = f"bitmap-{slug}.png"
        plots.bitmap_png(model, [(f"{a.run} ({a.average_bits:.2f} bits)", a.records[0].bitmap) for a in picked],
                         out / name)
        same = all(r.bitmap == a.records[0].bitmap for a in picked for r in a.records)
        blocks += [Paragraph(f"{why}: {', '.join(a.run for a in picked)}. Mean bits per block of attention, dense "
                             f"MLP, shared experts and each routed expert"
                             f"{'' if same else ' (plans differ by seed: the first seed is shown)'}."),
                   Image(name, f"{model}: bits by block and expert")]
    else:
        blocks.append(Paragraph("No mixed-precision runs in this sweep."))
    blocks.append(Heading(3, "Routing frequency"))
    if routing and routing.get("frequency"):
        name = f"routing-{slug}.png"
        plots.routing_png(model, routing["frequency"], routing["tokens"], routing["split"], out / name)
        blocks += [Paragraph(_routing_note(routing)), Image(name, f"{model}: routing frequency")]
    else:
        blocks.append(Paragraph("No routing statistics stored for this model."))
    return blocks


def _settings(d: Mapping[str, Any], prefix: str = "") -> str:
    parts = []
    for k in sorted(d):
        v = d[k]
        parts.append(_settings(v, f"{prefix}{k}.") if isinstance(v, Mapping) else f"{prefix}{k}={v}")
    return ", ".join(p for p in parts if p)


def _distinct(values: Sequence[Mapping[str, Any]], skip: tuple[str, ...] = ()) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        if v:
            seen[_settings({k: x for k, x in v.items() if k not in skip})] = None
    return list(seen) or ["-"]


def _shell_path(path: Path) -> str:
    """``path`` as it works from the current folder: relative when inside it, else absolute."""
    absolute = path.resolve()
    try:
        text = absolute.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        text = absolute.as_posix()
    return shlex.quote(text)


def _provenance(sweep: str, store: Path, records: Sequence[RunRecord], superseded: int) -> list[Block]:
    quantized = [r for r in records if r.seed is not None]
    runs: dict[str, Mapping[str, Any]] = {}
    for r in records:
        runs.setdefault(r.run, r.spec)
    spec = [f"{name}: " + _settings({k: v for k, v in s.items() if k != "name"}) for name, s in runs.items()]
    models = dict.fromkeys(f"{r.model} (`{r.model_sha256[:16]}`)" for r in records)
    fallbacks = sum(len(r.fallbacks) for r in quantized)
    items = [f"sweep `{sweep}` from `{store.name}`: {_count(len(records), 'stored row')}, "
             f"{_count(len(runs), 'run')} over {_count(len(models), 'model')}, recorded {records[0].created_at} to {records[-1].created_at}",
             "models: " + ", ".join(models),
             "calibration seeds: " + (", ".join(map(str, sorted({r.seed for r in quantized}))) or "-"),
             *("calibration: " + s for s in _distinct([r.calibration for r in quantized], skip=("seed",))),
             *("quantizer: " + s for s in _distinct([r.quantizer for r in quantized])),
             *("evaluation: " + s for s in _distinct([r.evaluation for r in records])),
             *("versions and machine: " + s for s in _distinct([r.versions for r in records])),
             f"RTN fallbacks (experts with too few calibration tokens): {fallbacks} over {len(quantized)} "
             f"quantized rows"]
    if superseded:
        items.append(f"{superseded} older rows of the same (model, run, seed) were superseded by later ones")
    return [Heading(2, "How this was made"), Bullets(tuple(items)), Paragraph("Runs:"), Bullets(tuple(spec)),
            Paragraph(f"Rebuild with `quantmoe report {_shell_path(store)} --sweep {sweep}` (from `{Path.cwd()}`); "
                      f"take a run's plan away with `quantmoe report {_shell_path(store)} --sweep {sweep} "
                      "--plan RUN --out plan.yaml`.")]


def _choose_sweep(store: ResultsStore, path: Path, sweep: str | None) -> tuple[str, list[RunRecord]]:
    everything = store.records()
    names = sorted({r.sweep for r in everything})
    if not names:
        raise ValueError(f"results store {path} holds no finished runs: run `quantmoe bench SWEEP.yaml` first")
    if sweep is None:
        if len(names) > 1:
            raise ValueError(f"results store {path} holds sweeps {', '.join(names)}: choose one with --sweep")
        sweep = names[0]
    if sweep not in names:
        raise ValueError(f"no sweep named {sweep!r} in {path}: use --sweep with one of {', '.join(names)}")
    return sweep, [r for r in everything if r.sweep == sweep]


def build_report(store_path: str | Path, out_dir: str | Path, sweep: str | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir``; return the Markdown's path.

    Every file is written atomically; the Markdown and HTML last, so they never point at
    missing figures.
    """
    store_path, out = Path(store_path), Path(out_dir)
    with ResultsStore(store_path, create=False) as store:
        sweep, raw = _choose_sweep(store, store_path, sweep)
        records, superseded = _latest(raw)
        models = list(dict.fromkeys(r.model for r in records))
        routing = {m: store.artifact([r for r in records if r.model == m][-1].model_sha256, "routing")
                   for m in models}
    out.mkdir(parents=True, exist_ok=True)
    aggs = aggregate(records)
    few = sorted({(a.model, a.run, a.n) for a in aggs if not _is_reference(a) and a.n < MIN_SEEDS})
    doc: list[Block] = [
        Heading(1, f"Benchmark report: {sweep}"),
        Paragraph(f"{_count(len(models), 'model')}, {_count(len({a.run for a in aggs}), 'run')}, from "
                  f"`{store_path.name}`. "
                  "Quantized runs are the mean ± sample std over calibration seeds. Built from the results store "
                  "alone; see the end for the settings.")]
    if few:
        groups: dict[tuple[str, int], list[str]] = {}
        for m, r, n in few:
            groups.setdefault((m, n), []).append(r)
        doc.append(Bullets(tuple(f"warning: {m}: {_count(n, 'calibration seed')} (fewer than {MIN_SEEDS}) for "
                                 f"{', '.join(runs)}: their ± is not a spread over seeds"
                                 for (m, n), runs in groups.items())))
    slugs: dict[str, str] = {}
    for m in models:
        slug = _slug(m)
        slugs[m] = slug if slug not in slugs.values() else f"{slug}-{len(slugs)}"
        doc += _model_section(m, [a for a in aggs if a.model == m], routing[m], out, slugs[m], store_path.parent)
    doc += _provenance(sweep, store_path, records, superseded)
    atomic_write_text(out / "report.html", to_html(doc, f"Benchmark report: {sweep}", folder=out))
    md = out / "report.md"
    atomic_write_text(md, to_markdown(doc))
    log.info("report of sweep %s written to %s", sweep, md)
    return md
