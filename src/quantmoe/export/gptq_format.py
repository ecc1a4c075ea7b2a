"""One linear in the GPTQ checkpoint format (GPTQModel's ``checkpoint_format: gptq``, "v1").

Tensors per linear with weight (out, in), ``bits`` in {2, 3, 4, 8}, ``groups`` groups:

    qweight  int32 (in * bits / 32, out)     codes packed along the input dimension
    qzeros   int32 (groups, out * bits / 32) zero points packed along the output dimension,
                                             stored as ``zero - 1`` (the v1 convention)
    scales   float16 (groups, out)
    g_idx    int32 (in,)                     the group of each input column
    bias     (out,), when the linear has one

Each packed column of ``qweight`` (each row of ``qzeros``) is one little-endian bit stream, code
j at bits [j*b, (j+1)*b): for 3 bits, 32 codes fill 3 words and codes 10 and 21 straddle two
words ("GPTQ's own 3-bit layout", as GPTQModel's ``pack_original`` and vLLM's gptq kernels read
it). That is the stream ``quant/pack.py`` writes per row, so a ``QuantLinear``'s ``qweight``
(out, words) is the transpose of the format's. The weight is ``scales[g_idx[i], o] *
(code[i, o] - (stored_zero[g_idx[i], o] + 1))``; ``dequantize`` computes it in float32.

Symmetric grids store zero ``2**(bits-1)`` (stored 7 at 4 bits), as GPTQModel does.
Asymmetric zeros are in [1, 2**bits - 1] (grid.py), so ``zero - 1`` always fits its field and
reading field by field (vLLM's kernels) and adding a word constant (GPTQModel's v1 -> v2
conversion) agree.
"""

from __future__ import annotations

import torch

from quantmoe.quant.grid import SCALE_DTYPE
from quantmoe.quant.pack import pack, packed_words, unpack
from quantmoe.quant.qlinear import QuantLinear

FORMAT_BITS = (2, 3, 4, 8)
_UNIT = {2: 16, 3: 32, 4: 8, 8: 4}  # codes per whole number of int32 words


def storable(in_features: int, out_features: int, bits: int) -> str | None:
    """Why a linear of this shape cannot be stored at ``bits`` in the format, or None."""
    if bits not in FORMAT_BITS:
        return f"{bits} bits is not a GPTQ width ({', '.join(map(str, FORMAT_BITS))})"
    unit = _UNIT[bits]
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if n % unit:
            return f"{what} {n} is not a multiple of {unit}, which {bits}-bit packing needs"
    return None


def to_gptq(q: QuantLinear) -> dict[str, torch.Tensor]:
    """The format's tensors of a ``QuantLinear`` (exact: same codes, zeros, scales)."""
    why = storable(q.in_features, q.out_features, q.bits)
    if why:
        raise ValueError(why)
    zeros = unpack(q.qzeros, q.bits, q.out_features).to(torch.int64)  # (groups, out)
    if zeros.numel() and zeros.min() < 1:
        raise ValueError("a zero point is 0, which GPTQ v1 cannot store (zero - 1 = -1); requantize with "
                         "this quantmoe version (its grids never use zero 0)")
    scales = q.scales.detach().to(SCALE_DTYPE)
    if not torch.equal(scales.to(q.scales.dtype), q.scales.detach()):
        raise ValueError("scales are not float16 values; requantize with this quantmoe version "
                         "(its scales are float16 values)")
    out = {"qweight": q.qweight.T.contiguous(), "qzeros": pack(zeros - 1, q.bits),
           "scales": scales.T.contiguous(), "g_idx": q.g_idx.to(torch.int32).contiguous()}
    if q.bias is not None:
        out["bias"] = q.bias.detach()
    return out


def gptq_bits(qweight: torch.Tensor, in_features: int) -> int:
    """The width of a linear from its ``qweight`` rows: rows = in * bits / 32."""
    bits, rem = divmod(qweight.shape[0] * 32, in_features)
    if rem or bits not in FORMAT_BITS:
        raise ValueError(f"qweight has {qweight.shape[0]} rows for {in_features} inputs: not a GPTQ width")
    return bits


def v1_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Stored v1 zero points -> the zero points, (groups, out) int64.

    2/4/8 bits add 1 to every field of the words with carries, as GPTQModel's v1 -> v2 conversion
    does (so third-party checkpoints whose stored zeros wrapped read as in GPTQModel); 3 bits add
    1 field by field.
    """
    if bits in (2, 4, 8):
        ones = sum(1 << (bits * k) for k in range(32 // bits))
        words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return unpack(words, bits, out_features).to(torch.int64)
    return (unpack(qzeros.to(torch.int32), bits, out_features).to(torch.int64) + 1) % 2**bits


def from_gptq(tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
              dtype: torch.dtype) -> QuantLinear:
    """A ``QuantLinear`` from the format's tensors of one linear (weights bit for bit)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    bits = gptq_bits(qweight, in_features)
    groups = scales.shape[0]
    if qweight.shape[1] != out_features or scales.shape[1] != out_features:
        raise ValueError(f"qweight {tuple(qweight.shape)} / scales {tuple(scales.shape)} do not fit a "
                         f"({out_features}, {in_features}) linear")
    g_idx = tensors.get("g_idx")
    g_idx = (torch.arange(in_features) * groups // in_features if g_idx is None else g_idx).to(torch.int32)
    if g_idx.shape != (in_features,) or (groups and (g_idx.min() < 0 or g_idx.max() >= groups)):
        raise ValueError(f"g_idx {tuple(g_idx.shape)} does not assign {in_features} inputs to {groups} groups")
    group_size = -(-in_features // groups)
    zeros = v1_zeros(qzeros, bits, out_features)  # (groups, out)
    if zeros.max() > 2**bits - 1:
        raise ValueError(f"a zero point is {zeros.max().item()} after the v1 correction: more than {bits} bits hold")
    q = QuantLinear(in_features, out_features, bits, group_size, bias="bias" in tensors, dtype=dtype)
    with torch.no_grad():
        q.qweight.copy_(qweight.T.contiguous())
        q.qzeros = pack(zeros, bits)
        q.scales = scales.T.to(dtype).contiguous()
        q.g_idx = g_idx.contiguous()
        if "bias" in tensors:
            q.bias = tensors["bias"].to(dtype)
    if q.qweight.shape[1] != packed_words(in_features, bits):
        raise ValueError(f"qweight rows {qweight.shape[0]} do not pack {in_features} inputs at {bits} bits")
    return q


def dequantize(tensors: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """(out, in) float32 weight from the format's tensors, by the format's own convention:
    ``scales[g_idx] * (code - (stored_zero + 1))``, unpacked field by field."""
    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    bits = gptq_bits(qweight, in_features)
    out_features = qweight.shape[1]
    codes = unpack(qweight.T.contiguous(), bits, in_features).float()  # (out, in)
    zeros = unpack(qzeros, bits, out_features).float() + 1  # (groups, out)
    g = g_idx.long()
    return scales.float().T[:, g] * (codes - zeros.T[:, g])
