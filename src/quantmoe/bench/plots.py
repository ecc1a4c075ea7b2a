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


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata=_PNG_METADATA)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def quality_png(model: str, series: Sequence[Series], path: Path) -> None:
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4.2), squeeze=False,
                             layout="constrained")
    for ax, s in zip(axes[0], series):
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
        for i in keep:
            ax.annotate(s.labels[i], (s.bits[i], s.mean[i]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7, color="#333")
        if s.reference is not None and (not s.log or s.reference > 0):
            ax.axhline(s.reference, color="gray", ls="--", lw=1, label=f"full precision ({s.reference:.4g})")
        if s.log:
            ax.set_yscale("log")
        ax.margins(x=0.15)  # room for the labels of the outermost points
        ax.set_xlabel("average bits per weight")
        ax.set_title(f"{s.title} ({'higher' if s.higher_is_better else 'lower'} is better)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(model, fontsize=11)
    _save(fig, path)


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


def bitmap_png(model: str, panels: Sequence[tuple[str, Mapping[str, Any]]], path: Path) -> None:
    """One heatmap per plan (title, bitmap), colour on a log2 scale of bits."""
    mats = [bitmap_matrix(bm) for _, bm in panels]
    top = max([4.0] + [float(np.nanmax(m)) for m, _, _ in mats if np.isfinite(m).any()])
    norm = Normalize(vmin=1.0, vmax=math.log2(top))
    width = max(len(names) for _, names, _ in mats)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(3.0, 0.32 * width + 1.5) * len(panels) + 1.0,
                                                      max(2.5, 0.3 * max(len(m) for m, _, _ in mats) + 1.5)),
                             squeeze=False, layout="constrained")
    image = None
    for col, (ax, (title, _), (m, names, rows)) in enumerate(zip(axes[0], panels, mats)):
        image = ax.imshow(np.log2(m), cmap="viridis", norm=norm, aspect="auto", interpolation="nearest")
        _annotate(ax, m, _bits_text)
        n_roles = sum(1 for n in names if not n.startswith("e"))
        if 0 < n_roles < len(names):
            ax.axvline(n_roles - 0.5, color="white", lw=2)
        ax.set_xticks(range(len(names)), names, fontsize=6, rotation=90)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=6)
        ax.set_xlabel("role / routed expert")
        if col == 0:
            ax.set_ylabel("block")
        ax.set_title(title, fontsize=9)
    ticks = [b for b in (2, 3, 4, 8, 16) if b <= top]
    bar = fig.colorbar(image, ax=list(axes[0]), shrink=0.9)
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
