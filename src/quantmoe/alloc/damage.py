"""Measured damage of quantizing each unit at each width: the budget solver's costs.

For every quantizable linear and every allowed width b, the weight is quantized with GPTQ
(or RTN) on the full-precision model's own calibration statistics, giving the weight
change D_b = Q_b - W. Two measured estimates of what that costs:

* ``fisher`` (default; looks at the model output): the second-order Taylor estimate of the
  increase of the language-model loss, 0.5 * sum(F * D_b^2), with F the empirical Fisher
  diagonal (squared gradients of the loss on the calibration windows). Summed over
  calibration tokens, so it already weighs an expert by how often it is routed.
* ``output``: the linear's own output error on the tokens it sees,
  sum_t ||D_b x_t||^2 = n/2 * tr(D_b H D_b^T), i.e. the GPTQ objective; also weighted by
  routing frequency through the token count n.

Both are additive over units (the usual assumption of knapsack-style allocation), which is
what lets the solver pick widths jointly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from quantmoe.anatomy import ModelAnatomy, per_expert_view
from quantmoe.calib.hessian import HessianCollector
from quantmoe.quant.gptq import gptq_quantize
from quantmoe.quant.grid import QuantSpec, rtn
from quantmoe.calib.data import run_windows

log = logging.getLogger(__name__)

METRICS = ("fisher", "output")


@dataclass(frozen=True)
class DamageTable:
    units: tuple[str, ...]
    widths: tuple[int, ...]
    damage: np.ndarray  # (units, widths), >= 0
    params: np.ndarray  # (units,)
    metric: str

    def __post_init__(self) -> None:
        if self.damage.shape != (len(self.units), len(self.widths)):
            raise ValueError("damage table shape does not match units x widths")

    def row(self, name: str) -> np.ndarray:
        return self.damage[self.units.index(name)]


def _fisher(model: nn.Module, names: Sequence[str], windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal (sum of squared loss gradients) of each named linear's weight."""
    params = {n: model.get_submodule(n).weight for n in names}
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(windows), batch_size), desc="fisher", leave=False):
            batch = windows[i:i + batch_size].to(device)
            for row in batch:  # per-sequence gradients: the Fisher is a sum of per-sample outer products
                model.zero_grad(set_to_none=True)
                loss = model(input_ids=row[None], labels=row[None]).loss * (row.numel() - 1)
                loss.backward()
                for n, p in params.items():
                    if p.grad is not None:  # None: an expert this sequence did not reach
                        fisher[n] += p.grad.float() ** 2
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
        model.zero_grad(set_to_none=True)
    return fisher


@torch.no_grad()
def _hessians(model: nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor, batch_size: int,
              mode: str) -> tuple[HessianCollector, ...]:
    from quantmoe.calib.hessian import ExpertsHookTarget
    from quantmoe.quant.pipeline import STAGES, _input_key, stage_of

    collectors = []
    # one collector per stage so that shared-input keys stay unambiguous
    for stage in range(len(STAGES)):
        units = [u for u in anatomy.units if stage_of(u) == stage]
        if not units:
            continue
        experts = [ExpertsHookTarget(b.experts_module, b.num_experts) for b in anatomy.blocks if b.is_moe]
        collector = HessianCollector(model, units, _input_key, experts, mode)
        experts_of = {u.name: anatomy.blocks[u.block].experts_module if u.expert is not None else None for u in units}
        with collector.attached(experts_of):
            run_windows(model, windows, batch_size)
        collectors.append(collector)
    return tuple(collectors)


def measure_damage(model: nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor, widths: Sequence[int],
                   group_size: int | None = 128, symmetric: bool = True, metric: str = "fisher",
                   quantizer: str = "gptq", damp: float = 0.01, batch_size: int = 8,
                   moe_mode: str = "routed") -> DamageTable:
    """Damage of every quantizable unit at every width (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"check `metric`: {metric!r} is not one of {', '.join(METRICS)}")
    if quantizer not in ("gptq", "rtn"):
        raise ValueError(f"check `quantizer`: {quantizer!r} is not one of gptq, rtn")
    widths = tuple(sorted(set(widths)))
    names = tuple(u.name for u in anatomy.units)
    table = np.zeros((len(names), len(widths)))
    with per_expert_view(model):
        model.eval()
        collectors = _hessians(model, anatomy, windows, batch_size, moe_mode)
        fisher = _fisher(model, names, windows, batch_size) if metric == "fisher" else None
        for i, unit in enumerate(tqdm(anatomy.units, desc="damage", leave=False)):
            collector = next(c for c in collectors if unit.name in c.key_of)
            H, tokens = collector.hessian(unit)
            W = model.get_submodule(unit.name).weight.detach().float()
            for j, bits in enumerate(widths):
                spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
                if spec.keep:
                    continue
                if quantizer == "gptq" and tokens > 0:
                    Q = gptq_quantize(W, H, spec, damp=damp, name=unit.name).Q.float()
                else:
                    Q = rtn(W, spec).float()
                D = Q - W  # (out, in)
                if fisher is not None:
                    table[i, j] = 0.5 * float((fisher[unit.name] * D.pow(2)).sum())
                else:
                    table[i, j] = 0.5 * tokens * float(torch.einsum("oi,ij,oj->", D, H, D))
    params = np.array([u.numel for u in anatomy.units], dtype=np.float64)
    return DamageTable(units=names, widths=widths, damage=np.maximum(table, 0.0), params=params, metric=metric)
