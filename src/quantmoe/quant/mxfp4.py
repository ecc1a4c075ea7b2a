"""Checkpoints whose experts are stored in MXFP4 (GPT-OSS), read as floats.

GPT-OSS releases keep each fused expert projection ``<proj>`` (``gate_up_proj``, ``down_proj``)
as two tensors, ``config.json`` saying ``quant_method: mxfp4``:

- ``<proj>_blocks``: uint8 (experts, out, in / 32, 16), two 4-bit E2M1 values per byte (low
  nibble first), groups of 32 inputs;
- ``<proj>_scales``: uint8 (experts, out, in / 32), one power-of-two (E8M0) exponent per group,
  biased by 127.

The value of a weight is ``FP4_VALUES[code] * 2 ** (scale - 127)``, and the fused parameter is
its transpose (experts, in, out), as transformers' own dequantization
(``transformers.integrations.mxfp4.convert_moe_packed_tensors``) lays it out. Every product is a
power-of-two multiple of a 4-bit value, so it is exact in float32 and in bfloat16 (within their
range). The streamed readers read such a pair as the float parameter ``<proj>``, a few experts at
a time (``Mxfp4Slice``); the rest of the checkpoint (attention, router, biases) is stored as floats.

Example:
    >>> blocks = torch.tensor([[[[0x21] + [0] * 15]]], dtype=torch.uint8)  # 1 expert, 1 row, 1 group
    >>> dequantize_mxfp4(blocks, torch.tensor([[[128]]], dtype=torch.uint8))[0, :3, 0]
    tensor([2., 1., 0.])
"""

from __future__ import annotations

import torch

from quantmoe.models import is_mxfp4

__all__ = ["Mxfp4Slice", "dequantize_mxfp4", "is_mxfp4", "mxfp4_pairs"]

BLOCKS, SCALES = "_blocks", "_scales"  # suffixes of a projection's two tensors
GROUP = 32  # inputs per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1


def mxfp4_pairs(keys) -> dict[str, tuple[str, str]]:
    """Parameter key -> (its blocks key, its scales key), for every ``<proj>_blocks`` in ``keys``
    with its ``<proj>_scales``."""
    keys = set(keys)
    return {k.removesuffix(BLOCKS): (k, k.removesuffix(BLOCKS) + SCALES) for k in keys
            if k.endswith(BLOCKS) and k.removesuffix(BLOCKS) + SCALES in keys}


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 parameter (experts, in, out) of MXFP4 ``blocks`` (experts, out, groups, 16) and
    ``scales`` (experts, out, groups)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.dim() != 4 or blocks.shape[-1] != GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not pair: expected uint8 (experts, out, groups, {GROUP // 2}) and "
                         "uint8 (experts, out, groups)")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    experts, out, groups, half = blocks.shape
    values = torch.empty(experts, out, groups, 2 * half, dtype=torch.float32, device=blocks.device)
    values[..., 0::2] = lut[(blocks & 0x0F).long()]
    values[..., 1::2] = lut[(blocks >> 4).long()]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return values.reshape(experts, out, groups * 2 * half).transpose(1, 2).contiguous()


class Mxfp4Slice:
    """A fused MXFP4 parameter read lazily, as safetensors' slices are: ``get_shape`` gives the float
    parameter's (experts, in, out); indexing reads and dequantizes only the experts it selects."""

    def __init__(self, blocks, scales) -> None:
        self.blocks, self.scales = blocks, scales  # safetensors slices

    def get_shape(self) -> list[int]:
        experts, out, groups, half = self.blocks.get_shape()
        return [experts, groups * 2 * half, out]

    def __getitem__(self, index) -> torch.Tensor:
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, slice) and first.step in (None, 1):  # a range of experts: read only those
            return dequantize_mxfp4(self.blocks[first], self.scales[first])[(slice(None), *rest)]
        return dequantize_mxfp4(self.blocks[...], self.scales[...])[index]
