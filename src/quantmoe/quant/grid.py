"""The integer grid: per-group scale/zero, quantize, dequantize, round-to-nearest.

Conventions (as in GPTQ): ``maxq = 2**bits - 1``; symmetric grids put the zero point in
the middle (``zero = (maxq + 1) / 2``) with ``scale = 2 * max|w| / maxq``; asymmetric
grids span ``[min(w, 0), max(w, 0)]``. ``group_size=None`` means one group per output
channel (per-channel).

Two choices make every grid storable exactly in the GPTQ checkpoint format (quantmoe.export):
scales are rounded to float16 values (``SCALE_DTYPE``, the format's scale dtype) before any
weight is quantized, so the codes, GPTQ's error feedback and an exported model all use the
same scale; and an asymmetric grid never has zero point 0 (GPTQ v1 stores ``zero - 1``, and
-1 does not fit): a group whose zero would round to 0 (all its weights >= -scale/2) gets
zero 1 and ``scale = max / (maxq - 1)``, a grid that still covers the group.

Clipping (``clip``): ``"none"`` spans each group's full range (the GPTQ grid); ``"mse"`` shrinks
the range of every (row, group) by the factor in ``CLIP_SHRINKS`` (1.0 down to 0.2 in steps of
0.01) that minimizes the squared rounding error of the group; ``"hmse"`` weights that error by
a per-column importance (GPTQ passes diag(H), the calibration inputs' second moment; without
it, ``"hmse"`` is ``"mse"``). Shrink 1.0 is always a candidate, so the chosen grid's error is
never above the full-range grid's; weights outside a shrunk range clip to its end codes. The
float16 and zero >= 1 rules hold for every candidate, so a clipped grid exports exactly too.

Example:
    >>> import torch
    >>> w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])  # range 3, 2 bits: scale 1, zero 1
    >>> rtn(w, QuantSpec(bits=2, group_size=None, symmetric=False)).tolist()
    [[-1.0, 0.0, 1.0, 2.0]]
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from quantmoe.suggest import did_you_mean

SUPPORTED_BITS = (2, 3, 4, 8, 16)
KEEP_BITS = 16
SCALE_DTYPE = torch.float16  # scales are values of this dtype (the GPTQ format's)
_SCALE_MIN = 2.0**-24  # the smallest positive float16 (subnormal): a scale never rounds to zero
CLIP_MODES = ("none", "mse", "hmse")
CLIP_SHRINKS = tuple(round(1.0 - 0.01 * i, 2) for i in range(81))  # candidate range factors, 1.0 first


@dataclass(frozen=True)
class QuantSpec:
    """How one linear is quantized. ``bits=16`` keeps it in full precision."""

    bits: int
    group_size: int | None = 128
    symmetric: bool = True
    clip: str = "none"  # "none" (full range), "mse" or "hmse" (range shrink searched per group)

    def __post_init__(self) -> None:
        for key, value in (("bits", self.bits), ("group_size", self.group_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ValueError(f"check `{key}`: expected an integer, got {value!r} ({type(value).__name__})")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"check `symmetric`: expected true or false, got {self.symmetric!r}")
        if self.clip not in CLIP_MODES:
            hint = did_you_mean(str(self.clip), CLIP_MODES)
            raise ValueError(f"check `clip`: {self.clip!r} is not one of {', '.join(CLIP_MODES)}"
                             f"{'; ' + hint if hint else ''}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"check `bits`: {self.bits} is not one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size is not None and (self.group_size < 1 or self.group_size & (self.group_size - 1)):
            raise ValueError(f"check `group_size`: {self.group_size} is not a power of two (or null for per-channel)")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def keep(self) -> bool:
        return self.bits == KEEP_BITS

    def groups(self, in_features: int) -> int:
        size = self.group_size or in_features
        return -(-in_features // size)


@dataclass(frozen=True)
class QParams:
    scale: torch.Tensor  # (out, groups)
    zero: torch.Tensor  # (out, groups), integer-valued floats
    group_size: int  # columns per group (in_features for per-channel)


def compute_qparams(W: torch.Tensor, spec: QuantSpec, col_weight: torch.Tensor | None = None) -> QParams:
    """Scale and zero point of every (row, group) of ``W`` (out, in).

    ``col_weight`` (in,) or (out, in), non-negative: the importance of each column for
    ``clip="hmse"`` (ignored otherwise).
    """
    out_f, in_f = W.shape
    size = spec.group_size or in_f
    groups = spec.groups(in_f)
    pad = groups * size - in_f
    Wp = torch.nn.functional.pad(W.float(), (0, pad)) if pad else W.float()
    Wg = Wp.reshape(out_f, groups, size)  # (out, groups, size)
    if pad:  # padding must not widen the range: reuse each group's first element
        mask = torch.arange(groups * size, device=W.device).reshape(groups, size) >= in_f
        Wg = torch.where(mask, Wg[..., :1], Wg)
    xmin = Wg.amin(dim=-1).clamp(max=0)
    xmax = Wg.amax(dim=-1).clamp(min=0)
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmax - xmin) == 0
    xmin = torch.where(degenerate, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    scale, zero = _grid(xmin, xmax, spec)
    if spec.clip != "none":
        weight = None
        if spec.clip == "hmse" and col_weight is not None:
            cw = col_weight.float().expand(out_f, in_f)
            cw = torch.nn.functional.pad(cw, (0, pad)) if pad else cw
            weight = cw.reshape(out_f, groups, size) * (~mask if pad else 1)  # padding counts for nothing
        elif pad:
            weight = (~mask).float().expand(out_f, groups, size)
        scale, zero = _clip_search(Wg, xmin, xmax, scale, zero, spec, weight)
    return QParams(scale=scale, zero=zero, group_size=size)


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of grids spanning [xmin, xmax] (xmin <= 0 <= xmax, xmax > xmin), float16 scales."""
    scale = round_scale((xmax - xmin) / spec.maxq)
    if spec.symmetric:
        return scale, torch.full_like(scale, (spec.maxq + 1) / 2)
    zero = torch.round(-xmin / scale)
    low = zero == 0  # v1 cannot store zero 0: zero 1 and a grid up to max
    if low.any():
        scale = torch.where(low, round_scale(xmax / (spec.maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def _clip_search(Wg: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, spec: QuantSpec,
                 weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, zero) among the shrunk ranges that minimizes sum(weight * (w - q)^2) per (row, group)."""

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # (out, groups)
        s3, z3 = s[..., None], z[..., None]
        d = (dequantize(quantize(Wg, s3, z3, spec.maxq), s3, z3) - Wg).square_()
        return (d if weight is None else d.mul_(weight)).sum(dim=-1)

    best = error(scale, zero)  # shrink 1.0
    for shrink in CLIP_SHRINKS[1:]:
        lo, hi = xmin * shrink, xmax * shrink
        ok = hi > lo
        s, z = _grid(torch.where(ok, lo, xmin), torch.where(ok, hi, xmax), spec)
        err = error(s, z)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales -> the nearest ``SCALE_DTYPE`` values (at least its smallest positive), in float32."""
    rounded = scale.to(SCALE_DTYPE)
    if torch.isinf(rounded).any():
        raise ValueError(f"a quantization scale exceeds the float16 range ({scale.max().item():.3g}): "
                         "the weights are too large to quantize; check the model's weights")
    return rounded.float().clamp_min(_SCALE_MIN)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """(out, groups) -> (out, in): the value of each column's group."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes in [0, maxq]; ``scale``/``zero`` broadcast against ``W``."""
    return torch.clamp(torch.round(W / scale) + zero, 0, maxq)


def dequantize(Q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (Q - zero)


def rtn(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``W`` (out, in); returns the dequantized weight."""
    if spec.keep:
        return W.clone()
    qp = compute_qparams(W, spec)
    in_f = W.shape[1]
    scale = expand_groups(qp.scale, qp.group_size, in_f)
    zero = expand_groups(qp.zero, qp.group_size, in_f)
    return dequantize(quantize(W.float(), scale, zero, spec.maxq), scale, zero).to(W.dtype)
