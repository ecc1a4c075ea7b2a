"""The report's figures (matplotlib, Agg): quality vs bits, bit maps, routing frequency.

Every function takes plain data and writes one PNG atomically; nothing here reads the store.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patheffects import withStroke  # noqa: E402

from quantmoe.atomic import atomic_write_bytes  # noqa: E402

ANNOTATE_MAX_CELLS = 400  # write the value into each cell of smaller heatmaps
_PNG_METADATA = {"Software": None}  # no version stamp: same data, same bytes


@dataclass(frozen=True)
class Series:
    """One quality metric of one model's runs: mean ± std over seeds against average bits."""

    title: str
    log: bool
    higher_is_better: bool
    labels: tuple[str, ...]
    bits: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    frontier: tuple[int, ...]  # indices of the Pareto-optimal points, by increasing bits
    reference: float | None  # full precision (drawn as a horizontal line)
    xlabel: str = "average bits per weight"


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata=_PNG_METADATA)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def overlapping_labels(fig, texts: Sequence[Any]) -> list[tuple[int, int]]:
    """Pairs of texts whose drawn boxes overlap (after layout)."""
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


def labels_over_points(fig, ax, texts: Sequence[Any], xs: np.ndarray, ys: np.ndarray,
                       radius_px: float = 4.0) -> list[tuple[int, int]]:
    """Pairs (text i, point j != i) where label i's drawn box covers point j's marker (after layout)."""
    renderer = fig.canvas.get_renderer()
    points = ax.transData.transform(np.column_stack([xs, ys]))  # (n, 2) pixels
    hits = []
    for i, t in enumerate(texts):
        box = t.get_window_extent(renderer)
        for j, (px, py) in enumerate(points):
            if j != i and box.x0 - radius_px <= px <= box.x1 + radius_px and \
                    box.y0 - radius_px <= py <= box.y1 + radius_px:
                hits.append((i, j))
    return hits


def _place_labels(fig, ax, texts: list[Any], xs: np.ndarray, ys: np.ndarray) -> None:
    """Move the point labels apart (adjustText) with a thin line back to their point."""
    from adjustText import adjust_text

    if len(texts) > 1:
        fig.canvas.draw()  # final axis limits and layout before measuring
        adjust_text(texts, x=xs, y=ys, ax=ax, expand=(1.15, 1.35), ensure_inside_axes=True,
                    arrowprops=dict(arrowstyle="-", color="#888", lw=0.6))


def _numbered(ax, texts: list[Any], labels: Sequence[str]) -> list[Any]:
    """Fallback when names still collide (with each other or with another point): each point gets its
    number; the key lists the names."""
    for n, t in enumerate(texts, 1):
        t.set_text(str(n))
    key = "\n".join(f"{n}  {label}" for n, label in enumerate(labels, 1))
    ax.text(1.02, 1.0, key, transform=ax.transAxes, va="top", ha="left", fontsize=8, family="monospace")
    return texts


def quality_png(model: str, series: Sequence[Series], path: Path) -> None:
    _save(quality_figure(model, series), path)


def quality_figure(model: str, series: Sequence[Series]):
    """One panel per metric, stacked (each as wide as the report), point labels that do not overlap."""
    fig, axes = plt.subplots(len(series), 1, figsize=(11.0, 4.6 * len(series)), squeeze=False,
                             layout="constrained")
    panels = []
    for ax, s in zip(axes[:, 0], series):
        keep = [i for i in range(len(s.bits)) if not s.log or s.mean[i] > 0]
        x = np.array([s.bits[i] for i in keep])
        y = np.array([s.mean[i] for i in keep])
        e = np.array([s.std[i] for i in keep])
        ax.errorbar(x, y, yerr=e, fmt="o", color="tab:blue", ecolor="tab:blue", capsize=3, ms=5, zorder=3,
                    label="run (mean ± std over seeds)")
        front = [i for i in s.frontier if i in keep]
        if front:
            fx = [s.bits[i] for i in front]
            fy = [s.mean[i] for i in front]
            ax.step(fx, fy, where="post", color="tab:orange", lw=1.5, zorder=2, label="Pareto frontier")
            ax.plot(fx, fy, "o", mfc="none", mec="tab:orange", ms=10, mew=1.5, zorder=4)
        if s.reference is not None and (not s.log or s.reference > 0):
            ax.axhline(s.reference, color="gray", ls="--", lw=1, label=f"full precision ({s.reference:.4g})")
        if s.log:
            ax.set_yscale("log")
        ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
        ax.set_xlabel(s.xlabel)
        ax.set_title(f"{s.title} ({'higher' if s.higher_is_better else 'lower'} is better)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        texts = [ax.text(s.bits[i], s.mean[i], s.labels[i], fontsize=8, color="#222", zorder=5) for i in keep]
        panels.append((ax, texts, x, y, [s.labels[i] for i in keep]))
    fig.suptitle(model, fontsize=12)
    for ax, texts, x, y, labels in panels:
        _place_labels(fig, ax, texts, x, y)
        if overlapping_labels(fig, texts) or labels_over_points(fig, ax, texts, x, y):
            _place_labels(fig, ax, _numbered(ax, texts, labels), x, y)
    return fig


def bitmap_matrix(bitmap: Mapping[str, Any]) -> tuple[np.ndarray, list[str], list[int]]:
    """Blocks x (attention, dense, shared, expert 0..E-1) bits, NaN where a block has none.

    Role columns appear only when some block has that role.
    """
    blocks = sorted(bitmap["blocks"], key=lambda b: b["index"])
    roles = [r for r in ("attention", "dense", "shared") if any(b.get(r) is not None for b in blocks)]
    n_experts = max((len(b["experts"]) for b in blocks), default=0)
    columns = {"attention": "attn", "dense": "dense", "shared": "shared"}
    names = [columns[r] for r in roles] + [f"e{i}" for i in range(n_experts)]
    m = np.full((len(blocks), len(names)), np.nan)
    for row, b in enumerate(blocks):
        for col, r in enumerate(roles):
            if b.get(r) is not None:
                m[row, col] = b[r]
        for e, bits in enumerate(b["experts"]):
            if bits is not None:
                m[row, len(roles) + e] = bits
    return m, names, [b["index"] for b in blocks]


def _annotate(ax, m: np.ndarray, fmt) -> None:
    if m.size > ANNOTATE_MAX_CELLS:
        return
    for (r, c), v in np.ndenumerate(m):
        if not math.isnan(v):
            ax.text(c, r, fmt(v), ha="center", va="center", fontsize=6, color="black",
                    path_effects=[withStroke(linewidth=1.5, foreground="white")])


def _bits_text(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"


BITMAP_ROW_INCHES = 14.0  # bit-map panels wrap into rows no wider than this (about 1600 px, read at 1400)


def bitmap_png(model: str, panels: Sequence[tuple[str, Mapping[str, Any]]], path: Path) -> None:
    """One heatmap per plan (title, bitmap), colour on a log2 scale of bits, wrapped into rows."""
    mats = [bitmap_matrix(bm) for _, bm in panels]
    top = max([4.0] + [float(np.nanmax(m)) for m, _, _ in mats if np.isfinite(m).any()])
    norm = Normalize(vmin=1.0, vmax=math.log2(top))
    width = max(len(names) for _, names, _ in mats)
    panel_w = max(3.0, 0.28 * width + 1.5)
    panel_h = max(2.5, 0.3 * max(len(m) for m, _, _ in mats) + 1.5)
    ncols = max(1, min(len(panels), int(BITMAP_ROW_INCHES // panel_w)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + 1.0, panel_h * nrows + 0.4),
                             squeeze=False, layout="constrained")
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        (title, _), (m, names, rows) = panels[k], mats[k]
        image = ax.imshow(np.log2(m), cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
        _annotate(ax, m, _bits_text)
        n_roles = sum(1 for n in names if not n.startswith("e"))
        if 0 < n_roles < len(names):
            ax.axvline(n_roles - 0.5, color="white", lw=2)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=90)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
        ax.set_xlabel("role / routed expert")
        if k % ncols == 0:
            ax.set_ylabel("block")
        ax.set_title(title, fontsize=9)
    ticks = [b for b in (2, 3, 4, 8, 16) if b <= top]
    bar = fig.colorbar(image, ax=list(axes.flat), shrink=0.9)
    bar.set_ticks([math.log2(b) for b in ticks], labels=[str(b) for b in ticks])
    bar.set_label("bits")
    fig.suptitle(f"{model}: bits by block and expert", fontsize=11)
    _save(fig, path)


def routing_matrix(frequency: Mapping[str, Sequence[float]]) -> tuple[np.ndarray, list[int]]:
    """MoE blocks x experts, share of routing slots relative to uniform (1 = uniform)."""
    blocks = sorted(int(b) for b in frequency)
    n = max(len(frequency[str(b)]) for b in blocks)
    m = np.full((len(blocks), n), np.nan)
    for row, b in enumerate(blocks):
        shares = np.asarray(frequency[str(b)], dtype=float)
        m[row, :len(shares)] = shares * len(shares)
    return m, blocks


def routing_png(model: str, frequency: Mapping[str, Sequence[float]], tokens: int, split: str, path: Path) -> None:
    m, blocks = routing_matrix(frequency)
    top = max(2.0, float(np.nanmax(m)))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * m.shape[1] + 2.0), max(2.5, 0.3 * len(blocks) + 1.5)),
                           layout="constrained")
    image = ax.imshow(m, cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top), aspect="auto",
                      interpolation="nearest")
    _annotate(ax, m, lambda v: f"{v:.1f}")
    ax.set_xticks(range(m.shape[1]), [f"e{i}" for i in range(m.shape[1])], fontsize=6, rotation=90)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE block")
    ax.set_title(f"{model}: routing frequency\n({tokens:,} {split} tokens)", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.9).set_label("share × experts (1 = uniform)")
    _save(fig, path)
