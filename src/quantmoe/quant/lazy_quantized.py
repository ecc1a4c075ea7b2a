"""A quantmoe checkpoint read block by block: ``LazyCheckpoint`` for quantized folders.

The skeleton is ``quantized_skeleton`` (the one ``load_quantized`` fills at once: per-expert
view, a ``QuantLinear`` shell per quantized linear) on ``meta``. The checkpoint's keys are
already the model's (no conversion), so they are grouped by block by their prefix; reading a
block assigns its tensors (floating ones cast to the model's dtype, as ``load_quantized``
does) and rebuilds its ``QuantLinear`` group indices. ``release_block`` also drops the
linears' unpacked code caches (plain attributes that ``.to("meta")`` would keep).

Before any work: the quantization config is read, every shard is checked (present, not
truncated, its keys where the index says), optionally against its recorded SHA-256, and the
keys must be exactly the skeleton's (a tied LM head excepted).

Example:
    >>> lazy = LazyQuantized("runs/q30b")                      # doctest: +SKIP
    >>> block = lazy.load_block(0); lazy.release_block(0)      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

import torch

from quantmoe.allocator import fix_malloc_threshold
from quantmoe.anatomy import family_of
from quantmoe.models import read_model_config
from quantmoe.quant.checkpoint import (
    CorruptCheckpointError,
    quantized_skeleton,
    read_quantization_config,
    verify_weights,
)
from quantmoe.quant.lazy import (
    OUTSIDE,
    LazyCheckpoint,
    checkpoint_files,
    materialize_non_persistent_buffers,
)
from quantmoe.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)


class LazyQuantized(LazyCheckpoint):
    """A quantmoe checkpoint folder read block by block into a ``meta`` skeleton (see the module docstring)."""

    def __init__(self, folder: str | Path, verify: bool = True, trust_remote_code: bool = False,
                 attn_implementation: str | None = None) -> None:
        self.folder = Path(folder)
        qcfg = read_quantization_config(self.folder)
        self.files = checkpoint_files(self.folder)
        if verify:
            verify_weights(self.folder, qcfg)
        fix_malloc_threshold()
        config = read_model_config(self.folder, trust_remote_code=trust_remote_code)
        self.dtype = getattr(torch, qcfg["dtype"])
        self.model = quantized_skeleton(config, qcfg, trust_remote_code, attn_implementation).eval()
        materialize_non_persistent_buffers(self.model, config, skip=(QuantLinear,))
        self.family = family_of(self.model)
        self.expected = {k: t.dtype for k, t in self.model.state_dict().items()}
        self.groups = self._group_keys()
        self.loads: list[int] = []

    def _group_keys(self) -> dict[int, list[str]]:
        prefix = re.compile(rf"^{re.escape(self.family.layers)}\.(\d+)\.")
        groups: dict[int, list[str]] = defaultdict(list)
        for key in self.files:
            match = prefix.match(key)
            groups[int(match.group(1)) if match else OUTSIDE].append(key)
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = sorted(k for k in self.expected if k not in self.files
                         and not (tied and k.startswith(self.family.lm_head + ".")))
        unexpected = sorted(k for k in self.files if k not in self.expected)
        if missing or unexpected:
            raise CorruptCheckpointError(f"{self.folder}: its tensors do not fit the model of its config (missing "
                                         f"{missing[:3]}, unexpected {unexpected[:3]}): quantize again")
        return dict(groups)

    def _expert_reads(self, index: int) -> None:
        return None  # a quantized checkpoint stores its experts per expert: read as they are

    def _read(self, group: int) -> None:
        from safetensors import safe_open

        keys = self.groups.get(group, [])
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key]].append(key)
        state: dict[str, torch.Tensor] = {}
        for path, ks in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for key in ks:
                    t = fh.get_tensor(key)
                    state[key] = t.to(self.expected[key]) if t.is_floating_point() else t  # stored narrower
        if group == OUTSIDE:
            target, prefix = self.model, ""
        else:
            target, prefix = self.model.get_submodule(self.family.layers)[group], f"{self.family.layers}.{group}."
        # the keys were checked against the skeleton in __init__: a block's are exactly its own
        target.load_state_dict({k.removeprefix(prefix): t for k, t in state.items()}, strict=group != OUTSIDE,
                               assign=True)
        del state
        for module in target.modules() if group != OUTSIDE else ():
            if isinstance(module, QuantLinear):
                module.reset_g_idx()
        self.loads.append(group)

    def release_block(self, index: int) -> None:
        block = self.model.get_submodule(self.family.layers)[index]
        for module in block.modules():
            if isinstance(module, QuantLinear):
                module.clear_code_cache()
        block.to("meta")
