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
from quantmoe.anatomy.expert_view import EXPERT_HIDDEN_KIND, EXPERT_INPUT_KINDS
from quantmoe.finite import all_finite
from quantmoe.hooks import removed_after

log = logging.getLogger(__name__)


# From this many input features on, x^T x is accumulated as its upper block triangle (see InputStats)
TRIANGLE_MIN_FEATURES = 256
TRIANGLE_PANELS = 4


@dataclass
class InputStats:
    """Running sum of x x^T for one input (shared by the linears that read the same input).

    x^T x is symmetric, and torch has no symmetric rank-k update (BLAS syrk). For inputs of
    ``TRIANGLE_MIN_FEATURES`` features or more the sum is kept as its upper block triangle: the
    columns are cut into ``TRIANGLE_PANELS`` panels and panel i adds x_i^T x[:, i:] to its row of
    blocks (10 of 16 blocks: 0.62x the multiply-adds). ``hessian()`` mirrors the upper triangle,
    so H is exactly symmetric; each entry is the same dot product as in a full x^T x, summed in
    another blocking (float rounding). ``xtx`` below the diagonal blocks stays zero.
    """

    in_features: int
    device: torch.device
    xtx: torch.Tensor = field(init=False)
    weight_sum: float = 0.0  # sum of token weights (tokens, when unweighted)
    tokens: int = 0  # rows seen

    def __post_init__(self) -> None:
        self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)

    @property
    def triangular(self) -> bool:
        return self.in_features >= TRIANGLE_MIN_FEATURES

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if weights is not None:
            weights = weights.detach()
            self.weight_sum += float(weights.sum())
            x = x * weights.float().sqrt().unsqueeze(-1)
        else:
            self.weight_sum += x.shape[0]
        self.tokens += x.shape[0]
        if not self.triangular:
            self.xtx.addmm_(x.T, x)
            return
        n = self.in_features
        edges = [n * i // TRIANGLE_PANELS for i in range(TRIANGLE_PANELS + 1)]
        for lo, hi in zip(edges, edges[1:]):
            self.xtx[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])

    def hessian(self) -> torch.Tensor:
        xtx = self.xtx
        if self.triangular:
            xtx = xtx.triu()
            xtx += xtx.triu(1).T
        return xtx * (2.0 / max(self.weight_sum, 1e-12))


@dataclass(frozen=True)
class ExpertsHookTarget:
    """An (unfused) experts module and which of its units are being calibrated."""

    module_name: str
    num_experts: int


class StopForward(Exception):
    """Raised by a collector once every input it needs from the current batch was recorded."""


class HessianCollector:
    """Registers input hooks for a set of units; ``input_key`` decides which units share stats.

    The inputs of routed experts' gate/up (which read the expert's input directly) are
    recorded where the experts module dispatches its tokens (its pre-hook, from
    ``UnfusedExperts.routes``): the same rows, in the same order, as a hook on each expert's
    gate_proj would see, without running the experts. The other units are recorded by a
    pre-hook on their linear.

    With ``stop_early`` the forward pass is cut (``StopForward``) as soon as every input of
    the stage has been recorded for the current batch: stages that calibrate attention skip
    the MoE part of the block, and a stage of routed gate/up stops at the dispatch unless a
    shared expert runs after the routed ones. Routed down inputs count as recorded once the
    experts module has run; when nothing else would be left, they are recorded at the
    dispatch too (``ExpertMLP.hidden`` of each expert's rows) and the pass stops there.
    """

    def __init__(self, model: nn.Module, units: Sequence[LinearUnit], input_key, experts: Sequence[ExpertsHookTarget],
                 mode: str, stop_early: bool = False) -> None:
        self.model = model
        self.units = list(units)
        self.mode = mode
        self.stats: dict[str, InputStats] = {}
        self.key_of = {u.name: input_key(u) for u in self.units}
        self._readers: dict[str, set[str]] = {}  # input key -> units not yet released
        for name, key in self.key_of.items():
            self._readers.setdefault(key, set()).add(name)
        self.routed_tokens: dict[str, torch.Tensor] = {t.module_name: torch.zeros(t.num_experts, dtype=torch.long)
                                                       for t in experts}
        self._experts = list(experts)
        self._expert_weights: dict[tuple[str, int], torch.Tensor] = {}
        self._suspended: set[str] = set()
        self.stop_early = stop_early
        self._pending: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- recording ----------------------------------------------------------------------------
    def _add(self, key: str, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = InputStats(x.shape[-1], x.device)
        stats.add(x, weights)

    def _done(self, keys) -> None:
        """``keys`` are recorded for this batch; with ``stop_early``, cut the pass once nothing is pending."""
        self._pending.difference_update(keys)
        if self.stop_early and not self._pending:
            raise StopForward

    # -- hooks ------------------------------------------------------------------------------
    def _experts_pre_hook(self, target: ExpertsHookTarget, inputs: dict[int, list[str]],
                          hiddens: dict[int, list[str]]):
        """``inputs``/``hiddens``: expert -> keys of its gate/up / of its down in this collector.

        gate/up are recorded here. down is recorded here too (from ``ExpertMLP.hidden``,
        without running the experts) when the pass would end with the experts anyway;
        otherwise the experts run and down's own hook records it.
        """
        input_keys = [k for keys in inputs.values() for k in keys]
        hidden_keys = [k for keys in hiddens.values() for k in keys]

        def hook(module, args):
            hidden, top_k_index, top_k_weights = args[0].reshape(-1, args[0].shape[-1]), args[1], args[2]
            routes = module.routes(top_k_index, top_k_weights)
            counts = torch.zeros(target.num_experts, dtype=torch.long)
            for e, token_idx, _ in routes:
                counts[e] = token_idx.numel()
            self.routed_tokens[target.module_name] += counts
            if self.mode == "weighted" and not module.layout.scaled_input:  # Llama 4: the weight is in the rows
                for e, token_idx, top_k_pos in routes:
                    self._expert_weights[(target.module_name, e)] = top_k_weights[token_idx, top_k_pos]
            if self.mode == "all":  # every expert sees every token: one statistic for all gate/up
                routes = [(e, None, None) for e in range(target.num_experts)]
                if input_keys:
                    self._add(input_keys[0], hidden)
                    for k in input_keys[1:]:
                        self.stats[k] = self.stats[input_keys[0]]
            else:
                for e, token_idx, top_k_pos in routes:
                    x = module.expert_input(hidden, token_idx, top_k_pos, top_k_weights)  # Llama 4: router-scaled
                    for k in inputs.get(e, ()):
                        self._add(k, x, self._expert_weights.get((target.module_name, e)))
            self._pending.difference_update(input_keys)
            here = bool(hidden_keys) and self.stop_early and self._pending <= set(hidden_keys)
            if here:
                for e, token_idx, top_k_pos in routes:
                    if hiddens.get(e):
                        x = hidden if token_idx is None else module.expert_input(hidden, token_idx, top_k_pos,
                                                                                 top_k_weights)
                        x = module[e].hidden(x)
                        for k in hiddens[e]:
                            self._add(k, x, self._expert_weights.get((target.module_name, e)))
            elif self.mode == "all" and hidden_keys:
                for e in range(target.num_experts):
                    module[e](hidden)  # down's hook records
            if self.mode == "all":
                self._suspended.add(target.module_name)  # the routed forward that follows is not recorded
            self._done(hidden_keys if here else ())
        return hook

    def _experts_post_hook(self, target: ExpertsHookTarget, routed_keys: list[str]):
        def hook(_module, _args, _output):
            self._suspended.discard(target.module_name)
            self._expert_weights.clear()
            self._done(routed_keys)
        return hook

    @contextmanager
    def attached(self, experts_module_of: dict[str, str | None]) -> Iterator[HessianCollector]:
        """Hooks live exactly as long as the ``with`` block."""
        try:
            with removed_after() as self._handles:
                owners: dict[str, LinearUnit] = {}
                for u in self.units:
                    owners.setdefault(self.key_of[u.name], u)
                targets = {t.module_name for t in self._experts}
                inputs: dict[str, dict[int, list[str]]] = {name: {} for name in targets}
                hiddens: dict[str, dict[int, list[str]]] = {name: {} for name in targets}
                for key, owner in owners.items():
                    experts_module = experts_module_of.get(owner.name)
                    if experts_module in targets and owner.kind in EXPERT_INPUT_KINDS:
                        inputs[experts_module].setdefault(owner.expert, []).append(key)
                        continue
                    if experts_module in targets and owner.kind == EXPERT_HIDDEN_KIND:
                        hiddens[experts_module].setdefault(owner.expert, []).append(key)
                    linear = self.model.get_submodule(owner.name)
                    self._handles.append(linear.register_forward_pre_hook(self._owner_hook(key, experts_module, owner)))
                for t in self._experts:
                    mod = self.model.get_submodule(t.module_name)
                    pre = self._experts_pre_hook(t, inputs[t.module_name], hiddens[t.module_name])
                    routed = [k for keys in hiddens[t.module_name].values() for k in keys]
                    self._handles.append(mod.register_forward_pre_hook(pre))
                    self._handles.append(mod.register_forward_hook(self._experts_post_hook(t, routed)))
                yield self
        finally:
            self._handles.clear()
            self._suspended.clear()
            self._expert_weights.clear()

    def _owner_hook(self, key: str, experts_module: str | None, unit: LinearUnit):
        def hook(_module, inputs):
            if experts_module is not None and experts_module in self._suspended:
                return
            weights = self._expert_weights.get((experts_module, unit.expert)) if self.mode == "weighted" else None
            self._add(key, inputs[0], weights)
            self._done([key])
        return hook

    def start_batch(self) -> None:
        """Call before each batch's forward when ``stop_early`` is on."""
        self._pending = set(self.key_of.values())
        self._suspended.clear()
        self._expert_weights.clear()

    def tokens(self, unit: LinearUnit) -> int:
        """Calibration tokens a unit's input saw (0 if none).

        Non-finite inputs make x x^T non-finite, so one check here names the unit they reached.
        """
        stats = self.stats.get(self.key_of[unit.name])
        if stats is None:
            return 0
        if not all_finite(stats.xtx):
            raise ValueError(f"NaN/Inf calibration activations reach {unit.name}: check the model's weights "
                             "and dtype (float16 overflow?) before quantizing")
        return stats.tokens

    def hessian(self, unit: LinearUnit) -> tuple[torch.Tensor, int]:
        """(H, tokens seen) of a unit's input; zero tokens gives an all-zero H."""
        tokens = self.tokens(unit)
        stats = self.stats.get(self.key_of[unit.name])
        if stats is None:
            dev = next(self.model.get_submodule(unit.name).buffers(), None)
            device = dev.device if dev is not None else next(self.model.parameters()).device
            return torch.zeros(unit.in_features, unit.in_features, device=device), 0
        return stats.hessian(), tokens

    def release(self, unit: LinearUnit) -> None:
        """``unit`` needs its statistics no more: they are freed once every unit reading them is released."""
        key = self.key_of[unit.name]
        self._readers[key].discard(unit.name)
        if not self._readers[key]:
            self.stats.pop(key, None)
