"""Routing statistics of a model on a text: tokens and router weight per block and expert."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantmoe.anatomy import ModelAnatomy, family_of, per_expert_view
from quantmoe.atomic import atomic_write_text
from quantmoe.calib.data import run_windows
from quantmoe.hooks import removed_after


@dataclass(frozen=True)
class RoutingStats:
    """Per MoE block: how many tokens picked each expert (top-k), and the router weight they gave it."""

    tokens: int  # tokens that went through every MoE block
    top_k: dict[int, int]
    counts: dict[int, np.ndarray]  # block -> (experts,) selections
    weight_sums: dict[int, np.ndarray]  # block -> (experts,) sum of top-k router weights

    def frequency(self, block: int) -> np.ndarray:
        """Share of routing slots per expert; sums to 1 over the block's experts."""
        c = self.counts[block].astype(np.float64)
        return c / max(c.sum(), 1.0)

    def mean_weight(self, block: int) -> np.ndarray:
        c = self.counts[block]
        return np.where(c > 0, self.weight_sums[block] / np.maximum(c, 1), 0.0)

    def balance(self, block: int) -> dict[str, float]:
        """Load balance of a block: min/max share relative to uniform, normalized entropy."""
        f = self.frequency(block)
        n = len(f)
        nz = f[f > 0]
        return {"min_share_x_uniform": float(f.min() * n), "max_share_x_uniform": float(f.max() * n),
                "entropy_norm": float(-(nz * np.log(nz)).sum() / np.log(n)),
                "unused_experts": int((f == 0).sum())}

    def to_json(self) -> str:
        return json.dumps({"tokens": self.tokens, "top_k": self.top_k,
                           "counts": {b: c.tolist() for b, c in self.counts.items()},
                           "weight_sums": {b: w.tolist() for b, w in self.weight_sums.items()}})

    @classmethod
    def from_json(cls, text: str) -> RoutingStats:
        d = json.loads(text)
        return cls(tokens=d["tokens"], top_k={int(b): k for b, k in d["top_k"].items()},
                   counts={int(b): np.asarray(c, dtype=np.int64) for b, c in d["counts"].items()},
                   weight_sums={int(b): np.asarray(w) for b, w in d["weight_sums"].items()})

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())


def experts_call_view(model: torch.nn.Module):
    """The context where every experts module of ``model`` takes the call
    ``experts(hidden_states, top_k_index, top_k_weights)`` that routing readers hook: the model as it
    is, or its per-expert view for experts that read router-scaled inputs (Llama 4's run every expert
    on every token and take that call only in the view)."""
    return per_expert_view(model) if family_of(model).expert_layout.scaled_input else nullcontext()


def top_k_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) of an experts call seen by a forward pre-hook with kwargs."""
    return (args[1] if len(args) > 1 else kwargs["top_k_index"],
            args[2] if len(args) > 2 else kwargs["top_k_weights"])


@torch.no_grad()
def collect_routing(model: torch.nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor,
                    batch_size: int = 8) -> RoutingStats:
    """Run ``model`` over ``windows`` and count each router's top-k choices.

    They are read where the experts receive them: transformers 5 calls every experts module
    as ``experts(hidden_states, top_k_index, top_k_weights)``, while routers differ in what
    they return (``(logits, top_k_weights, top_k_index)`` mostly, DBRX's the logits alone).
    Experts that read router-scaled inputs (Llama 4) are called that way only in the per-expert
    view, so a fused model of such a family is read through it. A choice with router weight 0
    (ZAYA's skip class, sent to expert 0 with weight 0) or of transformers' expert-parallel
    sentinel (index E) is not counted: no expert computes anything for it.
    """
    blocks = [b for b in anatomy.blocks if b.is_moe]
    counts = {b.index: torch.zeros(b.num_experts, dtype=torch.long) for b in blocks}
    weights = {b.index: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}

    def hook_for(block: int, num_experts: int):
        def hook(_module, args, kwargs):
            top_i, top_w = top_k_of(args, kwargs)
            top_i, top_w = top_i.reshape(-1).cpu(), top_w.reshape(-1).double().cpu()
            chosen = (top_w != 0) & (top_i < num_experts)  # as UnfusedExperts.routes: a weight of 0 is no choice
            top_i, top_w = top_i[chosen], top_w[chosen]
            counts[block] += torch.bincount(top_i, minlength=num_experts)
            weights[block].index_add_(0, top_i, top_w)
        return hook

    with experts_call_view(model), removed_after() as handles:
        handles.extend(model.get_submodule(b.experts_module).register_forward_pre_hook(
            hook_for(b.index, b.num_experts), with_kwargs=True) for b in blocks)
        run_windows(model, windows, batch_size)
    return RoutingStats(tokens=int(windows.numel()), top_k={b.index: b.top_k for b in blocks},
                        counts={b: c.numpy() for b, c in counts.items()},
                        weight_sums={b: w.numpy() for b, w in weights.items()})
