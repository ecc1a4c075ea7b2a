"""Clipping (QuantSpec.clip): a searched shrink of each group's range, never worse than the full range."""

import pytest
import torch

from quantmoe.quant.gptq import gptq_quantize, gptq_quantize_batched
from quantmoe.quant.grid import CLIP_SHRINKS, QuantSpec, compute_qparams, dequantize, expand_groups, quantize, rtn
from quantmoe.quant.plan import Plan


def _weights(seed=0, out_f=48, in_f=96):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    W[::7, ::11] *= 12  # a few outliers per row: the case clipping is for
    return W


def _group_error(W, spec, qp, weight=None):
    in_f = W.shape[1]
    s, z = expand_groups(qp.scale, qp.group_size, in_f), expand_groups(qp.zero, qp.group_size, in_f)
    d = (dequantize(quantize(W, s, z, spec.maxq), s, z) - W).square()
    if weight is not None:
        d = d * weight
    return d.reshape(W.shape[0], -1, qp.group_size).sum(-1)  # (out, groups)


def test_shrink_one_is_the_first_candidate():
    assert CLIP_SHRINKS[0] == 1.0 and min(CLIP_SHRINKS) == pytest.approx(0.2) and len(CLIP_SHRINKS) == 81


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32])
def test_mse_clip_never_raises_the_group_error_and_lowers_it_with_outliers(bits, symmetric, group_size):
    W = _weights()
    full = QuantSpec(bits, group_size, symmetric)
    clipped = QuantSpec(bits, group_size, symmetric, clip="mse")
    e_full = _group_error(W, full, compute_qparams(W, full))
    qp = compute_qparams(W, clipped)
    e_clip = _group_error(W, clipped, qp)
    assert (e_clip <= e_full).all()
    if bits <= 4:
        assert e_clip.sum() < e_full.sum()
    assert torch.equal(qp.scale, qp.scale.half().float())  # still float16 values: exportable
    if not symmetric:
        assert (qp.zero >= 1).all()


def test_hmse_weighs_columns_and_without_weights_is_mse():
    W = _weights(1)
    imp = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(2)) ** 4
    spec = QuantSpec(3, 32, False, clip="hmse")
    qp_h = compute_qparams(W, spec, col_weight=imp)
    mse = QuantSpec(3, 32, False, clip="mse")
    qp_m = compute_qparams(W, mse)
    weighted = lambda qp: _group_error(W, spec, qp, imp)  # noqa: E731
    assert (weighted(qp_h) <= weighted(qp_m) + 1e-12).all() and (weighted(qp_h) < weighted(qp_m)).any()
    no_weight = compute_qparams(W, spec)
    assert torch.equal(no_weight.scale, qp_m.scale) and torch.equal(no_weight.zero, qp_m.zero)


def test_clip_none_is_the_full_range_grid():
    W = _weights(3)
    spec = QuantSpec(2, 32, True)
    qp = compute_qparams(W, spec)
    span = W.reshape(W.shape[0], -1, 32).abs().amax(-1)
    assert torch.equal(qp.scale, (2 * span / 3).half().float())


@pytest.mark.parametrize("clip", ["mse", "hmse"])
@pytest.mark.parametrize("act_order", [False, True])
def test_batched_gptq_with_clip_equals_single(clip, act_order):
    g = torch.Generator().manual_seed(4)
    E, out_f, in_f = 3, 32, 64
    X = torch.randn(E, 256, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)
    H = 2 / 256 * X.transpose(1, 2) @ X
    W = torch.stack([_weights(10 + e, out_f, in_f) for e in range(E)])
    spec = QuantSpec(3, 32, False, clip=clip)
    batched = gptq_quantize_batched(W, H, spec, act_order=act_order)
    for e in range(E):
        single = gptq_quantize(W[e], H[e], spec, act_order=act_order)
        assert torch.equal(single.qweight, batched[e].qweight) and torch.equal(single.scale, batched[e].scale)


def test_gptq_with_clip_beats_rtn_and_clip_helps_gptq_at_2_bits():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    H = 2 / 512 * X.T @ X
    W = _weights(6, 32, 64)
    err = lambda Q: (X @ (W - Q).T).norm().item()  # noqa: E731
    plain = gptq_quantize(W, H, QuantSpec(2, 32, False))
    clipped = gptq_quantize(W, H, QuantSpec(2, 32, False, clip="hmse"))
    assert err(clipped.Q) < err(rtn(W, QuantSpec(2, 32, False, clip="hmse")))
    assert err(clipped.Q) < err(plain.Q)


def test_plan_carries_clip_and_names_bad_values():
    plan = Plan.from_dict({"default": {"bits": 3, "clip": "mse"}, "roles": {"attention": {"clip": "none"}}})
    assert plan.default.clip == "mse" and Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ValueError, match=r"check `clip`.*'mse2'.*did you mean 'mse'"):
        Plan.from_dict({"default": {"bits": 3, "clip": "mse2"}})
    with pytest.raises(ValueError, match=r"check `clip` in `default`: expected one of none, mse, hmse"):
        Plan.from_dict({"default": {"bits": 3, "clip": True}})
