"""Lazy loading: a model skeleton on ``meta`` whose blocks are read from safetensors one at a time.

The skeleton is built from the config alone (no weights). Every checkpoint key is mapped to
the model key it loads into with transformers' own conversion machinery
(``get_model_conversion_mapping``: the same renames and expert fusions ``from_pretrained``
applies, e.g. Mixtral's ``block_sparse_moe.experts.3.w1`` -> ``mlp.experts.gate_up_proj``) and
grouped by block. ``load_block`` memory-maps the shards, reads only that block's keys and
converts them with ``convert_and_load_state_dict_in_model``; ``release_block`` puts the block
back on ``meta``. The files are checked before any work: a shard the index names but the
folder lacks, a truncated file, a tensor the model needs that no shard holds.

Example:
    >>> lazy = LazyCheckpoint("embedded/mixtral-s")            # doctest: +SKIP
    >>> lazy.load_block(1)                                      # doctest: +SKIP
    >>> lazy.release_block(1)                                   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from quantmoe.allocator import fix_malloc_threshold
from quantmoe.anatomy import family_of
from quantmoe.multimodal import key_mapping_of, multimodal_of, text_config_of
from quantmoe.quant.fp8 import SCALE_SUFFIX, DequantizedSlice, fp8_block_size
from quantmoe.quant.mxfp4 import Mxfp4Slice, is_mxfp4, mxfp4_pairs

log = logging.getLogger(__name__)

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
OUTSIDE = -1  # the group of keys that belong to no block (embeddings, final norm, LM head)


class CheckpointFilesError(ValueError):
    """A model folder whose safetensors files are missing, truncated or do not cover the model."""


def _check_file(path: Path) -> list[str]:
    """The tensor names of one safetensors file, after checking its header against its size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointFilesError(f"{path} is truncated or not a safetensors file ({size} bytes): "
                                       "download or copy it again")
        try:
            header = json.loads(fh.read(n))
        except ValueError as err:
            raise CheckpointFilesError(f"{path} has an unreadable header ({err}): download or copy it again") from err
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise CheckpointFilesError(f"{path} is truncated: its header describes {expected} bytes, the file has "
                                   f"{size}; download or copy it again")
    return [k for k in header if k != "__metadata__"]


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Checkpoint key -> file, for a single ``model.safetensors`` or a sharded folder with its index.

    Every file is checked (present, not truncated) and every key the index lists must be in
    the shard it names; the error names the file and what to do.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointFilesError(f"{index} is not a safetensors index (no readable `weight_map`): "
                                       "download it again") from err
        by_file: dict[str, list[str]] = defaultdict(list)
        for key, name in weight_map.items():
            by_file[name].append(key)
        out: dict[str, Path] = {}
        for name, keys in sorted(by_file.items()):
            path = folder / name
            if not path.exists():
                raise CheckpointFilesError(f"{path} is missing: {index.name} lists it for {len(keys)} tensors "
                                           f"(e.g. {keys[0]}); download the model again or copy that shard")
            held = set(_check_file(path))
            absent = [k for k in keys if k not in held]
            if absent:
                raise CheckpointFilesError(f"{path} lacks {len(absent)} tensors its index assigns to it "
                                           f"(e.g. {absent[0]}): the shard or the index is from another download")
            out.update({k: path for k in keys})
        return out
    single = folder / SINGLE_NAME
    if single.exists():
        return {k: single for k in _check_file(single)}
    raise CheckpointFilesError(f"{folder} has neither {SINGLE_NAME} nor {INDEX_NAME}: streaming reads safetensors "
                               "checkpoints only (convert .bin weights with transformers' save_pretrained)")


def config_dtype(config) -> torch.dtype:
    """The checkpoint's own dtype (``dtype``/``torch_dtype`` in config.json), float32 if unset."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return torch.float32


def materialize_non_persistent_buffers(model: nn.Module, config, skip: tuple[type, ...] = ()) -> None:
    """Rebuild modules (rotary embeddings) whose non-saved buffers are on ``meta``, on the CPU
    (but modules of the types in ``skip``, which rebuild their own)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, skip):
            continue
        lost = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None
                and getattr(module, b).is_meta]
        if not lost:
            continue
        rebuild_module(model, name, module, config)


def _buffers_by_initializer(model: nn.Module, module: nn.Module) -> bool:
    """Fill `module`'s meta buffers as the model's own `_init_weights` does (Gemma 4's embedding
    scale), on a stand-in whose parameters are on meta, so no loaded weight is touched."""
    init_weights = getattr(model, "_init_weights", None)
    if init_weights is None:
        return False
    stand_in = copy.copy(module)
    stand_in._parameters = {k: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                            for k, p in module._parameters.items()}
    stand_in._buffers = {k: torch.empty_like(b, device="cpu") if b is not None and b.is_meta else b
                         for k, b in module._buffers.items()}
    init_weights(stand_in)
    for k, b in stand_in._buffers.items():
        module._buffers[k] = b
    return True


def rebuild_module(model: nn.Module, name: str, module: nn.Module, config) -> None:
    """Give `module` (at `name`) its non-saved buffers on the CPU: a fresh module built from the config
    (rotary embeddings), or the buffers the model's initializer fills (modules not built from the config)."""
    try:
        fresh = type(module)(config=config)
    except TypeError as err:
        if _buffers_by_initializer(model, module):
            return
        raise RuntimeError(f"cannot rebuild the non-saved buffers of {name} ({type(module).__name__}): "
                           "its constructor does not take the model config") from err
    model.set_submodule(name, fresh)


def own_memory(module: nn.Module) -> None:
    """Copy every parameter and buffer of ``module`` that borrows its memory into memory of its own.

    safetensors reads a tensor without a copy: its storage is the mapped shard (not resizable).
    Experts that transformers stacks into one fused tensor are copies, but the attention's weights,
    norms and router stay views of the shard, and one such view keeps the whole shard mapped, with
    every page read from it counted in the process's resident memory: as much again as the block's
    experts while the block is worked on. Shared (tied) tensors stay shared.
    """
    copies: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is None or t.is_meta or t.untyped_storage().resizable():
                    continue
                if id(t) not in copies:
                    data = t.detach().clone()
                    copies[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(
                        t, nn.Parameter) else data
                table[name] = copies[id(t)]


def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``config`` with every weight on ``meta`` (non-saved buffers rebuilt on the CPU)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 experts_implementation="eager")
    materialize_non_persistent_buffers(model, config)
    return model.eval()


class LazyCheckpoint:
    """A model folder read block by block into a ``meta`` skeleton (see the module docstring)."""

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None) -> None:
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.files = checkpoint_files(self.folder)
        fix_malloc_threshold()
        outer = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        self.multimodal = multimodal_of(outer) is not None  # its text model is read (quantmoe/multimodal.py)
        self.key_mapping = key_mapping_of(outer)
        config = text_config_of(outer)
        self.fp8_block = fp8_block_size(config)  # FP8 weights are dequantized as they are read
        # an FP8 weight's key -> the key of its per-tile scales
        self.scales = {k.removesuffix(SCALE_SUFFIX): k for k in self.files
                       if k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in self.files} \
            if self.fp8_block is not None else {}
        # MXFP4 experts: a parameter's key -> its (blocks, scales) keys; the parameter is read from both
        self.mxfp4 = mxfp4_pairs(self.files) if is_mxfp4(config) else {}
        for key, (blocks, _) in self.mxfp4.items():
            self.files[key] = self.files[blocks]
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        self.dtype = dtype if dtype is not None else config_dtype(config)
        self.model = build_skeleton(config, self.dtype, trust_remote_code)
        self.family = family_of(self.model)
        self.groups = self._group_keys()
        self.loads: list[int] = []  # the groups read, in order (for tests and logs)

    def _conversions(self):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = get_model_conversion_mapping(self.model, key_mapping=self.key_mapping)
        return (mapping, [m for m in mapping if isinstance(m, WeightRenaming)],
                [m for m in mapping if isinstance(m, WeightConverter)])

    def _group_keys(self) -> dict[int, list[str]]:
        """Checkpoint keys per block (``OUTSIDE`` for the rest), checked to cover every model tensor."""
        from transformers.core_model_loading import rename_source_key

        self.mapping, renamings, self.converters = self._conversions()
        meta = self.model.state_dict()
        self.renamed: dict[str, tuple[str, str | None]] = {}  # checkpoint key -> (model key, source pattern)
        prefix = re.compile(rf"^{re.escape(self.family.layers)}\.(\d+)\.")
        groups: dict[int, list[str]] = defaultdict(list)
        targets: set[str] = set()
        skipped = []
        scale_keys = set(self.scales.values()) | {k for pair in self.mxfp4.values() for k in pair}
        for key in self.files:
            if key in scale_keys:  # read with its weight
                continue
            target, pattern = rename_source_key(key, renamings, self.converters, self.model.base_model_prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            if target not in meta:
                skipped.append(key)
                continue
            self.renamed[key] = (target, pattern)
            targets |= self._split_targets(target, pattern)
            match = prefix.match(target)
            groups[int(match.group(1)) if match else OUTSIDE].append(key)
        if skipped and self.multimodal:
            log.info("%d tensors of the multimodal checkpoint's towers are skipped (e.g. %s)", len(skipped), skipped[0])
        elif skipped:
            log.warning("%d checkpoint tensors load into no module of the model and are skipped (e.g. %s)",
                        len(skipped), skipped[0])
        tied = {k for k in meta if getattr(self.model.config, "tie_word_embeddings", False)
                and k.startswith(self.family.lm_head + ".")}
        missing = sorted(k for k in meta if k not in targets and k not in tied)
        if missing:
            raise CheckpointFilesError(f"the safetensors files of {self.folder} hold no tensor for {len(missing)} "
                                       f"weights of the model (e.g. {missing[0]}): the checkpoint is incomplete or "
                                       "its config.json belongs to another model")
        return dict(groups)

    def _split_targets(self, target: str, pattern: str | None) -> set[str]:
        """The model keys one checkpoint key loads: ``target``, and the other parts of a converter
        that splits one tensor into several (LARA's ``linear_attn.in_proj`` into ``in_proj_qkv``, ...)."""
        converter = next((c for c in self.converters if pattern in c.source_patterns), None) if pattern else None
        if converter is None or len(converter.target_patterns) < 2:
            return {target}
        first = converter.target_patterns[0]
        return {target.replace(first, other, 1) for other in converter.target_patterns}

    def _read(self, group: int, skip: frozenset[str] = frozenset()) -> None:
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        keys = [k for k in self.groups.get(group, []) if k not in skip]
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key]].append(key)
        handles = {path: safe_open(str(path), framework="pt", device="cpu")
                   for path in {*by_file, *(self.files[self.scales[k]] for k in keys if k in self.scales),
                                *(self.files[part] for k in keys for part in self.mxfp4.get(k, ()))}}
        state = {key: self._tensor(key, handles) for path, ks in by_file.items() for key in ks}
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            info, _ = convert_and_load_state_dict_in_model(
                self.model, state, LoadStateDictConfig(dtype=self.dtype, weight_mapping=self.mapping))
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        del state, handles
        # what was read without a copy still maps its shard: copied, the shard is unmapped
        own_memory(self.model if group == OUTSIDE else self.model.get_submodule(self.family.layers)[group])
        if info.mismatched_keys or info.conversion_errors:
            bad = sorted(info.mismatched_keys)[:1] or sorted(info.conversion_errors)[:1]
            raise CheckpointFilesError(f"{self.folder}: tensors do not fit the model's config (e.g. {bad[0]}): "
                                       "config.json and the weights come from different models")
        self.loads.append(group)

    def _tensor(self, key: str, handles: dict):
        """Checkpoint tensor ``key`` as a lazy slice (an FP8 weight's or MXFP4 parameter's dequantizes
        to float32 when read) from the open ``handles`` (path -> safe_open)."""
        if key in self.mxfp4:
            blocks, scales = self.mxfp4[key]
            return Mxfp4Slice(handles[self.files[blocks]].get_slice(blocks),
                              handles[self.files[scales]].get_slice(scales))
        part = handles[self.files[key]].get_slice(key)
        if key not in self.scales:
            return part
        return DequantizedSlice(part, handles[self.files[self.scales[key]]].get_slice(self.scales[key]),
                                self.fp8_block)

    def load_outside(self) -> None:
        """Embeddings, final norm and LM head (tied weights re-tied)."""
        self._read(OUTSIDE)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def release_outside(self, keep: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
        """Everything outside the blocks back on ``meta``, but the modules named in ``keep``; with
        ``only``, just the modules it names (the LM head while block 0's inputs are captured: the
        forward before the blocks may read more than the embedding, ZAYA's input scale)."""
        layers = self.family.layers
        under = lambda name, names: any(name == k or name.startswith(k + ".") for k in names)  # noqa: E731
        for name, module in self.model.named_modules():
            inside = name == layers or name.startswith(layers + ".")
            if inside or under(name, keep) or (only is not None and not under(name, only)):
                continue
            for pname, p in list(module.named_parameters(recurse=False)):
                setattr(module, pname, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
            for bname, b in list(module.named_buffers(recurse=False)):
                if b is not None and bname not in module._non_persistent_buffers_set:
                    module.register_buffer(bname, torch.empty_like(b, device="meta"))

    def load_block(self, index: int, per_expert: bool = False) -> nn.Module:
        """Block ``index``'s weights read from disk (CPU, ``self.dtype``), fused as the model defines them;
        with ``per_expert`` its routed experts in the per-expert view instead (``UnfusedExperts``), read
        a few experts at a time, never as fused copies (quant/expert_load.py)."""
        from quantmoe.anatomy.expert_view import install_unfused
        from quantmoe.quant.expert_load import read_experts

        reads = self._expert_reads(index) if per_expert else None
        if reads is None:
            self._read(index)
        else:
            self._read(index, skip=reads.keys)
            install_unfused(self.model, reads.name, read_experts(self.model, reads, self.files, self._tensor))
        return self.model.get_submodule(self.family.layers)[index]

    def _expert_reads(self, index: int):
        """How block ``index``'s experts are read per expert (``ExpertReads``), or None: read fused."""
        from quantmoe.quant.expert_load import plan_expert_reads

        return plan_expert_reads(self.model, index, self.groups.get(index, []), self.renamed, self.converters,
                                 frozenset(self.scales))

    def release_block(self, index: int) -> None:
        self.model.get_submodule(self.family.layers)[index].to("meta")

    def block_params(self, index: int) -> int:
        """Parameters of block ``index`` (read from the skeleton's shapes)."""
        return sum(p.numel() for p in self.model.get_submodule(self.family.layers)[index].parameters())
