"""Hessian statistics of linear inputs, collected by hooks in one place.

H = 2/n * sum_t w_t x_t x_t^T over the calibration tokens a linear sees (w_t = 1 except in
the ``weighted`` MoE mode, where w_t is the router weight the token gave the expert).

MoE modes (see CalibrationConfig): in ``routed`` an expert's linears see the tokens routed
to it; in ``all`` a pre-hook on the experts module runs every expert on every token to feed
the statistics, and the routed forward that follows is not recorded, so the block output
is unchanged; in ``weighted`` each routed token's row is scaled by sqrt(w_t).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from quantmoe.anatomy import LinearUnit

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Running sum of x x^T for one input (shared by the linears that read the same input)."""

    in_features: int
    device: torch.device
    xtx: torch.Tensor = field(init=False)
    weight_sum: float = 0.0  # sum of token weights (tokens, when unweighted)
    tokens: int = 0  # rows seen

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if weights is not None:
            weights = weights.detach()
            self.weight_sum += float(weights.sum())
            x = x * weights.float().sqrt().unsqueeze(-1)
        else:
            self.weight_sum += x.shape[0]
        self.tokens += x.shape[0]
        self.xtx.addmm_(x.T, x)

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.weight_sum, 1e-12))


@dataclass(frozen=True)
class ExpertsHookTarget:
    """An (unfused) experts module and which of its units are being calibrated."""

    module_name: str
    num_experts: int


class StopForward(Exception):
    """Raised by a collector once every input it needs from the current batch was recorded."""


class HessianCollector:
    """Registers input hooks for a set of units; ``input_key`` decides which units share stats.

    With ``stop_early`` the forward pass is cut (``StopForward``) as soon as every input of
    the stage has been recorded for the current batch: stages that calibrate attention then
    skip the MoE part of the block, which is most of its compute. Only for stages without
    routed experts (which experts a batch reaches is not known in advance).
    """

    def __init__(self, model: nn.Module, units: Sequence[LinearUnit], input_key, experts: Sequence[ExpertsHookTarget],
                 mode: str, stop_early: bool = False) -> None:
        self.model = model
        self.units = list(units)
        self.mode = mode
        self.stats: dict[str, InputStats] = {}
        self.key_of = {u.name: input_key(u) for u in self.units}
        self.routed_tokens: dict[str, torch.Tensor] = {t.module_name: torch.zeros(t.num_experts, dtype=torch.long)
                                                       for t in experts}
        self._experts = list(experts)
        self._expert_weights: dict[tuple[str, int], torch.Tensor] = {}
        self._suspended: set[str] = set()
        self.stop_early = stop_early and all(u.expert is None for u in self.units)
        self._pending: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- hooks ------------------------------------------------------------------------------
    def _experts_pre_hook(self, target: ExpertsHookTarget):
        def hook(module, args):
            hidden, top_k_index, top_k_weights = args[0], args[1], args[2]
            idx = top_k_index.reshape(-1)
            self.routed_tokens[target.module_name] += torch.bincount(
                idx[idx < target.num_experts].cpu(), minlength=target.num_experts)[: target.num_experts]
            if self.mode == "weighted":
                for e in range(target.num_experts):
                    pos, tok = torch.where((top_k_index == e).T)  # the order UnfusedExperts uses
                    self._expert_weights[(target.module_name, e)] = top_k_weights[tok, pos]
            elif self.mode == "all":
                with torch.no_grad():
                    for e in range(target.num_experts):
                        module[e](hidden)
                self._suspended.add(target.module_name)
        return hook

    def _experts_post_hook(self, target: ExpertsHookTarget):
        def hook(_module, _args, _output):
            self._suspended.discard(target.module_name)
            self._expert_weights.clear()
        return hook

    @contextmanager
    def attached(self, experts_module_of: dict[str, str | None]) -> Iterator[HessianCollector]:
        """Hooks live exactly as long as the ``with`` block."""
        try:
            owners = {}
            for u in self.units:
                owners.setdefault(self.key_of[u.name], u)
            for key, owner in owners.items():
                linear = self.model.get_submodule(owner.name)
                self._handles.append(linear.register_forward_pre_hook(
                    self._owner_hook(key, experts_module_of.get(owner.name), owner)))
            for t in self._experts:
                mod = self.model.get_submodule(t.module_name)
                self._handles.append(mod.register_forward_pre_hook(self._experts_pre_hook(t)))
                self._handles.append(mod.register_forward_hook(self._experts_post_hook(t)))
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._suspended.clear()
            self._expert_weights.clear()

    def _owner_hook(self, key: str, experts_module: str | None, unit: LinearUnit):
        def hook(_module, inputs):
            if experts_module is not None and experts_module in self._suspended:
                return
            x = inputs[0]
            if not torch.isfinite(x).all():
                raise ValueError(f"NaN/Inf calibration activations reach {unit.name}: check the model's weights "
                                 "and dtype (float16 overflow?) before quantizing")
            stats = self.stats.get(key)
            if stats is None:
                stats = self.stats[key] = InputStats(x.shape[-1], x.device)
            weights = self._expert_weights.get((experts_module, unit.expert)) if self.mode == "weighted" else None
            stats.add(x, weights)
            if self.stop_early:
                self._pending.discard(key)
                if not self._pending:
                    raise StopForward
        return hook

    def start_batch(self) -> None:
        """Call before each batch's forward when ``stop_early`` is on."""
        self._pending = set(self.key_of.values())

    def hessian(self, unit: LinearUnit) -> tuple[torch.Tensor, int]:
        """(H, tokens seen) of a unit's input; zero tokens gives an all-zero H."""
        stats = self.stats.get(self.key_of[unit.name])
        if stats is None:
            dev = next(self.model.get_submodule(unit.name).buffers(), None)
            device = dev.device if dev is not None else next(self.model.parameters()).device
            return torch.zeros(unit.in_features, unit.in_features, device=device), 0
        return stats.hessian(), stats.tokens
