"""GPTQ (Frantar et al. 2022) as pure functions: a weight and a Hessian in, a typed result out.

For a linear with weight W (out, in) and calibration inputs X (n, in), GPTQ minimizes
||X W^T - X Q^T||^2 one input column at a time: each column is rounded to the grid and its
error, scaled by the upper Cholesky factor Hinv of H^-1 (H = 2/n X^T X), is pushed onto the
columns not yet quantized. Updates to later blocks are applied lazily, `block_size` columns
at a time. Everything runs in float32 on W's device; nothing here registers hooks or reads
files.

Groups. Without act-order, a group's scale/zero are computed when the loop reaches the
group's first column, from the error-updated weights (`static_groups=False`), or for all
groups up front from W (`static_groups=True`). As in the reference, a group is read from W
as updated by the earlier blocks (the lazy update), not by the earlier columns of its own
block (measured on correlated random data: about 7% lower output error at 2 bits than
reading the fully updated weights, equal at 3-4 bits). `block_size` is rounded to a multiple
of the group size (or up to it), so a block holds whole groups; with the usual powers of
two this is the reference's blocking and the results match it.

Act-order changes only the order in which the loop visits columns; groups are always stored
contiguous in the original column order, so `g_idx` is the trivial i // group_size. Modes
(`ACT_ORDERS`; bools are accepted: False is "none", True is "desc"):

- "none": columns in order.
- "desc" (desc_act): columns by descending diag(H). A group's columns are then scattered over
  the loop, so with a group size it forces static groups: every group's scale/zero come from
  the un-permuted W, and each column uses its original group's.
- "gar" (group-aware reordering, Gafni et al. 2025, GPTQModel's default since 7.x): groups
  by descending max of diag(H) over their columns, and inside each group its columns by
  descending diag(H) (`gar_order`). A group's columns stay adjacent in the loop, so groups
  keep dynamic parameters (computed when the loop reaches the group, from the weights as
  updated so far), like "none"; `static_groups` works too. A partial last group (in not a
  multiple of the group size) is visited last, its columns sorted the same way; GPTQModel
  leaves it unsorted at the end. Per-channel (`group_size=None`, one group) it is "desc".

In `gptq_quantize_batched` every expert has its own permutation (gather). Per-channel
(`group_size=None`) parameters are always computed up front.

Scales are float16 values (grid.round_scale), also rounded to W's dtype when it is narrower
(bfloat16), before use, so `Q` is exactly what a `QuantLinear` storing scales in that dtype,
or a GPTQ-format export storing them in float16, computes.

Refinement (``refine``: a number of sweeps, default 0). GPTQ visits each column once and never
revisits a rounding decision. ``refine_codes`` then runs coordinate descent on the same layer
loss, starting from GPTQ's result: every code to the grid point nearest its optimum given all
others, and every group's scale to its least-squares optimum given its codes, rounded to a
storable value; zero points and group layout stay, so the result exports exactly like GPTQ's.
No step raises the loss. ``loss`` is then the refined loss, 1/2 tr((W - Q) H (W - Q)^T) with
H damped as GPTQ used it, which is also what GPTQ's own loss adds up to. Cost: each sweep is
about one GPTQ pass. An expert that fell back to RTN is not refined.

Robustness. Dead inputs (H[i,i] == 0) get H[i,i] = 1 and W[:, i] = 0, as the reference.
An all-zero H (no calibration token) does not zero the weight: it falls back to RTN. When
the Cholesky fails, damping is multiplied by 10 up to `DAMP_RETRIES` times, then the linear
falls back to RTN (`fallback="rtn"`); each step is logged at WARNING with the module name.
A fallback runs the same loop with Hinv = I, which is RTN exactly (its `loss` is then the
unweighted sum of (W - Q)^2 / 2).

Example:
    >>> import torch
    >>> from quantmoe.quant.grid import QuantSpec, rtn
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    >>> W = torch.randn(32, 64, generator=g)
    >>> H = 2 / 512 * X.T @ X
    >>> spec = QuantSpec(bits=3, group_size=32)
    >>> res = gptq_quantize(W, H, spec, name="mlp.down_proj")
    >>> res.Q.shape, res.qweight.dtype, res.scale.shape, res.fallback
    (torch.Size([32, 64]), torch.uint8, torch.Size([32, 2]), None)
    >>> err = lambda Q: (X @ (W - Q).T).norm().item()
    >>> round(err(res.Q) / err(rtn(W, spec)), 1)  # output error relative to round-to-nearest
    0.7
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantmoe.finite import finite_rows
from quantmoe.quant.grid import QuantSpec, compute_qparams, dequantize, quantize, round_scale

logger = logging.getLogger(__name__)

ACT_ORDERS = ("none", "desc", "gar")
DAMP_RETRIES = 3  # damp x10 each retry: 0.01 -> 0.1 -> 1 -> 10, then RTN
RETRY_BASE_DAMP = 0.01  # where retries start when `damp=0`


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ output for one linear. Groups are contiguous in the original column order."""

    Q: torch.Tensor  # (out, in) dequantized weight, in W's dtype
    qweight: torch.Tensor  # (out, in) uint8 codes in [0, 2**bits - 1], original column order
    scale: torch.Tensor  # (out, groups) float32, values representable in W's dtype
    zero: torch.Tensor  # (out, groups) float32, integer-valued
    bits: int
    group_size: int  # columns per group (in_features for per-channel)
    loss: float  # sum of Err^2 / 2 with Err = (w - q) / Hinv[i, i]: the usual GPTQ loss
    damp_used: float  # damping fraction of mean(diag(H)) that factorized H (last tried on fallback)
    fallback: str | None = None  # "rtn" when H could not be used

    @property
    def g_idx(self) -> torch.Tensor:
        """(in,) group of each input column."""
        return torch.arange(self.Q.shape[1], device=self.Q.device) // self.group_size


def act_order_mode(value: str | bool) -> str:
    """The act-order mode of a setting: one of ``ACT_ORDERS``, or a bool (False "none", True "desc")."""
    if isinstance(value, bool):
        return "desc" if value else "none"
    if isinstance(value, str) and value in ACT_ORDERS:
        return value
    raise ValueError(f"check `act_order`: {value!r} is not one of {', '.join(ACT_ORDERS)} "
                     "(or a bool: false is none, true is desc)")


def refine_sweeps(value: int) -> int:
    """A ``refine`` setting checked: a number of coordinate-descent sweeps >= 0 (0 = plain GPTQ)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"check `refine`: {value!r} is not a number of sweeps >= 0 (0 = plain GPTQ)")
    return value


def act_order_record(value: str | bool) -> bool | str:
    """How identities and metadata record an act-order setting: false/true for none/desc (as before
    the modes existed, so stored keys do not change), the mode's name otherwise ("gar")."""
    mode = act_order_mode(value)
    return {"none": False, "desc": True}.get(mode, mode)


def gar_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering: (E, in) columns in the order GPTQ visits them, from ``diag`` (E, in)
    = diag(H).

    Full groups by descending max(diag) over their columns, each group's columns by descending
    diag; a partial last group last, sorted the same way. Ties keep the column order (stable).

    Example:
        >>> gar_order(torch.tensor([[1.0, 5.0, 2.0, 9.0, 3.0, 0.5]]), 2)
        tensor([[3, 2, 1, 0, 4, 5]])
    """
    E, n = diag.shape
    full = n // group_size * group_size
    body = diag[:, :full].reshape(E, n // group_size, group_size)  # (E, groups, group_size)
    local = torch.argsort(body, dim=-1, descending=True, stable=True)  # (E, groups, group_size)
    local = local + torch.arange(0, full, group_size, device=diag.device)[:, None]  # column indices
    order = torch.argsort(body.amax(dim=-1), dim=-1, descending=True, stable=True)  # (E, groups)
    body_perm = local.gather(1, order[..., None].expand_as(local)).reshape(E, full)
    tail = torch.argsort(diag[:, full:], dim=-1, descending=True, stable=True) + full  # (E, in - full)
    return torch.cat([body_perm, tail], dim=-1)


def scale_in_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 scales (already float16 values, grid.round_scale) rounded to a narrower storage
    dtype (bfloat16) too, never to zero, back in float32; unchanged for float16/float32."""
    if dtype in (torch.float16, torch.float32, torch.float64) or not dtype.is_floating_point:
        return scale
    return round_scale(scale.to(dtype).float())


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                  block_size: int = 128, act_order: str | bool = "none", static_groups: bool = False,
                  refine: int = 0, name: str = "linear") -> GPTQResult:
    """GPTQ of one linear: ``W`` (out, in), ``H`` (in, in) = 2/n X^T X over calibration tokens.

    ``damp`` is a fraction of mean(diag(H)) added to the diagonal; ``name`` labels log
    messages and errors. ``act_order`` is one of ``ACT_ORDERS`` (or a bool, True = "desc"); with
    "desc" and a group size, ``static_groups`` is forced. ``refine`` sweeps of coordinate descent
    then lower the same layer loss further (`refine_codes`).
    """
    if W.ndim != 2:
        raise ValueError(f"{name}: W must be (out, in), got shape {tuple(W.shape)}")
    if H.ndim != 2:
        raise ValueError(f"{name}: H must be (in, in), got shape {tuple(H.shape)}")
    return _gptq(W[None], H[None], spec, damp, block_size, act_order_mode(act_order), static_groups, refine,
                 [name])[0]


def gptq_quantize_batched(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
                          block_size: int = 128, act_order: str | bool = "none", static_groups: bool = False,
                          refine: int = 0, names: Sequence[str] | None = None) -> list[GPTQResult]:
    """GPTQ of E same-shape linears at once (e.g. one projection of every expert of a block).

    ``W`` (E, out, in), ``H`` (E, in, in). One shared column loop over batched tensors, no
    loop over experts; act-order uses a per-expert permutation (gather). Failures are per
    expert: each one retries damping and falls back to RTN on its own. Returns one
    ``GPTQResult`` per expert, the same as ``gptq_quantize`` on each (up to float rounding);
    the results' tensors are views of batched tensors (``torch.stack`` rebuilds them).
    ``names`` (one per expert) label log messages and errors; default ``expert <e>``.
    """
    if W.ndim != 3:
        raise ValueError(f"W must be (experts, out, in), got shape {tuple(W.shape)}")
    labels = list(names) if names is not None else [f"expert {e}" for e in range(W.shape[0])]
    if len(labels) != W.shape[0]:
        raise ValueError(f"got {len(labels)} names for {W.shape[0]} experts")
    return _gptq(W, H, spec, damp, block_size, act_order_mode(act_order), static_groups, refine, labels)


# --- implementation (batched over a leading expert dimension) ------------------------------


def _check_inputs(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, block_size: int,
                  names: Sequence[str]) -> None:
    E, _, n = W.shape
    if spec.keep:
        raise ValueError(f"{names[0]}: check `bits`: {spec.bits} keeps the weight; GPTQ quantizes to 2, 3, 4 or 8")
    if block_size < 1:
        raise ValueError(f"{names[0]}: check `block_size`: {block_size} is not a positive number of columns")
    if tuple(H.shape) != (E, n, n):
        raise ValueError(f"{names[0]}: H must be (in, in) = ({n}, {n}) per weight, got shape {tuple(H.shape)}")
    for label, t in (("weight W", W), ("Hessian H", H)):
        bad = (~finite_rows(t)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{names[bad[0]]}: the {label} has NaN or Inf values")


def _qparams(W: torch.Tensor, spec: QuantSpec, dtype: torch.dtype,
             importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) of W (E, out, cols), each (E, out, groups); ``importance`` (E, cols)
    weighs the columns of a clipping search (``clip="hmse"``)."""
    E, out, cols = W.shape
    weight = importance[:, None, :].expand(E, out, cols).reshape(E * out, cols) if spec.clip == "hmse" else None
    qp = compute_qparams(W.reshape(E * out, cols), spec, col_weight=weight)
    return scale_in_dtype(qp.scale, dtype).reshape(E, out, -1), qp.zero.reshape(E, out, -1)


def _permute_cols(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Columns of t (E, rows, in) reordered by perm (E, in)."""
    return t.gather(2, perm[:, None, :].expand_as(t))


def _hinv(H: torch.Tensor, damp: float, names: Sequence[str],
          skip: torch.Tensor) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """Upper Cholesky factor of (H + damping)^-1 per expert, with bounded damping retries.

    Returns Hinv (E, in, in), the damping used per expert, and a (E,) mask of the experts
    that failed (or were skipped); their Hinv is the identity.
    """
    E, n, _ = H.shape
    Hinv = torch.empty_like(H)  # (E, in, in) every expert's filled below: its factor, or the identity
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(dim=-1)  # (E,)
    base = damp if damp > 0 else RETRY_BASE_DAMP
    tries = [damp] + [base * 10**k for k in range(1, DAMP_RETRIES + 1)]
    used = [damp] * E
    pending = ~skip
    # n x n float32 matrices dominate GPTQ's memory (1 GiB each for a 16384-wide input): at most two
    # beside H and Hinv at any time, each freed as soon as the next step has it
    for t, frac in enumerate(tries):
        idx = pending.nonzero().flatten()  # (k,)
        if idx.numel() == 0:
            break
        Hd = H[idx]  # (k, in, in) a copy
        Hd.diagonal(dim1=-2, dim2=-1).add_((frac * mean_diag[idx])[:, None])  # + damping * I
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        ok = info == 0  # (k,) only factorized H are inverted: a failed L may hold zeros on its diagonal
        if ok.any():
            inverse = torch.cholesky_inverse(L if bool(ok.all()) else L[ok])  # (k_ok, in, in)
            del L
            U_ok, info_u = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            good = (info_u == 0) & finite_rows(U_ok)
            Hinv[idx[ok][good]] = U_ok[good] if not bool(good.all()) else U_ok
            del U_ok
            ok[ok.clone()] = good
        else:
            del L
        pending[idx[ok]] = False
        for e in idx.tolist():
            used[e] = frac
        for e in idx[~ok].tolist():
            if t + 1 < len(tries):
                logger.warning("GPTQ %s: H is not positive definite with damp %g; retrying with damp %g",
                               names[e], frac, tries[t + 1])
            else:
                logger.warning("GPTQ %s: H is not positive definite even with damp %g; falling back to RTN",
                               names[e], frac)
    failed = pending | skip
    if bool(failed.any()):
        Hinv[failed] = torch.eye(n, device=H.device, dtype=H.dtype)
    return Hinv, used, failed


SUB_BLOCK = 16  # columns updated one by one inside a block; the rest of the block takes one matmul per SUB_BLOCK


@torch.no_grad()
def _gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float, block_size: int,
          act_order: str, static_groups: bool, refine: int, names: Sequence[str]) -> list[GPTQResult]:
    _check_inputs(W, H, spec, block_size, names)
    refine_sweeps(refine)
    dtype, maxq = W.dtype, spec.maxq
    E, out, n = W.shape
    W = W.float().clone()  # (E, out, in)
    H = H.to(device=W.device, dtype=torch.float32).clone()  # (E, in, in)
    gs = spec.group_size or n

    diag = H.diagonal(dim1=-2, dim2=-1)  # (E, in), a view of H
    empty = (diag == 0).all(dim=-1)  # (E,) no calibration token at all
    for e in empty.nonzero().flatten().tolist():
        logger.warning("GPTQ %s: H is all zero (no calibration tokens); falling back to RTN", names[e])
    W.masked_fill_(((diag == 0) & ~empty[:, None])[:, None, :], 0.0)  # dead inputs
    diag.masked_fill_(diag == 0, 1.0)

    W0, H0 = (W.clone(), H.clone()) if refine else (None, None)  # what GPTQ's loss is measured against
    static = static_groups or act_order == "desc" or spec.group_size is None
    if act_order == "desc" and spec.group_size is not None and not static_groups:
        logger.debug("GPTQ %s: act_order desc keeps groups contiguous: using static groups", names[0])
    if static:  # every group from the un-permuted W, expanded to its columns
        col_group = torch.arange(n, device=W.device) // gs  # (in,) original group of each column
        scale, zero = _qparams(W, spec, dtype, diag)  # (E, out, groups)
        S, Z = scale[..., col_group], zero[..., col_group]  # (E, out, in) scale/zero of each column
    else:  # filled group by group in the loop
        S, Z = torch.empty_like(W), torch.empty_like(W)  # (E, out, in)
    importance = diag  # (E, in) in loop order: weighs a dynamic group's clipping search
    if act_order != "none":
        perm = (torch.argsort(diag, dim=-1, descending=True, stable=True) if act_order == "desc"
                else gar_order(diag, gs))  # (E, in) loop position -> column
        W, S, Z = _permute_cols(W, perm), _permute_cols(S, perm), _permute_cols(Z, perm)
        H = _permute_cols(H, perm).gather(1, perm[:, :, None].expand_as(H))
        importance = diag.gather(1, perm)

    Hinv, damp_used, failed = _hinv(H, damp, names, skip=empty)  # (E, in, in) upper
    # a block holds whole groups, so a dynamic group's parameters are read at a span start
    bs = block_size if static else max(gs, block_size // gs * gs)
    C = torch.zeros_like(W)  # (E, out, in) integer codes as floats, loop order
    losses = torch.zeros(E, out, device=W.device)  # (E, out)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1 = W[..., i1:i2].clone()  # (E, out, count)
        Hinv1 = Hinv[:, i1:i2, i1:i2]  # (E, count, count)
        Err1 = torch.zeros_like(W1)  # (E, out, count)
        S1, Z1, C1 = S[..., i1:i2], Z[..., i1:i2], C[..., i1:i2]  # views
        spans = [(0, i2 - i1)] if static else [(a, min(a + gs, i2 - i1)) for a in range(0, i2 - i1, gs)]
        for a, b in spans:
            if not static:  # the group starting at column i1 + a, as updated by the earlier blocks
                S1[..., a:b], Z1[..., a:b] = _qparams(W[..., i1 + a:i1 + b], spec, dtype,
                                                       importance[:, i1 + a:i1 + b])  # (E, out, 1)
            for c in range(a, b, SUB_BLOCK):  # columns c..d one by one, the rest of the block by one matmul
                d = min(c + SUB_BLOCK, b)
                for i in range(c, d):
                    w, s, z = W1[..., i], S1[..., i], Z1[..., i]  # (E, out)
                    q = quantize(w, s, z, maxq)  # (E, out)
                    C1[..., i] = q
                    torch.div(w - dequantize(q, s, z), Hinv1[:, i, i, None], out=Err1[..., i])  # Err (E, out)
                    W1[..., i:d] -= Err1[..., i, None] * Hinv1[:, None, i, i:d]
                if d < i2 - i1:
                    W1[..., d:] -= Err1[..., c:d] @ Hinv1[:, c:d, d:]
        losses += Err1.square().sum(dim=-1) / 2
        W[..., i2:] -= Err1 @ Hinv[:, i1:i2, i2:]  # lazy update of the later blocks
    if act_order != "none":
        inv = torch.argsort(perm, dim=-1)  # (E, in)
        C, S, Z = (_permute_cols(t, inv) for t in (C, S, Z))
    loss_per = losses.sum(dim=-1)  # (E,)
    if refine and not bool(failed.all()):  # an expert that fell back stays round-to-nearest
        idx = (~failed).nonzero().flatten()
        Cr, Sr = C[idx], S[idx]
        loss_per[idx] = refine_codes(W0[idx], _damped(H0[idx], [damp_used[e] for e in idx.tolist()]), Cr, Sr,
                                     Z[idx], maxq, refine, gs, dtype)
        C[idx], S[idx] = Cr, Sr
    Q = dequantize(C, S, Z)  # (E, out, in): the loop's values, elementwise
    codes = C.to(torch.uint8)
    Qd = Q.to(dtype)
    scale, zero = S[..., ::gs].contiguous(), Z[..., ::gs].contiguous()  # (E, out, groups), original order
    loss, fell = loss_per.tolist(), failed.tolist()
    return [GPTQResult(Q=Qd[e], qweight=codes[e], scale=scale[e], zero=zero[e], bits=spec.bits,
                       group_size=gs, loss=loss[e], damp_used=damp_used[e],
                       fallback="rtn" if fell[e] else None) for e in range(E)]


def _damped(H: torch.Tensor, damp_used: Sequence[float]) -> torch.Tensor:
    """(E, in, in) the damped H that GPTQ factorized for each expert."""
    eye = torch.eye(H.shape[-1], device=H.device)
    frac = torch.tensor(damp_used, device=H.device, dtype=H.dtype)  # (E,)
    return H + (frac * H.diagonal(dim1=-2, dim2=-1).mean(dim=-1))[:, None, None] * eye


def refine_codes(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, S: torch.Tensor, Z: torch.Tensor,
                 maxq: int, sweeps: int, group_size: int, dtype: torch.dtype = torch.float32,
                 block_size: int = 128) -> torch.Tensor:
    """Coordinate descent on codes ``C`` and scales ``S`` (E, out, in; S per column, constant over
    each group of ``group_size`` columns), in place, for the layer loss
    L = 1/2 tr((W - Q) H (W - Q)^T) with Q = S * (C - Z); zero points ``Z`` are kept.

    A sweep visits every column, then every group:
    - column j: with the others fixed, L is a convex quadratic in Q_j (curvature H[j, j]) with its
      minimum at Q_j + G_j / H[j, j], G = (W - Q) H; the nearest grid point to it (clamped) is the
      exact minimum over the grid (QuantEase, Behdin et al. 2023, without its outlier part).
      Columns go in blocks with the lazy update of G, as GPTQ's loop.
    - group g of each row: with the codes fixed, L is a quadratic in the group's scale with its
      minimum at s + a^T G_g / a^T H_gg a, a = C_g - Z_g; the minimum is rounded to a storable
      scale (float16, and ``dtype`` when narrower) and taken only where it lowers L.
    No step raises L, so GPTQ's codes and grid are a start that the sweeps only improve. A sweep
    that changes nothing ends the descent. Returns L per expert (E,) at the end.
    """
    E, out, n = W.shape
    diag = H.diagonal(dim1=-2, dim2=-1)  # (E, in)
    Err = W - dequantize(C, S, Z)  # (E, out, in)
    for _ in range(sweeps):
        G = Err @ H  # (E, out, in); H is symmetric
        changed = False
        for b1 in range(0, n, block_size):
            b2 = min(b1 + block_size, n)
            Delta = torch.zeros(E, out, b2 - b1, device=W.device)  # (E, out, count) change of Err
            for j in range(b1, b2):
                s, z = S[..., j], Z[..., j]  # (E, out)
                now = dequantize(C[..., j], s, z)
                q = quantize(now + G[..., j] / diag[:, j, None], s, z, maxq)  # (E, out)
                step = now - dequantize(q, s, z)  # (E, out) = new Err - old Err
                C[..., j] = q
                Err[..., j] += step
                Delta[..., j - b1] = step
                G[..., b1:b2] += step[..., None] * H[:, None, j, b1:b2]
            changed = changed or bool(Delta.any())
            G[..., :b1] += Delta @ H[:, b1:b2, :b1]
            G[..., b2:] += Delta @ H[:, b1:b2, b2:]
        for g1 in range(0, n, group_size):
            g2 = min(g1 + group_size, n)
            a = C[..., g1:g2] - Z[..., g1:g2]  # (E, out, size)
            curv = ((a @ H[:, g1:g2, g1:g2]) * a).sum(dim=-1)  # (E, out) a^T H_gg a
            slope = (a * G[..., g1:g2]).sum(dim=-1)  # (E, out) a^T G_g = -dL/ds
            old = S[..., g1]  # (E, out)
            new = scale_in_dtype(round_scale(old + slope / curv.clamp_min(1e-30)), dtype)
            d = new - old
            better = (curv > 0) & (0.5 * d * d * curv - d * slope < 0)
            d = torch.where(better, d, torch.zeros_like(d))
            if not bool(better.any()):
                continue
            changed = True
            S[..., g1:g2] += d[..., None]
            step = -d[..., None] * a  # (E, out, size) change of Err
            Err[..., g1:g2] += step
            G += step @ H[:, g1:g2, :]
        if not changed:
            break
    return 0.5 * (Err * (Err @ H)).sum(dim=(1, 2))
