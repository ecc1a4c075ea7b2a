"""Ways to run a quantized model: packed (with or without the code cache) or dequantized once.

A model quantized by quantmoe holds every quantized linear as a packed ``QuantLinear`` inside
the per-expert view of the routed experts. Two ways to run it:

- packed (the default of ``quantmoe.load``): the weights stay packed; each ``QuantLinear``
  unpacks its codes once, on its first call, into a cache of 1 byte per weight (2 at 8 bits)
  and then multiplies by the group scales on every call. ``set_code_cache(model, False)``
  keeps only the packed form (``bits / 8`` bytes per weight) and unpacks on every call.
- dense (``quantmoe.load(..., dense=True)``, ``dequantize_model``): every ``QuantLinear``
  becomes an ``nn.Linear`` holding its dequantized weight, once, and the routed experts are
  packed back into transformers' own fused 3D tensors: the model is a plain transformers model
  in the compute dtype (as large as the full-precision model in that dtype), as fast as it.

Logits: packed with or without the cache are bit for bit those of the in-memory quantized
model (the same weight, the same matmuls). Dense has the same weights bit for bit, but the
fused experts compute gate and up as one matmul where the per-expert view does two, so the
floating-point sums can be ordered differently: equal within float tolerance, not bit for bit.
"""

from __future__ import annotations

import logging

from torch import nn

from quantmoe.anatomy import fuse_experts
from quantmoe.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_code_cache(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn the code cache of every ``QuantLinear`` on or off (off also frees it), in place."""
    for module in quant_linears(model).values():
        module.cache_codes = enabled
        if not enabled:
            module.clear_code_cache()
    return model


def code_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the code caches built so far."""
    return sum(m.code_cache_bytes() for m in quant_linears(model).values())


def dequantize_model(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Every ``QuantLinear`` -> ``nn.Linear`` with its dequantized weight (bit for bit), in place;
    with ``fuse``, the routed experts go back to the model's fused 3D tensors (its configured
    experts implementation: ``quantmoe.load`` builds models with the eager one)."""
    linears = quant_linears(model)
    for name, module in linears.items():
        model.set_submodule(name, module.dense())
    if fuse:
        fuse_experts(model)
    log.info("dequantized %d linears%s", len(linears), " and fused the experts" if fuse else "")
    return model
