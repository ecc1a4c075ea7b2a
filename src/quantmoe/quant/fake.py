"""Fake (simulated) quantization of whole models: weights replaced by their dequantized values."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch

from quantmoe.anatomy import LinearUnit, describe, per_expert_view
from quantmoe.quant.grid import QuantSpec, rtn


@torch.no_grad()
def rtn_model(model: torch.nn.Module, spec_for: Callable[[LinearUnit], QuantSpec | None],
              inplace: bool = False) -> torch.nn.Module:
    """Round-to-nearest every quantizable linear for which ``spec_for(unit)`` gives a spec.

    Experts are reached through the per-expert view, so fused 3D expert weights are
    quantized per expert and per linear, exactly as they would be stored.
    """
    target = model if inplace else copy.deepcopy(model)
    with per_expert_view(target):
        for unit in describe(target).units:
            spec = spec_for(unit)
            if spec is None or spec.keep:
                continue
            linear = target.get_submodule(unit.name)
            linear.weight.copy_(rtn(linear.weight, spec))
    return target


def by_roles(roles: Iterable[str], spec: QuantSpec) -> Callable[[LinearUnit], QuantSpec | None]:
    """A spec function: ``spec`` for units whose role is in ``roles``, nothing for the rest."""
    wanted = frozenset(roles)
    return lambda unit: spec if unit.role in wanted else None
