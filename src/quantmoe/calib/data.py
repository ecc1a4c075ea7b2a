"""Calibration windows: seeded random windows of a token stream, tokenized once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MOE_MODES = ("routed", "all", "weighted")


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration tokens come from and how experts see them.

    ``moe_mode``: ``routed`` (each expert's Hessian from the tokens routed to it, the
    paper's), ``all`` (every expert sees every token; the block output still comes from
    the routed experts only) or ``weighted`` (routed tokens weighted by their router weight;
    experts that read router-scaled inputs, Llama 4's, have it in their rows already, so there
    ``weighted`` is ``routed``). In ``routed`` and ``weighted`` an expert's rows are what it reads:
    Llama 4's scaled by the router weight; ``all`` gives every expert the unscaled tokens.
    Experts that see fewer than ``min_expert_tokens`` tokens fall back to RTN.
    """

    split: str = "calibration"
    num_windows: int = 128
    seq_len: int = 256
    seed: int = 0
    moe_mode: str = "routed"
    min_expert_tokens: int = 16
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.moe_mode not in MOE_MODES:
            raise ValueError(f"check `moe_mode`: {self.moe_mode!r} is not one of {', '.join(MOE_MODES)}")
        for key in ("num_windows", "seq_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"check `{key}`: it must be a positive integer")
        if self.min_expert_tokens < 0:
            raise ValueError("check `min_expert_tokens`: it must be >= 0")


@torch.no_grad()
def run_windows(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> None:
    """Forward ``windows`` through ``model`` in batches (for hooks that collect statistics)."""
    device = next(model.parameters()).device
    model.eval()
    for i in range(0, len(windows), batch_size):
        model(input_ids=windows[i:i + batch_size].to(device))


def calibration_windows(token_ids: np.ndarray | torch.Tensor, num_windows: int, seq_len: int,
                        seed: int) -> torch.Tensor:
    """(num_windows, seq_len) windows at seeded random offsets: reruns give the same windows."""
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    if len(ids) < seq_len:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than `seq_len`={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_windows,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
