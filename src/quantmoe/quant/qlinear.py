"""A linear layer stored in packed integer form, dequantized on the fly.

Buffers (all saved by ``state_dict`` and safetensors-ready, contiguous):
    qweight  int32 (out, packed_words(in, bits))      codes packed along the input dim (pack.py)
    qzeros   int32 (groups, packed_words(out, bits))  zero points packed along the output dim
                                                      (dense also for per-channel: one group)
    scales   model dtype (out, groups)
    bias     model dtype (out,) or None
and, not saved, ``g_idx`` int32 (in,): the group of each input column. Stored groups are
always contiguous (act-order desc uses static groups, gar reorders whole groups), so it is
derived from ``group_size``; it can be set to any assignment in memory.

Zero points are stored as they are used (no GPTQ "zero - 1" offset). ``dequantize_weight()``
(plain torch, the seam for a future kernel) computes in float32 then casts, so the weight
equals a ``GPTQResult.Q`` of the same dtype bit for bit.

``forward`` computes the same weight faster: on its first call it unpacks the codes once
into a cache of ``codes - zero`` per weight (int8, int16 at 8 bits; not saved, rebuilt when
``qweight``, ``qzeros`` or ``g_idx`` change), then every call is one multiply by the group
scales (exact: the differences are small integers) and ``F.linear``. The cache costs 1 byte
per weight (2 at 8 bits) on top of the packed ``bits / 8``; ``cache_codes = False`` turns it
off (unpack on every call, as little memory as the packed form).

Example:
    >>> import torch
    >>> from quantmoe.quant.grid import QuantSpec, rtn
    >>> linear = torch.nn.Linear(64, 8)
    >>> q = QuantLinear.from_float(linear, QuantSpec(bits=3, group_size=32))
    >>> q
    QuantLinear(in_features=64, out_features=8, bits=3, group_size=32, bias=True)
    >>> torch.equal(q.dequantize_weight(), rtn(linear.weight, QuantSpec(bits=3, group_size=32)))
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantmoe.quant.gptq import GPTQResult, scale_in_dtype
from quantmoe.quant.grid import QuantSpec, compute_qparams, expand_groups, quantize
from quantmoe.quant.pack import pack, packed_words, unpack


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter (inference tensors have none: changes made under
    ``torch.inference_mode`` are not seen by the code cache)."""
    return None if t.is_inference() else t._version


class QuantLinear(nn.Module):
    """``nn.Linear`` replacement holding packed ``bits``-bit codes, groups of ``group_size`` inputs."""

    cache_codes: bool = True  # forward keeps unpacked codes (see the module docstring); per instance too

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"check `group_size`: {group_size} is not a positive number of columns")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = -(-in_features // group_size)
        words = packed_words(in_features, bits)  # also validates bits
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, packed_words(out_features, bits), dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("g_idx", (torch.arange(in_features, device=device) // group_size).to(torch.int32),
                             persistent=False)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._codes: torch.Tensor | None = None  # (out, groups, group_size) codes - zero, see _cached_codes
        self._codes_key: tuple | None = None

    def reset_g_idx(self) -> None:
        """Contiguous groups of ``group_size`` columns (the stored format)."""
        self.g_idx = (torch.arange(self.in_features, device=self.qweight.device) // self.group_size).to(torch.int32)

    @property
    def groups(self) -> int:
        return self.scales.shape[1]

    @classmethod
    def from_result(cls, linear: nn.Linear, result: GPTQResult) -> QuantLinear:
        """Store a GPTQ result for ``linear``; the module computes ``F.linear(x, result.Q, bias)``."""
        return cls.from_results([linear], [result])[0]

    @classmethod
    def from_results(cls, linears: Sequence[nn.Linear], results: Sequence[GPTQResult]) -> list[QuantLinear]:
        """``from_result`` for linears of one shape and bit width, packed in one call (e.g. a block's experts)."""
        for linear, result in zip(linears, results, strict=True):
            shape, want = tuple(result.qweight.shape), tuple(linear.weight.shape)
            if shape != want:
                raise ValueError(f"GPTQ result is for a {shape} weight, the linear's weight is {want}")
        bits = results[0].bits
        words = pack(torch.stack([r.qweight for r in results]), bits)  # (n, out, words)
        zeros = pack(torch.stack([r.zero for r in results]).transpose(1, 2), bits)  # (n, groups, words)
        return [cls._build(linear, words[i], zeros[i], r.scale, bits, r.group_size)
                for i, (linear, r) in enumerate(zip(linears, results))]

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        """Round-to-nearest ``linear`` (scales rounded to its dtype first, as GPTQ does)."""
        if spec.keep:
            raise ValueError(f"check `bits`: {spec.bits} keeps the weight; QuantLinear stores 2, 3, 4 or 8")
        W = linear.weight.detach()
        qp = compute_qparams(W, spec)
        scale = scale_in_dtype(qp.scale, W.dtype)  # (out, groups)
        in_f = W.shape[1]
        codes = quantize(W.float(), expand_groups(scale, qp.group_size, in_f),
                         expand_groups(qp.zero, qp.group_size, in_f), spec.maxq)  # (out, in)
        return cls._build(linear, pack(codes, spec.bits), pack(qp.zero.T, spec.bits), scale, spec.bits, qp.group_size)

    @classmethod
    @torch.no_grad()
    def _build(cls, linear: nn.Linear, qweight: torch.Tensor, qzeros: torch.Tensor, scale: torch.Tensor,
               bits: int, group_size: int) -> QuantLinear:
        """A module for ``linear`` from packed codes (out, words) and zero points (groups, words)."""
        W = linear.weight
        out_f, in_f = W.shape
        module = cls(in_f, out_f, bits, group_size, bias=linear.bias is not None, dtype=W.dtype, device=W.device)
        module.qweight.copy_(qweight)
        module.qzeros.copy_(qzeros)
        module.scales.copy_(scale.to(W.dtype))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def dequantize_weight(self) -> torch.Tensor:
        """(out, in) weight in the scales' dtype; the place for a fused kernel later."""
        codes = unpack(self.qweight, self.bits, self.in_features).float()  # (out, in)
        zeros = unpack(self.qzeros, self.bits, self.out_features).float().T  # (out, groups)
        g = self.g_idx.long()
        return (self.scales.float()[:, g] * (codes - zeros[:, g])).to(self.scales.dtype)

    @torch.no_grad()
    def dense(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantized weight: the same outputs, bit for bit, without
        dequantizing on every call (the driver's stand-in while a block's later passes run).

        ``weight``: the dequantized weight if already at hand (the ``GPTQResult.Q`` this module
        was built from is, bit for bit); computed otherwise.
        """
        weight = self.dequantize_weight() if weight is None else weight  # (out, in)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return linear

    def _cache_sources(self) -> tuple:
        """The tensors the code cache is built from, held (so never confused with a new tensor at
        a freed address), and their in-place versions."""
        b = self._buffers
        qweight, qzeros, g_idx = b["qweight"], b["qzeros"], b["g_idx"]
        return qweight, qzeros, g_idx, (_version(qweight), _version(qzeros), _version(g_idx))

    def _cache_is_current(self) -> bool:
        key, b = self._codes_key, self._buffers
        return (key is not None and key[0] is b["qweight"] and key[1] is b["qzeros"] and key[2] is b["g_idx"]
                and key[3] == (_version(key[0]), _version(key[1]), _version(key[2])))

    @torch.no_grad()
    def _cached_codes(self) -> torch.Tensor:
        """``codes - zero`` of every weight, unpacked once: (out, groups, group_size) when the
        groups are contiguous (the stored layout; the last group zero-padded), else (out, in)
        for any ``g_idx``."""
        if self._codes is not None and self._cache_is_current():
            return self._codes
        self.clear_code_cache()  # free the stale cache before building the new one
        codes = unpack(self.qweight, self.bits, self.in_features).to(torch.int16)  # (out, in)
        zeros = unpack(self.qzeros, self.bits, self.out_features).to(torch.int16).T  # (out, groups)
        small = torch.int8 if self.bits < 8 else torch.int16  # |codes - zero| <= 2**bits - 1
        g = self.g_idx.long()
        if torch.equal(g, torch.arange(self.in_features, device=g.device) // self.group_size):
            codes = F.pad(codes, (0, self.groups * self.group_size - self.in_features))
            codes = codes.view(self.out_features, self.groups, self.group_size)
            self._codes = (codes - zeros[:, :, None]).to(small)  # (out, groups, group_size)
        else:
            self._codes = (codes - zeros[:, g]).to(small)  # (out, in)
        self._codes_key = self._cache_sources()
        return self._codes

    def clear_code_cache(self) -> None:
        self._codes = self._codes_key = None

    def code_cache_bytes(self) -> int:
        return 0 if self._codes is None else self._codes.numel() * self._codes.element_size()

    def cached_weight(self) -> torch.Tensor:
        """``dequantize_weight()`` (bit for bit) from the code cache: one multiply per weight."""
        codes = self._cached_codes()
        scales = self._buffers["scales"].float()
        # in place on the float copy: `codes * scales` (mixed dtypes, broadcast) is ~30x slower on CPU
        if codes.dim() == 3:
            W = codes.float().mul_(scales[:, :, None]).view(self.out_features, -1)  # (out, groups * group_size)
            W = W if W.shape[1] == self.in_features else W[:, :self.in_features]
        else:
            W = codes.float().mul_(scales[:, self.g_idx.long()])
        return W.to(self._buffers["scales"].dtype)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.cached_weight() if self.cache_codes else self.dequantize_weight()
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
