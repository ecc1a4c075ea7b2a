"""Reading a block's routed experts from safetensors straight into the per-expert view.

transformers loads a block's experts fused: it stacks the checkpoint's per-expert tensors
(``experts.<e>.gate_proj.weight``, ...) into one 3D parameter per projection and concatenates
gate and up, while the shard's pages stay mapped; the per-expert view then copies the
experts out again. On bench_scale's 201 MB block that held 515 MB above the base for a moment,
and the view's copy another block. Quantization needs only the per-expert view, so
``read_experts`` builds it directly, a few experts at a time: each group's tensors are read
(its shards mapped for that group only), run through the conversion operations transformers
itself would apply (so the layout is transformers' own), cut into ``ExpertMLP``s, and freed.

Two ways of storing experts are read like this: one tensor per expert and projection, merged
by ``MergeModulelist`` (and ``Concatenate`` of gate and up), and one tensor for all experts
(already fused, renamed or not), read by rows. For any other conversion ``plan_expert_reads``
returns None and the block is loaded fused.

Example:
    >>> lazy = LazyCheckpoint("embedded/mixtral-s")                # doctest: +SKIP
    >>> block = lazy.load_block(0, per_expert=True)                # doctest: +SKIP
    >>> type(block.mlp.experts).__name__                           # doctest: +SKIP
    'UnfusedExperts'
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantmoe.anatomy.expert_view import (
    ExpertMLP,
    UnfusedExperts,
    expected_params,
    expert_mlps,
    expert_unit_shapes,
    view_refusal,
)
from quantmoe.anatomy.families import family_of
from quantmoe.anatomy.specs import module_at

log = logging.getLogger(__name__)

GROUP_BYTES = 16 * 2**20  # the expert weights read at once (at least one expert)
FUSED = ""  # the source pattern of an experts tensor stored fused (one checkpoint key for all experts)


@dataclass(frozen=True)
class ExpertSource:
    """Where one fused expert parameter of a block comes from in the checkpoint."""

    param: str  # its name inside the experts module: "gate_up_proj" ("mlp.w1" in a stacked layout)
    target: str  # its name in the model
    meta: torch.Tensor  # the skeleton's parameter (shape, dtype, requires_grad)
    keys: dict[str, tuple[str, ...]]  # source pattern -> its checkpoint keys in expert order ({FUSED: (key,)})
    converter: Any | None  # transformers' WeightConverter of per-expert keys; None for a fused tensor


@dataclass(frozen=True)
class ExpertReads:
    """How to read the routed experts of one block."""

    name: str  # the experts module
    num_experts: int
    sources: tuple[ExpertSource, ...]

    @property
    def keys(self) -> frozenset[str]:
        """Every checkpoint key the sources read."""
        return frozenset(k for s in self.sources for ks in s.keys.values() for k in ks)


def _merges_per_expert(operations: list) -> bool:
    """Whether a converter only stacks per-expert tensors (dim 0) and joins them along another dim,
    so converting a few experts gives those experts' rows of the fused parameter."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    return bool(operations) and isinstance(operations[0], MergeModulelist) and all(
        (isinstance(op, MergeModulelist) and op.dim == 0) or (isinstance(op, Concatenate) and op.dim != 0)
        for op in operations)


def _natural(key: str) -> list:
    """Checkpoint keys in expert order: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in key.split(".")]


def plan_expert_reads(model: nn.Module, index: int, keys: list[str], renamed: dict[str, tuple[str, str | None]],
                      converters: list, scaled: frozenset[str] = frozenset()) -> ExpertReads | None:
    """How block ``index``'s fused experts can be read per expert, or None (no routed experts, no
    per-expert view, or a conversion other than the two this module reads).

    ``renamed``: checkpoint key -> (model key, the converter's source pattern or None), as
    transformers' ``rename_source_key`` gives them; ``scaled``: the FP8 weights with per-tile
    scales (read whole: a fused tensor of them is not read by rows).
    """
    spec = family_of(model)
    if view_refusal(model) is not None:
        return None
    experts = module_at(model.get_submodule(spec.layers)[index], spec.experts)
    if experts is None or isinstance(experts, UnfusedExperts):
        return None
    name = f"{spec.layers}.{index}.{spec.experts}"
    params = dict(experts.named_parameters())
    if set(params) != expected_params(spec.expert_layout):
        return None
    num = len(expert_unit_shapes(experts, spec.expert_layout, name))
    by_param: dict[str, dict[str, list[str]]] = {}
    for key in keys:
        target, pattern = renamed[key]
        if target.startswith(name + "."):
            by_param.setdefault(target[len(name) + 1:], {}).setdefault(pattern or FUSED, []).append(key)
    if set(by_param) != set(params):
        return None
    sources = []
    for param, lists in sorted(by_param.items()):
        meta = params[param]
        if FUSED in lists:
            if len(lists) != 1 or len(lists[FUSED]) != 1 or meta.shape[0] % num or lists[FUSED][0] in scaled:
                return None
            sources.append(ExpertSource(param, f"{name}.{param}", meta, {FUSED: tuple(lists[FUSED])}, None))
            continue
        converter = next((c for c in converters if next(iter(lists)) in c.source_patterns), None)
        if (converter is None or not _merges_per_expert(converter.operations) or meta.shape[0] != num
                or any(p not in converter.source_patterns or len(ks) != num for p, ks in lists.items())):
            return None
        ordered = {p: tuple(sorted(ks, key=_natural)) for p, ks in lists.items()}
        sources.append(ExpertSource(param, f"{name}.{param}", meta, ordered, converter))
    return ExpertReads(name, num, tuple(sources))


Reader = Callable[[str, dict], Any]  # (key, open handles by path) -> a lazy slice or a tensor


def _slice(files: dict[str, Path]) -> Reader:
    return lambda key, handles: handles[files[key]].get_slice(key)


def _read_group(model: nn.Module, reads: ExpertReads, files: dict[str, Path], start: int,
                stop: int, read: Reader) -> dict[str, torch.Tensor]:
    """Experts ``start..stop-1``'s rows of every fused parameter, read and converted."""
    from safetensors import safe_open

    from quantmoe.quant.lazy import CheckpointFilesError

    class _Opened(dict):  # this group's shards only, opened on first use: dropped, they are unmapped
        def __missing__(self, path: Path):
            self[path] = safe_open(str(path), framework="pt", device="cpu")
            return self[path]

    handles = _Opened()

    def tensor_slice(key: str):
        return read(key, handles)

    params = {}
    for src in reads.sources:
        rows = src.meta.shape[0] // reads.num_experts
        expected = ((stop - start) * rows, *src.meta.shape[1:])
        if src.converter is None:
            (key,) = src.keys[FUSED]
            part = tensor_slice(key)
            if tuple(part.get_shape()) != tuple(src.meta.shape):
                raise CheckpointFilesError(f"{files[key]}: {key} has shape {tuple(part.get_shape())}, the model's "
                                           f"{src.target} {tuple(src.meta.shape)}: config.json and the weights "
                                           "come from different models")
            value = part[start * rows:stop * rows]
        else:
            collected: dict[str, Any] = {p: [tensor_slice(k)[...].to(src.meta.dtype) for k in ks[start:stop]]
                                         for p, ks in src.keys.items()}
            try:
                for op in src.converter.operations:
                    collected = op.convert(collected, source_patterns=src.converter.source_patterns,
                                           target_patterns=src.converter.target_patterns, full_layer_name=src.target,
                                           model=model, config=model.config, missing_keys=None)
            except RuntimeError as err:  # stacking or joining tensors of different shapes
                raise CheckpointFilesError(f"the experts' tensors for {src.target} do not fit together ({err}): "
                                           "config.json and the weights come from different models") from err
            (value,) = collected.values()
        if tuple(value.shape) != expected:
            raise CheckpointFilesError(f"the experts' tensors for {src.target} give {tuple(value.shape)} for experts "
                                       f"{start}..{stop - 1}, the model expects {expected}: config.json and the "
                                       "weights come from different models")
        params[src.param] = value.to(src.meta.dtype)
    return params


def read_experts(model: nn.Module, reads: ExpertReads, files: dict[str, Path], read: Reader | None = None,
                 group_bytes: int = GROUP_BYTES) -> list[ExpertMLP]:
    """The block's routed experts as ``ExpertMLP``s (CPU, the skeleton's dtype), read from ``files``
    (checkpoint key -> file) a group of experts of at most ``group_bytes`` at a time; ``read``
    gives a key's tensor from the open shards (default: the stored tensor; ``LazyCheckpoint``
    dequantizes FP8 weights)."""
    read = read if read is not None else _slice(files)
    layout = family_of(model).expert_layout
    fused = model.get_submodule(reads.name)
    per_expert = sum(s.meta.numel() * s.meta.element_size() for s in reads.sources) / reads.num_experts
    step = max(1, int(group_bytes // max(per_expert, 1.0)))
    requires_grad = reads.sources[0].meta.requires_grad
    experts: list[ExpertMLP] = []
    for start in range(0, reads.num_experts, step):
        stop = min(reads.num_experts, start + step)
        params = _read_group(model, reads, files, start, stop, read)
        experts += expert_mlps(fused, params, layout, stop - start, requires_grad)
        del params
    log.debug("read %d experts of %s in groups of %d", reads.num_experts, reads.name, step)
    return experts
