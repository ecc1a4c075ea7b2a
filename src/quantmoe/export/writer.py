"""Write a quantized model as a complete GPTQ-format model folder.

The folder is what GPTQModel writes and vLLM, SGLang and transformers read: ``config.json``
with ``quantization_config`` (``quant_method: gptq``, ``checkpoint_format: gptq``, the base
``bits``/``group_size``/``sym``, ``desc_act: false`` and the ``dynamic`` map of
``export/dynamic.py``), the same settings in ``quantize_config.json``, the tokenizer, the
generation config, and the tensors under the model's own checkpoint names (``names.py``; for
``target="gptqmodel"`` the per-expert names GPTQModel looks up, which differ for Mixtral) in
``model.safetensors``, or in shards with ``model.safetensors.index.json`` when larger than
``max_shard_bytes``. ``quantmoe_export.json`` records the plan, the per-module settings and
the provenance; ``quant_report.json`` is copied when given.

``desc_act`` is false for every module: quantmoe's act-order (desc with static groups, or gar)
keeps groups contiguous, so ``g_idx`` is the plain ``i // group_size`` and engines need no
permutation.
Tensors that are not quantized are stored in bfloat16 (or float16) when all of them hold
values of that dtype exactly (a bfloat16 model quantized in float32), else in their own dtype. Writes are atomic (a temporary sibling folder renamed
into place); an existing ``--out`` is replaced only if it is an earlier export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from quantmoe.anatomy import describe
from quantmoe.atomic import current_umask
from quantmoe.export import engines
from quantmoe.export.dynamic import GPTQFormat, dynamic_map
from quantmoe.export.gptq_format import to_gptq
from quantmoe.export.names import checkpoint_names
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.qlinear import QuantLinear
from quantmoe.safeout import owner_tag

log = logging.getLogger(__name__)

EXPORT_META = "quantmoe_export.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 2**30
# GPTQModel 7.7 loads an MoE model into its own per-expert view (defuser) and looks tensors up by
# those names (Mixtral: mlp.experts.<e>.gate_proj, not the hub's block_sparse_moe.experts.<e>.w1)
PER_EXPERT_NAMES = ("gptqmodel",)


def quantization_config(base: GPTQFormat, dynamic: Mapping[str, Any]) -> dict[str, Any]:
    from quantmoe.version import __version__

    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": base.bits, "group_size": base.group_size,
            "sym": base.sym, "desc_act": False, "static_groups": False, "lm_head": False, "true_sequential": True,
            "pack_dtype": "int32", "dynamic": dict(dynamic), "meta": {"quantizer": [f"quantmoe:{__version__}"]}}


def _lossless_dtype(tensors: list[torch.Tensor]) -> torch.dtype | None:
    """bfloat16 or float16 if every tensor's values are exactly that dtype's, else None."""
    for dtype in (torch.bfloat16, torch.float16):
        if all(torch.equal(t.to(dtype).to(t.dtype), t) for t in tensors if t.is_floating_point()):
            return dtype
    return None


def _stored(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point() and t.dtype.itemsize > dtype.itemsize:
        t = t.to(dtype)
    return t.contiguous()


def export_tensors(model: nn.Module, specs: Mapping[str, QuantSpec],
                   target: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by checkpoint name, quantization_config) of a quantized per-expert-view model."""
    anatomy = describe(model)
    units = anatomy.units
    missing = [u.name for u in units if u.name not in specs]
    if missing:
        raise ValueError(f"no settings for {missing[:3]}: the specs do not cover this model")
    if target is not None:
        engines.check(units, specs, target)
    else:
        found = engines.problems(units, specs, "gptqmodel")[:1]
        if found:
            raise engines.ServingError(f"cannot export: {found[0]}")
    unit_names = {u.name for u in units}
    if target in PER_EXPERT_NAMES:  # the reader's own module names (its per-expert view of fused experts)
        names = {**{n: n for n in unit_names}, **{k: k for k in model.state_dict()}}
    else:
        names = checkpoint_names(model)
    want = {names[u.name]: GPTQFormat.of(specs[u.name], u.in_features) for u in units}
    unit_prefixes = tuple(f"{n}." for n in unit_names)
    others = [names.get(k, k).removesuffix(".weight") for k, t in model.state_dict().items()  # routers, heads
              if k.endswith(".weight") and t.dim() == 2 and not k.startswith(unit_prefixes)]
    base_hint = engines.expert_base(units, specs) if target in ("vllm", "sglang") else None
    base, dynamic = dynamic_map(units, names, want, others, base=base_hint)
    plain = [t.detach() for k, t in model.state_dict().items()
             if t.is_floating_point() and not k.endswith((".scales", ".qweight", ".qzeros"))]
    dtype = _lossless_dtype(plain)  # e.g. a bfloat16 model quantized in float32: bfloat16, exactly
    tensors: dict[str, torch.Tensor] = {}
    for u in units:
        module, key = model.get_submodule(u.name), names[u.name]
        if isinstance(module, QuantLinear) != (not specs[u.name].keep):
            raise ValueError(f"{u.name} is {'' if isinstance(module, QuantLinear) else 'not '}quantized but its "
                             f"settings say {specs[u.name].bits} bits")
        if isinstance(module, QuantLinear):
            for leaf, t in to_gptq(module).items():
                tensors[f"{key}.{leaf}"] = _stored(t, dtype) if leaf == "bias" else t.contiguous()
        else:
            for leaf, t in module.named_parameters(recurse=False):
                tensors[f"{key}.{leaf}"] = _stored(t, dtype)
    seen: set[tuple[int, int]] = set()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())  # as save_pretrained drops them
    plain_tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.startswith(unit_prefixes) or (tied and key.endswith("lm_head.weight")) or key in ignored:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        plain_tensors[key] = _stored(t, dtype)
    tensors.update(_checkpoint_layout(model, plain_tensors, per_expert=target in PER_EXPERT_NAMES))
    return tensors, {**quantization_config(base, dynamic), "_dtype": dtype}


def _checkpoint_layout(model: nn.Module, plain: dict[str, torch.Tensor], per_expert: bool) -> dict[str, torch.Tensor]:
    """The unquantized tensors under the checkpoint's names *and shapes*: transformers' own save
    conversion, run on the real tensors, so that a tensor the model holds fused and the checkpoint
    splits (Kimi-Linear's q/k/v ``conv1d``) is split as ``save_pretrained`` splits it."""
    if per_expert:
        return plain
    from transformers.core_model_loading import revert_weight_conversion

    return {k: t.contiguous() for k, t in revert_weight_conversion(model, dict(plain)).items()}


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def _write_tensors(folder: Path, tensors: Mapping[str, torch.Tensor], max_bytes: int) -> None:
    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(dict(shards[0]), str(folder / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), str(folder / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _config_json(model: nn.Module, qconfig: Mapping[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    cfg["quantization_config"] = dict(qconfig)
    if dtype is not None:  # what the unquantized tensors are stored in
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def check_export_output(out_dir: Path) -> Path:
    """``out_dir`` resolved, if an export may be written there: a new path, an empty folder, or an
    earlier export (replaced as a whole); anything else is never overwritten."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file: give a folder for the export")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_META).exists():
        raise ValueError(f"{out_dir} exists and is not a quantmoe export: choose another --out (it is never "
                         "overwritten)")
    return out_dir


def write_export(model: nn.Module, specs: Mapping[str, QuantSpec], out_dir: Path, *, tokenizer=None,
                 metadata: Mapping[str, Any] | None = None, report: Mapping[str, Any] | None = None,
                 target: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``model`` (per-expert view, ``QuantLinear`` modules) as a GPTQ-format folder."""
    out_dir = check_export_output(out_dir)
    tensors, qconfig = export_tensors(model, specs, target)
    dtype = qconfig.pop("_dtype")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{owner_tag()}-", suffix=".partial", dir=out_dir.parent))
    try:
        _write_tensors(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(_config_json(model, qconfig, dtype), indent=2, sort_keys=True))
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / "quant_report.json").write_text(json.dumps(report, indent=1))
        meta = {"format": "gptq", "modules": {n: {"bits": s.bits, "group_size": s.group_size,
                                                  "symmetric": s.symmetric} for n, s in specs.items()},
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "target": target,
                "names": "per-expert" if target in PER_EXPERT_NAMES else "checkpoint",
                **(metadata or {})}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))  # last: a folder without it is no export
        umask = current_umask()
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{owner_tag()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("GPTQ export of %d tensors -> %s", len(tensors), out_dir)
    return out_dir
