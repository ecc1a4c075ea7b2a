"""Block-output tuning of a quantized block's group scales (``--tune-steps N``).

GPTQ (and ``refine``) minimize each linear's own loss on the inputs it saw. What the model
needs is the block's output: the errors of attention, router choice and experts add up, and
the block's inputs already carry the earlier blocks' errors. After GPTQ, this step keeps every
integer code and zero point and tunes every group's scale against the full-precision block's
output on the full-precision inputs, fed the quantized model's own inputs (as AutoRound does for
its rounding and clipping):

    minimize  sum over windows || block_q(x_q) - block_fp(x_fp) ||^2   over the scales

Each scale is ``s0 * exp(t)`` with one ``t`` per (row, group), trained by Adam on one
calibration batch per step (batches in a fixed order), then rounded to a storable scale (as
GPTQ's own). The tuned scales are kept only if the block's loss over every calibration batch
is lower with them than with GPTQ's; otherwise the block stays as GPTQ left it. Codes, zero
points and the group layout never change, so the GPTQ export stays exact.

Example:
    >>> import torch
    >>> from quantmoe.quant.grid import QuantSpec
    >>> from quantmoe.quant.qlinear import QuantLinear
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    >>> x = [((torch.randn(4, 64),), {}) for _ in range(4)]
    >>> targets = [block(*a) for a, _ in x]
    >>> staged = {str(i): QuantLinear.from_float(block[i], QuantSpec(bits=2, group_size=32)) for i in (0, 2)}
    >>> for name, q in staged.items():
    ...     block[int(name)] = q.dense()
    >>> result = tune_block_scales(block, staged, x, targets, steps=50, lr=0.01)
    >>> result.kept and result.loss_after < result.loss_before
    True
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantmoe.quant.gptq import scale_in_dtype
from quantmoe.quant.grid import round_scale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneResult:
    """What tuning one block did: its output loss (mean squared error per element over every
    calibration batch) with GPTQ's scales and with the tuned ones, and whether they were kept."""

    loss_before: float
    loss_after: float
    kept: bool
    steps: int


def tune_steps(steps: int) -> int:
    """``steps`` checked: a non-negative number of optimizer steps (0 = no tuning)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"check `tune_steps`: {steps!r} is not a non-negative number of steps (0 = off)")
    return steps


class _ScaledCodes(nn.Module):
    """A linear computing ``(codes - zero) * s0 * exp(t)`` with trainable ``t`` (out, groups)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, in_features: int, bias: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.codes = codes.float()  # (out, groups, group_size): codes - zero, the last group zero-padded
        self.scale0 = scale.float()  # (out, groups)
        self.t = nn.Parameter(torch.zeros_like(self.scale0))
        self.in_features, self.bias, self.dtype = in_features, bias, dtype
        self.fixed: torch.Tensor | None = None  # a scale to use instead of the trained one

    def scale(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.t) if self.fixed is None else self.fixed  # (out, groups)

    def weight_for(self, scale: torch.Tensor) -> torch.Tensor:
        W = (self.codes * scale[:, :, None]).flatten(1)[:, :self.in_features]  # (out, in)
        return W.to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(self.scale()), self.bias)


def _block_loss(block: nn.Module, inputs: Sequence[tuple[tuple, dict]], targets: Sequence[torch.Tensor],
                batches: Sequence[int]) -> torch.Tensor:
    total = torch.zeros((), device=targets[0].device)
    for i in batches:
        args, kwargs = inputs[i]
        out = block(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        total = total + F.mse_loss(out.float(), targets[i].detach().float(), reduction="sum")
    return total / sum(targets[i].numel() for i in batches)


def tune_block_scales(root: nn.Module, staged: Mapping[str, nn.Module], inputs: Sequence[tuple[tuple, dict]],
                      targets: Sequence[torch.Tensor], steps: int, lr: float = 0.005,
                      block: nn.Module | None = None) -> TuneResult:
    """Tune the scales of ``staged`` (name in ``root`` -> ``QuantLinear``) against ``targets``.

    ``block`` (default ``root``) is run on each of ``inputs`` (``(args, kwargs)`` per batch) and
    compared with the matching ``targets``; each named module in ``root`` is replaced while
    tuning and put back as the dense stand-in of its ``QuantLinear`` (with the kept scales)
    afterwards. The ``QuantLinear`` buffers are updated in place when the tuned scales are kept.
    """
    tune_steps(steps)
    block = root if block is None else block
    every = list(range(len(inputs)))
    tunable: dict[str, _ScaledCodes] = {}
    for name, qlinear in staged.items():
        codes = qlinear._cached_codes()
        if codes.dim() != 3:
            continue  # a non-contiguous group assignment: not the stored layout, left alone
        tunable[name] = _ScaledCodes(codes, qlinear.scales, qlinear.in_features,
                                     None if qlinear.bias is None else qlinear.bias.detach(), qlinear.scales.dtype)
        root.set_submodule(name, tunable[name])
    after: float | None = None  # set once the tuned scales are measured
    try:
        with torch.no_grad():
            before = _block_loss(block, inputs, targets, every).item()
        optimizer = torch.optim.Adam([m.t for m in tunable.values()], lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = _block_loss(block, inputs, targets, [step % len(inputs)])
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            tuned = {name: scale_in_dtype(round_scale(m.scale().detach()), m.dtype) for name, m in tunable.items()}
            for name, m in tunable.items():
                m.fixed = tuned[name]
            after = _block_loss(block, inputs, targets, every).item()
    finally:
        kept = after is not None and after < before
        for name, qlinear in staged.items():
            if kept and name in tunable:
                with torch.no_grad():
                    qlinear.scales.copy_(tuned[name].to(qlinear.scales.dtype))
            root.set_submodule(name, qlinear.dense())
    return TuneResult(before, after, kept, steps)
