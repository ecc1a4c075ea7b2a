"""Checkpoints stored in block-scaled FP8 (DeepSeek-V3/R1, MiniMax-M2, Qwen3-FP8, ...), read as floats.

Such a checkpoint keeps each linear's ``weight`` as ``float8_e4m3fn`` and beside it
``weight_scale_inv``: one float32 scale per ``weight_block_size`` tile (128 x 128), so the weight
is ``fp8.float() * scale`` tile by tile. ``config.json`` says so in ``quantization_config``
(``quant_method: fp8``). The streamed readers dequantize every such weight as they read it (the
scale may sit in another shard), the way transformers' ``from_pretrained`` does on a machine
without an FP8 GPU: float32 product, then the model's dtype. GPT-OSS's MXFP4 experts are read by
quant/mxfp4.py; a checkpoint quantized any other way (GPTQ, AWQ, bitsandbytes, ...) is refused:
quantmoe quantizes from floats.

Example:
    >>> w = torch.ones(4, 4).to(torch.float8_e4m3fn)
    >>> dequantize_fp8(w, torch.tensor([[2.0, 3.0]]), (4, 2))[0]
    tensor([2., 2., 3., 3.])
"""

from __future__ import annotations

import torch

from quantmoe.models import stored_quantization

SCALE_SUFFIX = "_scale_inv"  # weight key + this: its per-tile scales


class QuantizedCheckpointError(ValueError):
    """A model folder stored quantized in a format quantmoe does not read."""


def fp8_block_size(config) -> tuple[int, int] | None:
    """The FP8 tile (rows, cols) of a block-scaled FP8 checkpoint, None for a float checkpoint or one
    with MXFP4 experts (quant/mxfp4.py reads those).

    Raises QuantizedCheckpointError for any other ``quantization_config``."""
    qc = stored_quantization(config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    block = qc.get("weight_block_size")
    if method == "fp8" and isinstance(block, (list, tuple)) and len(block) == 2:
        return int(block[0]), int(block[1])
    if method == "mxfp4":
        return None
    raise QuantizedCheckpointError(
        f"the checkpoint is stored quantized (quant_method {method!r}"
        f"{', no weight_block_size' if method == 'fp8' else ''}) and quantmoe quantizes from float weights: "
        "use the model's bf16 release, or dequantize it first (transformers: from_pretrained(..., "
        "quantization_config=<its config with dequantize=True>) then save_pretrained)")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 values of an FP8 ``weight`` (..., rows, cols) from its per-tile ``scale_inv``
    (..., ceil(rows / block[0]), ceil(cols / block[1])); tiles at the edges may be partial."""
    rows, cols = weight.shape[-2:]
    scale = scale_inv.to(torch.float32)
    if scale.shape[-2:] != (-(-rows // block[0]), -(-cols // block[1])):
        raise ValueError(f"FP8 scales of shape {tuple(scale_inv.shape)} do not tile a {rows} x {cols} weight in "
                         f"{block[0]} x {block[1]} blocks")
    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.to(torch.float32) * scale


class DequantizedSlice:
    """An FP8 weight read lazily, as safetensors' slices are: dequantized when indexed (``[...]``),
    so a block's weights are turned into floats one at a time, as the loader reads them."""

    def __init__(self, weight, scale_inv, block: tuple[int, int]) -> None:
        self.weight, self.scale_inv, self.block = weight, scale_inv, block  # safetensors slices

    def get_shape(self) -> list[int]:
        return self.weight.get_shape()

    def __getitem__(self, index) -> torch.Tensor:
        return dequantize_fp8(self.weight[...], self.scale_inv[...], self.block)[index]
