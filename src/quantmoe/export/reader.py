"""Read a GPTQ-format model folder (a quantmoe export, or one GPTQModel wrote) into the
per-expert view with ``QuantLinear`` modules: the weights of the file, bit for bit.

Each quantized linear's width comes from its tensors (``qweight`` rows = in * bits / 32), its
groups from ``scales`` and ``g_idx`` (any assignment, act-order included), its zero points
from the v1 ``qzeros`` (stored zero - 1). Names are looked up as the model's checkpoint names
(``names.py``) and, for folders written from a per-expert view (GPTQModel), as the per-expert
names. Modules without ``qweight`` are plain linears (the ``-:`` modules); experts stored dense
and fused, as transformers holds them (GPTQModel 7.7 re-saves a loaded DeepSeek-V3 so), are
split into the per-expert view.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quantmoe.anatomy import describe, family_of, unfuse_experts
from quantmoe.anatomy.expert_view import experts_module_names
from quantmoe.export.gptq_format import from_gptq
from quantmoe.export.names import checkpoint_names
from quantmoe.export.writer import EXPORT_META, INDEX, WEIGHTS

log = logging.getLogger(__name__)


class NotGPTQFolderError(ValueError):
    pass


def gptq_config(path: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a GPTQ-format folder, or None if ``path`` is not one."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        qc = json.loads(cfg_path.read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq" else None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: the GPTQ folder is incomplete; copy or export it again")
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    return tensors


def load_gptq(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              trust_remote_code: bool = False, attn_implementation: str | None = None) -> nn.Module:
    """A GPTQ-format folder as a quantmoe model (per-expert view, ``QuantLinear``), in eval mode.

    ``dtype``: of scales and unquantized tensors; default the dtype recorded by a quantmoe
    export (the quantized model's), else float32.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantmoe.quant.checkpoint import assign_state

    path = Path(path)
    qc = gptq_config(path)
    if qc is None:
        raise NotGPTQFolderError(f"{path} is not a GPTQ-format folder (its config.json has no "
                                 "quantization_config with quant_method gptq)")
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt != "gptq":
        raise ValueError(f"{path}: checkpoint_format {fmt!r} is not supported; quantmoe reads GPTQ v1 "
                         "(checkpoint_format gptq)")
    meta = json.loads((path / EXPORT_META).read_text()) if (path / EXPORT_META).exists() else {}
    if dtype is None:
        dtype = getattr(torch, meta.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 experts_implementation="eager",
                                                 attn_implementation=attn_implementation)
    tensors = _read_tensors(path)
    used: set[str] = set()
    for name in experts_module_names(model, family_of(model)):  # dense fused experts, as GPTQModel re-saves some
        fused = model.get_submodule(name)
        for pname, param in list(fused.named_parameters(recurse=False)):
            t = tensors.get(f"{name}.{pname}")
            if t is not None and tuple(t.shape) == tuple(param.shape):
                setattr(fused, pname, nn.Parameter(t.to(dtype), requires_grad=False))
                used.add(f"{name}.{pname}")
    unfuse_experts(model)
    names = checkpoint_names(model)
    replaced: list[str] = []
    for unit in describe(model).units:
        key = next((k for k in (names[unit.name], unit.name) if f"{k}.qweight" in tensors), None)
        if key is None:
            continue
        parts = {leaf: tensors[f"{key}.{leaf}"] for leaf in ("qweight", "qzeros", "scales", "g_idx", "bias")
                 if f"{key}.{leaf}" in tensors}
        used |= {f"{key}.{leaf}" for leaf in parts}
        try:
            q = from_gptq(parts, unit.in_features, unit.out_features, dtype)
        except ValueError as err:
            raise ValueError(f"{path}: {key}: {err}") from None
        model.set_submodule(unit.name, q)
        replaced.append(unit.name)
    inverse = {v: k for k, v in names.items()}
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key in used:
            continue
        module, _, leaf = key.rpartition(".")
        view = inverse.get(key) or (f"{inverse[module]}.{leaf}" if module in inverse else key)
        state[view] = t.to(dtype) if t.is_floating_point() else t
    present = {k for k, t in model.state_dict().items() if not t.is_meta}  # the QuantLinears, split fused experts
    assign_state(model, state, config, f"{path} does not fit a {config.model_type} model", present)
    log.info("loaded %d GPTQ linears from %s", len(replaced), path)
    return model.to(device).eval()
