import doctest
import logging

import pytest
import torch

import quantmoe.quant.gptq as gptq_module
from quantmoe.quant.gptq import gptq_quantize, gptq_quantize_batched
from quantmoe.quant.grid import QuantSpec, compute_qparams, expand_groups, quantize, rtn


def calib(n_in: int, tokens: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs X = Z @ A (tokens, in) and H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    return X, 2 / tokens * X.T @ X


def out_err(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    return (X @ (W - Q).T).norm().item()


def dequant_from_codes(res) -> torch.Tensor:
    g = res.g_idx
    return res.scale[:, g] * (res.qweight.float() - res.zero[:, g])


def _ref_grid(cols: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of ``cols`` (out, k), written here from the GPTQ reference
    (AutoGPTQ's Quantizer.find_params): the range [min(w, 0), max(w, 0)], symmetric around 0
    with the zero point in the middle, a flat row given the range [-1, 1]; plus the storage
    constraints of the GPTQ format below."""
    maxq = 2**bits - 1
    lo = torch.minimum(cols.min(dim=1, keepdim=True).values, torch.tensor(0.0))  # (out, 1)
    hi = torch.maximum(cols.max(dim=1, keepdim=True).values, torch.tensor(0.0))
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = hi == lo
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    # the GPTQ checkpoint format's two constraints (docs/quantization.md): scales are float16
    # values (never below its smallest subnormal), and an asymmetric zero point is never 0 (v1
    # stores zero - 1): such a row gets zero 1 and the grid [-scale, (maxq - 1) * scale] up to hi
    scale = ((hi - lo) / maxq).half().float().clamp_min(2.0**-24)
    if symmetric:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    zero = torch.round(-lo / scale)
    low = zero == 0
    scale = torch.where(low, (hi / (maxq - 1)).half().float().clamp_min(2.0**-24), scale)
    return scale, torch.where(low, 1.0, zero)


def _ref_fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def reference_gptq(W, H, spec, block_size=128, act_order=False, static_groups=False):
    """A plain port of the reference GPTQ loop (AutoGPTQ fasterquant), one linear, branches and
    all, with its own grid (``_ref_grid``): nothing from quantmoe.quant but QuantSpec's fields."""
    W, H, n, gs = W.clone(), H.clone(), W.shape[1], spec.group_size or W.shape[1]

    def params(cols):
        return _ref_grid(cols, spec.bits, spec.symmetric)

    scale, zero = params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = [params(W[:, i:i + gs]) for i in range(0, n, gs)]
    d = torch.diag(H).tolist()
    if act_order == "gar":  # GPTQModel's gar.py, as plain Python: groups by their max, columns by d
        starts = sorted(range(0, n, gs), key=lambda a: (a + gs > n, -max(d[a:a + gs]), a))
        perm = torch.tensor([c for a in starts for c in sorted(range(a, min(a + gs, n)), key=lambda c: (-d[c], c))])
    else:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n)
    act_order = act_order is True or act_order == "desc"  # groups scattered over the loop
    W, H = W[:, perm], H[perm][:, perm]
    H[range(n), range(n)] += 0.01 * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if spec.group_size and (static_groups or act_order):
                scale, zero = groups[int(perm[i1 + i]) // gs]
            elif spec.group_size and (i1 + i) % gs == 0:
                scale, zero = params(W[:, i1 + i:i1 + i + gs])
            w = W1[:, i:i + 1]
            Q[:, i1 + i:i1 + i + 1] = q = _ref_fake_quant(w, scale, zero, spec.bits)
            Err1[:, i] = err = ((w - q) / Hinv1[i, i]).flatten()
            W1[:, i:] -= err[:, None] @ Hinv1[i:i + 1, i:]
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


def test_docstring_example():
    assert doctest.testmod(gptq_module).failed == 0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_output_error_at_most_rtn(bits, group_size, symmetric):
    X, H = calib(256)
    W = torch.randn(16, 256)
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    res = gptq_quantize(W, H, spec, block_size=64)
    assert res.fallback is None and res.damp_used == 0.01
    assert out_err(X, W, res.Q) <= out_err(X, W, rtn(W, spec))
    assert res.qweight.dtype == torch.uint8 and int(res.qweight.max()) <= spec.maxq
    assert torch.equal(res.Q, dequant_from_codes(res))  # Q is exactly what the codes say
    assert res.scale.shape == (16, spec.groups(256)) and res.loss > 0


@pytest.mark.parametrize("n_in", [128, 80])  # 80: the last group of 32 is partial
@pytest.mark.parametrize("spec, kwargs", [
    (QuantSpec(4, None, True), {}), (QuantSpec(2, 32, False), {}), (QuantSpec(3, 128, True), {"block_size": 32}),
    (QuantSpec(4, 32, False), {"static_groups": True}), (QuantSpec(3, 32, True), {"act_order": True}),
    (QuantSpec(2, None, False), {"act_order": True}), (QuantSpec(8, 16, False), {"act_order": True}),
    (QuantSpec(3, 32, True), {"act_order": "gar"}), (QuantSpec(2, 16, False), {"act_order": "gar"}),
    (QuantSpec(4, 32, False), {"act_order": "gar", "static_groups": True}),
    (QuantSpec(2, None, False), {"act_order": "gar"}),
])
def test_matches_reference_loop(spec, kwargs, n_in):
    """Tolerance: none. Q and the integer codes equal the independent reference bit for bit
    (CPU, float32) on these shapes: the same Cholesky, the same rank-1 updates column by column
    within each run of ``SUB_BLOCK`` columns; where the reference applies the rank-1 updates to
    the rest of the block one column at a time, we apply them per ``SUB_BLOCK`` as one matmul,
    which sums in another order. A shape or BLAS where that moves a last bit would show here;
    ``test_sub_blocks_change_only_float_rounding`` bounds it."""
    X, H = calib(n_in)
    W = torch.randn(16, n_in)
    kwargs = {"block_size": 64} | kwargs
    ours = gptq_quantize(W, H, spec, **kwargs)
    ref = reference_gptq(W, H, spec, **kwargs)
    assert torch.equal(ours.Q, ref)
    scale = ours.scale[:, ours.g_idx]
    zero = ours.zero[:, ours.g_idx]
    assert torch.equal(ours.qweight.float(), torch.round(ref / scale) + zero)  # the codes too
    assert out_err(X, W, ref) < out_err(X, W, rtn(W, spec))  # and the reference is GPTQ, not RTN


@pytest.mark.parametrize("static_groups", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(3, None, True), QuantSpec(4, 32, False), QuantSpec(2, 16, True)])
def test_identity_hessian_is_rtn(spec, static_groups):
    W = torch.randn(8, 72)  # 72 columns: the last group is partial
    res = gptq_quantize(W, torch.eye(72), spec, damp=0.0, block_size=16, static_groups=static_groups)
    qp = compute_qparams(W, spec)
    rtn_codes = quantize(W, expand_groups(qp.scale, qp.group_size, 72), expand_groups(qp.zero, qp.group_size, 72),
                         spec.maxq)
    assert torch.equal(res.qweight.float(), rtn_codes)
    assert torch.equal(res.Q, rtn(W, spec))
    assert res.loss == pytest.approx((W - res.Q).square().sum().item() / 2, rel=1e-5)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 32, False), QuantSpec(4, None, False)])
def test_act_order_keeps_groups_contiguous(spec):
    X, H = calib(128)
    X[:, 3] *= 20  # a column that act-order visits first, far from its group's start
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(16, 128)
    res = gptq_quantize(W, H, spec, act_order=True, block_size=32)
    gs = spec.group_size or 128
    assert torch.equal(res.g_idx, torch.arange(128) // gs)
    assert torch.equal(res.scale, compute_qparams(W, spec).scale)  # groups from the un-permuted W
    assert torch.equal(res.Q, dequant_from_codes(res))
    assert out_err(X, W, res.Q) <= out_err(X, W, rtn(W, spec))


@pytest.mark.parametrize("kwargs", [{}, {"act_order": True}, {"static_groups": True}])
def test_batched_equals_looped(kwargs):
    E, spec = 4, QuantSpec(3, 32, False)
    W = torch.randn(E, 16, 64)
    H = torch.stack([calib(64, seed=e)[1] for e in range(E)])
    H[2] = -torch.eye(64)  # one expert fails on its own
    batched = gptq_quantize_batched(W, H, spec, block_size=32, **kwargs)
    looped = [gptq_quantize(W[e], H[e], spec, block_size=32, **kwargs) for e in range(E)]
    for b, lo in zip(batched, looped, strict=True):
        assert (b.Q - lo.Q).abs().max() < 1e-5
        assert (b.qweight != lo.qweight).float().mean() < 0.01  # rare rounding ties only
        assert b.fallback == lo.fallback and b.damp_used == lo.damp_used
        assert b.loss == pytest.approx(lo.loss, rel=1e-4)
    assert [b.fallback for b in batched] == [None, None, "rtn", None]
    assert torch.equal(batched[2].Q, rtn(W[2], spec))


def test_indefinite_hessian_retries_then_succeeds(caplog):
    g = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    eig = torch.ones(32)
    eig[-1] = -0.05  # damp 0.01 * mean(diag) is not enough, 0.1 is
    H = basis @ torch.diag(eig) @ basis.T
    with caplog.at_level(logging.WARNING):
        res = gptq_quantize(torch.randn(8, 32), H, QuantSpec(4, None), name="layers.0.mlp.down_proj")
    assert res.fallback is None and res.damp_used == pytest.approx(0.1)
    assert len(caplog.records) == 1 and "layers.0.mlp.down_proj" in caplog.text and "retrying" in caplog.text


def test_hopeless_hessian_falls_back_to_rtn(caplog):
    W, spec = torch.randn(8, 32), QuantSpec(4, 16, True)
    with caplog.at_level(logging.WARNING):
        res = gptq_quantize(W, -torch.eye(32), spec, name="layers.1.attn.q_proj")
    assert res.fallback == "rtn" and res.damp_used == pytest.approx(10.0)
    assert torch.equal(res.Q, rtn(W, spec))
    assert len(caplog.records) == 4  # three retries, then the fallback
    assert all("layers.1.attn.q_proj" in r.getMessage() for r in caplog.records)
    assert "falling back to RTN" in caplog.records[-1].getMessage()


def test_singular_hessian_is_damped():
    X = torch.randn(8, 32)  # 8 tokens: rank 8 < 32
    res = gptq_quantize(torch.randn(4, 32), 2 / 8 * X.T @ X, QuantSpec(4, None), damp=0.0)
    assert res.fallback is None and res.damp_used == pytest.approx(0.1)


def test_damp_zero_on_an_exactly_singular_hessian_retries_instead_of_crashing(caplog):
    # two identical input columns: the Cholesky factor gets an exact zero on its diagonal, which
    # cholesky_inverse refuses; damp=0 must take the damping retries (then RTN), as documented
    H = torch.eye(8)
    H[:2, :2] = 1.0
    W = torch.randn(3, 4, 8)
    with caplog.at_level(logging.WARNING):
        single = gptq_quantize(W[0], H, QuantSpec(4, None), damp=0.0, name="experts.0.down_proj")
        batch = gptq_quantize_batched(W, torch.stack([H, torch.eye(8), -torch.eye(8)]), QuantSpec(4, None), damp=0.0)
    assert single.fallback is None and single.damp_used > 0 and "experts.0.down_proj" in caplog.text
    assert [r.fallback for r in batch] == [None, None, "rtn"]
    assert batch[0].damp_used > 0 and batch[1].damp_used == 0.0
    assert torch.equal(batch[0].Q, single.Q)


def test_nan_and_inf_name_module_and_input():
    W, H = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match=r"experts\.3\.up_proj: the weight W has NaN"):
        gptq_quantize(W.index_fill(1, torch.tensor([2]), float("nan")), H, QuantSpec(4, None),
                      name="experts.3.up_proj")
    with pytest.raises(ValueError, match=r"lin: the Hessian H has NaN or Inf"):
        gptq_quantize(W, H.index_fill(0, torch.tensor([1]), float("inf")), QuantSpec(4, None), name="lin")
    with pytest.raises(ValueError, match=r"e1: the weight W"):
        gptq_quantize_batched(torch.stack([W, W / 0]), torch.stack([H, H]), QuantSpec(4, None), names=["e0", "e1"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="`bits`"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), QuantSpec(16))
    with pytest.raises(ValueError, match=r"H must be \(in, in\)"):
        gptq_quantize(torch.randn(4, 8), torch.eye(9), QuantSpec(4))


def test_dead_inputs_are_zeroed():
    X, _ = calib(32)
    X[:, [5, 20]] = 0  # inputs that never fire
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(8, 32)
    spec = QuantSpec(4, 16, False)
    res = gptq_quantize(W, H, spec, act_order=True)
    assert res.fallback is None and torch.isfinite(res.Q).all()
    assert torch.equal(res.Q[:, [5, 20]], torch.zeros(8, 2))
    assert out_err(X, W, res.Q) <= out_err(X, W, rtn(W, spec))


def test_all_zero_hessian_keeps_the_weight(caplog):
    W, spec = torch.randn(8, 32), QuantSpec(4, None)
    with caplog.at_level(logging.WARNING):
        res = gptq_quantize(W, torch.zeros(32, 32), spec, name="experts.7.down_proj")
    assert res.fallback == "rtn" and torch.equal(res.Q, rtn(W, spec))
    assert "experts.7.down_proj" in caplog.text and "no calibration tokens" in caplog.text


def test_low_precision_weight_computes_in_float32():
    _, H = calib(64)
    W = torch.randn(8, 64, dtype=torch.bfloat16)
    res = gptq_quantize(W, H, QuantSpec(4, 32))
    assert res.Q.dtype == torch.bfloat16 and res.scale.dtype == torch.float32
    assert torch.equal(res.scale, res.scale.bfloat16().float())  # scales representable in the model dtype
    assert torch.equal(res.Q, dequant_from_codes(res).bfloat16())


@pytest.mark.parametrize("spec, act_order", [(QuantSpec(4, 128, True), "none"), (QuantSpec(2, 32, False), "none"),
                                             (QuantSpec(3, None, True), "desc")])
def test_sub_blocks_change_only_float_rounding(spec, act_order, monkeypatch):
    """The rest of a block updated by one matmul per SUB_BLOCK columns instead of column by column
    (~35% faster on CPU): the same math, so at most float rounding moves a code."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 1024, 256, generator=g)
    H = 2 / 1024 * X.transpose(1, 2) @ X
    W = torch.randn(4, 192, 256, generator=g)
    ours = gptq_quantize_batched(W, H, spec, act_order=act_order)
    monkeypatch.setattr(gptq_module, "SUB_BLOCK", 10**6)  # every column updates the rest of its block itself
    one_by_one = gptq_quantize_batched(W, H, spec, act_order=act_order)
    codes = sum(int((a.qweight != b.qweight).sum()) for a, b in zip(ours, one_by_one))
    assert codes <= 1e-4 * W.numel()
    for a, b in zip(ours, one_by_one):
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
