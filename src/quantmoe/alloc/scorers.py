"""What data-driven rules rank by: outlier scores of linears, WANDA-like and massive-activation
scores of experts, and the `Evidence` bundle that policies read.

* Outlier score (weights only) of W (out, in): A = |W|, score = max_j (max_i A_ij / mean_i A_ij),
  the largest ratio of a column's peak to its mean. Columns that are all zero score 0.
* WANDA-like expert score: sum over the expert's linears of mean_ij(|W_ij| * ||X_j||_2), with
  ||X_j||_2 the L2 norm of input feature j over the calibration tokens routed to that expert
  (as in WANDA: not divided by the token count, so busier experts score higher).
* Massive-activation routing: per expert, how many routing slots went to tokens whose hidden
  state entering the block has any |h| >= threshold (the paper used 1000).

Example:
    >>> outlier_score(torch.tensor([[1.0, 0.0], [-3.0, 2.0]]))  # columns: 3 / 2 = 1.5, 2 / 1 = 2
    2.0
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantmoe.anatomy import BlockAnatomy, ModelAnatomy, per_expert_view
from quantmoe.atomic import atomic_write_text
from quantmoe.calib.data import run_windows
from quantmoe.calib.routing import experts_call_view, top_k_of
from quantmoe.hooks import removed_after

log = logging.getLogger(__name__)

EXPERT_RANKINGS = {"frequency": "routing", "weight": "routing", "wanda": "wanda", "massive": "massive"}
NEEDS_WHAT = {"routing": "routing statistics of the full-precision model on calibration text",
              "wanda": "per-expert input norms from calibration text (WANDA-like score)",
              "massive": "massive-activation routing counts from calibration text",
              "outlier": "the model's weights (outlier scores)",
              "importance": "a trained block-importance predictor"}


# --- pure scores --------------------------------------------------------------------------------


def outlier_score(W: torch.Tensor) -> float:
    """max over input columns j of max_i |W_ij| / mean_i |W_ij|, for W (out, in)."""
    A = W.detach().abs().float()  # (out, in)
    col_max, col_mean = A.amax(dim=0), A.mean(dim=0)  # (in,)
    ratio = torch.where(col_mean > 0, col_max / col_mean.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return float(ratio.max())


def wanda_score(W: torch.Tensor, x_norm: torch.Tensor) -> float:
    """mean_ij |W_ij| * ||X_j||_2 for W (out, in) and x_norm (in,)."""
    return float((W.detach().abs().float() * x_norm.float()[None, :]).mean())


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertScores:
    """A score per routed expert of every MoE block (higher = more deserving of bits)."""

    kind: str  # "wanda" or "massive"
    scores: Mapping[int, np.ndarray]  # block -> (experts,)
    info: Mapping[str, Any] = field(default_factory=dict)  # tokens, threshold, max_abs, ...

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "info": dict(self.info),
                           "scores": {b: s.tolist() for b, s in self.scores.items()}})

    @classmethod
    def from_json(cls, text: str) -> ExpertScores:
        d = json.loads(text)
        return cls(d["kind"], {int(b): np.asarray(s, dtype=np.float64) for b, s in d["scores"].items()}, d["info"])

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())


@dataclass(frozen=True)
class Evidence:
    """What data-driven rules rank by. With ``placeholder=True`` missing evidence ranks by index
    order: average bits stay exact (they do not depend on which experts are picked), the choice not."""

    routing: Any = None  # quantmoe.calib.routing.RoutingStats
    wanda: ExpertScores | None = None
    massive: ExpertScores | None = None
    outlier: Mapping[str, float] | None = None  # routed-expert linear -> outlier score
    importance: Any = None  # quantmoe.alloc.predictor.BlockImportance
    placeholder: bool = False

    def _require(self, kind: str, rule: str) -> Any:
        value = getattr(self, kind)
        if value is None and not self.placeholder:
            raise ValueError(f"rule {rule!r} needs {NEEDS_WHAT[kind]}: run `quantmoe plan` on a model with "
                             "weights (embedded name, folder or hub id) or give saved statistics; on a config "
                             "alone, --bits-only counts bits with a placeholder ranking")
        return value

    def expert_scores(self, by: str, block: BlockAnatomy, rule: str) -> np.ndarray:
        """(experts,) of one MoE block, by frequency, weight, wanda or massive."""
        source = self._require(EXPERT_RANKINGS[by], rule)
        if source is None:
            return np.zeros(block.num_experts)
        if by == "frequency":
            return source.frequency(block.index)
        if by == "weight":
            return source.mean_weight(block.index)
        return np.asarray(source.scores[block.index], dtype=np.float64)

    def linear_scores(self, names: Sequence[str], rule: str) -> np.ndarray:
        source = self._require("outlier", rule)
        return np.zeros(len(names)) if source is None else np.array([source[n] for n in names])

    def block_scores(self, blocks: Sequence[int], source: str, rule: str) -> np.ndarray:
        """Importance of MoE blocks: minus the mean similarity (lowest similarity = most important)."""
        result = self._require("importance", rule)
        if result is None:
            return np.zeros(len(blocks))
        sims = result.predicted if source == "predicted" else result.measured
        return -np.array([sims[b] for b in blocks])


# --- collection (hooks) -------------------------------------------------------------------------


def _check_weights(model: nn.Module, what: str) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(f"{what} needs the model's weights, but this model is on the meta device (a config alone)")


@torch.no_grad()
@torch.no_grad()
def outlier_scores(model: nn.Module, anatomy: ModelAnatomy) -> dict[str, float]:
    """Outlier score of every routed-expert linear (weights only, no data)."""
    _check_weights(model, "the outlier score")
    with per_expert_view(model):
        return {u.name: outlier_score(model.get_submodule(u.name).weight)
                for u in anatomy.units if u.role == "routed_expert"}


@torch.no_grad()
def wanda_expert_scores(model: nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor,
                        batch_size: int = 8) -> ExpertScores:
    """WANDA-like score of every routed expert: input norms from the tokens routed to it."""
    _check_weights(model, "the WANDA-like score")
    units = [u for u in anatomy.units if u.role == "routed_expert"]
    sq = {u.name: torch.zeros(u.in_features, dtype=torch.float64) for u in units}  # sum_t x_tj^2

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (tokens, in)
            sq[name] += (x * x).sum(dim=0).cpu()
        return hook

    with per_expert_view(model):
        with removed_after() as handles:
            for u in units:
                handles.append(model.get_submodule(u.name).register_forward_pre_hook(hook_for(u.name)))
            run_windows(model, windows, batch_size)
        scores = {b.index: np.array([sum(wanda_score(model.get_submodule(n).weight, sq[n].sqrt()) for n in names)
                                     for names in b.experts]) for b in anatomy.blocks if b.is_moe}
    return ExpertScores("wanda", scores, {"tokens": int(windows.numel())})


@torch.no_grad()
def massive_routing(model: nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor, threshold: float = 1000.0,
                    batch_size: int = 8) -> ExpertScores:
    """Per expert, routing slots taken by tokens whose block input has any |h| >= threshold.

    The choices are read where the experts receive them, as ``collect_routing`` does: transformers 5
    calls every experts module as ``experts(hidden_states, top_k_index, top_k_weights)`` over the
    block's tokens flattened in (batch, position) order, while routers differ in what they return
    (DBRX's returns the logits alone). Experts that read router-scaled inputs (Llama 4) are called
    that way only in the per-expert view, so a fused model of such a family is read through it.
    """
    _check_weights(model, "massive-activation routing")
    blocks = [b for b in anatomy.blocks if b.is_moe]
    counts = {b.index: np.zeros(b.num_experts, dtype=np.int64) for b in blocks}
    masks: dict[int, torch.Tensor] = {}
    stats = {"massive_tokens": 0, "max_abs": 0.0}

    def block_hook(index: int):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            peak = h.detach().abs().amax(dim=-1).reshape(-1)  # (tokens,)
            masks[index] = (peak >= threshold).cpu()
            stats["max_abs"] = max(stats["max_abs"], float(peak.max()))
            stats["massive_tokens"] += int(masks[index].sum())
        return hook

    def experts_hook(b: BlockAnatomy):
        def hook(_module, args, kwargs):
            top_i = top_k_of(args, kwargs)[0].reshape(len(masks[b.index]), -1).cpu()  # (tokens, k)
            counts[b.index] += np.bincount(top_i[masks[b.index]].reshape(-1).numpy(), minlength=b.num_experts)
        return hook

    with experts_call_view(model), removed_after() as handles:
        for b in blocks:
            handles.append(model.get_submodule(b.module_name).register_forward_pre_hook(block_hook(b.index),
                                                                                       with_kwargs=True))
            handles.append(model.get_submodule(b.experts_module).register_forward_pre_hook(experts_hook(b),
                                                                                         with_kwargs=True))
        run_windows(model, windows, batch_size)
    if stats["massive_tokens"] == 0:
        log.warning("no token reached |h| >= %g (largest |h| was %.1f): massive-activation scores are all zero",
                    threshold, stats["max_abs"])
    info = {"tokens": int(windows.numel()), "threshold": threshold, **stats}
    return ExpertScores("massive", {b: c.astype(np.float64) for b, c in counts.items()}, info)
