"""Dense packing of 2/3/4/8-bit integer codes into int32 words along the last dimension.

Each row of codes is one little-endian bit stream: code j occupies bits [j*b, (j+1)*b) and
word k holds stream bits [32k, 32k + 32). For 2, 4 and 8 bits a word holds 16, 8 or 4
whole codes; for 3 bits 32 codes fill 3 words and codes 10 and 21 straddle two words. This
is the layout of GPTQ's packer for every bit width (GPTQ packs along the input dimension
of a transposed weight; we keep rows = output channels). Rows are zero-padded to a whole
unit (the fewest codes that fill whole words: 16/32/8/4 for 2/3/4/8 bits), so any length
packs; `unpack` takes the original length back. Words are stored as int32 (two's
complement), since torch and safetensors have no uint32.

Example:
    >>> import torch
    >>> pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), bits=4)  # 0x87654321
    tensor([[-2023406815]], dtype=torch.int32)
    >>> unpack(pack(torch.tensor([[5, 0, 7]]), bits=3), bits=3, length=3)
    tensor([[5, 0, 7]], dtype=torch.uint8)
"""

from __future__ import annotations

import math

import torch

PACK_BITS = (2, 3, 4, 8)
_WORD = 32
_MASK = 2**_WORD - 1


def _unit(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest whole-word unit for ``bits``."""
    if bits not in PACK_BITS:
        raise ValueError(f"check `bits`: {bits} cannot be packed; packing supports {', '.join(map(str, PACK_BITS))}")
    codes = _WORD // math.gcd(_WORD, bits)
    return codes, codes * bits // _WORD


def packed_words(length: int, bits: int) -> int:
    """How many int32 words hold ``length`` codes of ``bits`` bits."""
    codes, words = _unit(bits)
    return -(-length // codes) * words


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (..., n) in [0, 2**bits - 1] -> int32 words (..., packed_words(n, bits))."""
    unit_codes, unit_words = _unit(bits)
    if codes.is_floating_point() and not torch.equal(codes, codes.round()):
        raise ValueError("pack: codes must be integers")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() > 2**bits - 1):
        raise ValueError(f"pack: codes must lie in [0, {2**bits - 1}] for {bits} bits, "
                         f"got [{c.min().item()}, {c.max().item()}]")
    n = c.shape[-1]
    c = torch.nn.functional.pad(c, (0, packed_words(n, bits) // unit_words * unit_codes - n))
    c = c.reshape(*c.shape[:-1], -1, unit_codes)  # (..., units, unit_codes)
    if unit_words == 1:  # whole codes per word: one broadcast shift; their bits are disjoint, so sum = or
        shifts = torch.arange(0, _WORD, bits, dtype=torch.int64, device=c.device)
        words = (c << shifts).sum(-1)
        return torch.where(words >= 2**31, words - 2**_WORD, words).to(torch.int32).contiguous()
    words = torch.zeros(*c.shape[:-1], unit_words + 1, dtype=torch.int64, device=c.device)
    for j in range(unit_codes):
        k, s = divmod(j * bits, _WORD)
        words[..., k] |= (c[..., j] << s) & _MASK
        words[..., k + 1] |= c[..., j] >> (_WORD - s)  # the spill of a straddling code, else 0
    words = words[..., :unit_words].flatten(-2)  # (..., words) unsigned 32-bit values
    return torch.where(words >= 2**31, words - 2**_WORD, words).to(torch.int32).contiguous()


def unpack(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 words (..., packed_words(length, bits)) -> uint8 codes (..., length)."""
    unit_codes, unit_words = _unit(bits)
    if words.dtype != torch.int32 or words.shape[-1] != packed_words(length, bits):
        raise ValueError(f"unpack: expected int32 words (..., {packed_words(length, bits)}) for {length} codes "
                         f"of {bits} bits, got {words.dtype} {tuple(words.shape)}")
    maxq = 2**bits - 1
    if unit_words == 1:  # whole codes per word: one broadcast shift (arithmetic shifts are masked off)
        shifts = torch.arange(0, _WORD, bits, dtype=torch.int32, device=words.device)
        return ((words[..., None] >> shifts) & maxq).flatten(-2)[..., :length].to(torch.uint8)
    w = words.to(torch.int64) & _MASK
    w = w.reshape(*w.shape[:-1], -1, unit_words)  # (..., units, unit_words)
    above = torch.cat([w[..., 1:], torch.zeros_like(w[..., :1])], dim=-1)
    pairs = w | (above << _WORD)  # word k with word k + 1 above it: a straddling code is whole in pair k
    parts = []
    for k in range(unit_words):  # the codes that start in word k, one broadcast shift
        shifts = [j * bits - k * _WORD for j in range(unit_codes) if (j * bits) // _WORD == k]
        parts.append((pairs[..., k, None] >> torch.tensor(shifts, device=words.device)) & maxq)
    return torch.cat(parts, dim=-1).flatten(-2)[..., :length].to(torch.uint8)
