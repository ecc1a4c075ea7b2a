import pytest
import torch

from quantmoe.export.gptq_format import dequantize, from_gptq, storable, to_gptq
from quantmoe.quant.gptq import gptq_quantize
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.qlinear import QuantLinear


def _gptq_linear(bits, group_size, symmetric, act_order, dtype=torch.float32, bias=False, seed=0, clip="none",
                 refine=0):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 64, 128
    X = torch.randn(256, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)
    linear = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
    res = gptq_quantize(linear.weight.detach(), 2 / 256 * X.T @ X, QuantSpec(bits, group_size, symmetric, clip),
                        act_order=act_order, refine=refine)
    return QuantLinear.from_result(linear, res), res


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_export_dequantizes_to_our_weight_bit_for_bit(bits, group_size, symmetric):
    for act_order, clip, refine in ((False, "none", 0), (True, "none", 0), (False, "mse", 0), (True, "hmse", 0),
                                    ("gar", "none", 0), ("gar", "hmse", 0), (False, "none", 2), (True, "hmse", 2)):
        q, res = _gptq_linear(bits, group_size, symmetric, act_order, clip=clip, refine=refine)
        t = to_gptq(q)
        assert t["qweight"].dtype == t["qzeros"].dtype == t["g_idx"].dtype == torch.int32
        assert t["scales"].dtype == torch.float16
        groups = 1 if group_size is None or group_size >= 128 else 128 // group_size
        assert tuple(t["qweight"].shape) == (128 * bits // 32, 64)
        assert tuple(t["qzeros"].shape) == (groups, 64 * bits // 32)
        assert tuple(t["scales"].shape) == (groups, 64) and tuple(t["g_idx"].shape) == (128,)
        W = dequantize(t, 128)
        assert torch.equal(W, res.Q.float()), (bits, group_size, symmetric, act_order, clip, refine)
        assert torch.equal(W, q.dequantize_weight().float())


def test_symmetric_zero_is_stored_as_half_range_minus_one():
    q, _ = _gptq_linear(4, 32, True, False)
    t = to_gptq(q)
    assert set(t["qzeros"].view(torch.uint8).unique().tolist()) == {0x77}  # every nibble 7 = 8 - 1


@pytest.mark.parametrize("refine", [0, 2])  # refined scales are rounded to bfloat16 values too
def test_bfloat16_model_exports_exactly_and_reloads(refine):
    q, res = _gptq_linear(3, 32, False, True, dtype=torch.bfloat16, bias=True, refine=refine)
    t = to_gptq(q)
    assert torch.equal(dequantize(t, 128).to(torch.bfloat16), res.Q)
    back = from_gptq(t, 128, 64, torch.bfloat16)
    assert torch.equal(back.dequantize_weight(), q.dequantize_weight())
    assert torch.equal(back.bias, q.bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_roundtrip_through_the_format_keeps_every_buffer(bits):
    q, _ = _gptq_linear(bits, 32, False, False)
    back = from_gptq(to_gptq(q), 128, 64, torch.float32)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name


def test_reader_honours_a_permuted_g_idx():
    q, _ = _gptq_linear(4, 32, True, False)
    t = to_gptq(q)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    t["g_idx"] = t["g_idx"][perm].contiguous()  # e.g. GPTQModel desc_act without static groups
    back = from_gptq(t, 128, 64, torch.float32)
    assert torch.equal(back.dequantize_weight(), dequantize(t, 128))


def test_wrapped_v1_zeros_read_as_gptqmodel_does():
    # GPTQModel's v2 -> v1 subtracts 0x11111111 from whole words: a zero of 0 borrows from the next field
    zeros = torch.tensor([[0, 5, 3, 15, 1, 0, 2, 9]])
    from quantmoe.export.gptq_format import v1_zeros
    from quantmoe.quant.pack import pack

    words = pack(zeros, 4).to(torch.int64) - 0x11111111
    stored = torch.where(words < -2**31, words + 2**32, words).to(torch.int32)
    assert torch.equal(v1_zeros(stored, 4, 8), zeros)


def test_unstorable_shapes_are_named():
    assert storable(128, 48, 3) == "out_features 48 is not a multiple of 32, which 3-bit packing needs"
    assert storable(128, 48, 4) is None
    assert "16 bits" in storable(128, 64, 16)
