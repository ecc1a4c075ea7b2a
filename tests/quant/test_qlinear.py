import doctest

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import quantmoe.quant.qlinear as qlinear_module
from quantmoe.quant.gptq import gptq_quantize
from quantmoe.quant.grid import QuantSpec, rtn
from quantmoe.quant.pack import pack, unpack
from quantmoe.quant.qlinear import QuantLinear


def gptq_linear(linear: torch.nn.Linear, spec: QuantSpec, **kwargs):
    g = torch.Generator().manual_seed(0)
    n_in = linear.in_features
    X = torch.randn(256, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    return gptq_quantize(linear.weight.detach(), 2 / 256 * X.T @ X, spec, block_size=32, **kwargs)


def test_docstring_example():
    assert doctest.testmod(qlinear_module).failed == 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(2, 32, True), QuantSpec(3, 32, False), QuantSpec(4, None, True),
                                  QuantSpec(8, 16, False)])
def test_forward_equals_result_exactly(spec, act_order):
    linear = torch.nn.Linear(72, 24)  # 72 inputs: not a multiple of 32, last group partial
    res = gptq_linear(linear, spec, act_order=act_order)
    q = QuantLinear.from_result(linear, res)
    x = torch.randn(5, 72)
    assert torch.equal(q.dequantize_weight(), res.Q)
    assert torch.equal(q(x), F.linear(x, res.Q, linear.bias))
    assert q.qweight.dtype == torch.int32 and q.g_idx.dtype == torch.int32 and q.scales.dtype == torch.float32


def test_from_float_is_rtn():
    linear = torch.nn.Linear(64, 16, bias=False)
    spec = QuantSpec(4, 16, False)
    q = QuantLinear.from_float(linear, spec)
    x = torch.randn(3, 64)
    assert q.bias is None
    assert torch.equal(q(x), F.linear(x, rtn(linear.weight.detach(), spec)))


def test_low_precision_matches_result_bit_for_bit():
    linear = torch.nn.Linear(64, 16).to(torch.bfloat16)
    res = gptq_linear(linear, QuantSpec(3, 32, False))
    q = QuantLinear.from_result(linear, res)
    assert q.scales.dtype == torch.bfloat16 and torch.equal(q.dequantize_weight(), res.Q)


def test_state_dict_and_safetensors_round_trip(tmp_path):
    linear = torch.nn.Linear(72, 24)
    spec = QuantSpec(3, 32, False)
    q = QuantLinear.from_result(linear, gptq_linear(linear, spec))
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    fresh = QuantLinear(72, 24, bits=3, group_size=32, bias=True, dtype=torch.float32)
    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    x = torch.randn(4, 72)
    # g_idx is derived from group_size (stored groups are contiguous), so it is not saved
    assert set(q.state_dict()) == {"qweight", "qzeros", "scales", "bias"}
    assert torch.equal(fresh(x), q(x))


def test_arbitrary_group_assignment():
    linear = torch.nn.Linear(64, 8, bias=False)
    q = QuantLinear.from_float(linear, QuantSpec(4, 16, False))
    W = q.dequantize_weight()
    perm = torch.randperm(64)
    q.qweight.copy_(pack(unpack(q.qweight, 4, 64)[:, perm], 4))
    q.g_idx.copy_(q.g_idx[perm])  # columns shuffled, each keeps its group
    assert torch.equal(q.dequantize_weight(), W[:, perm])


def test_shape_mismatch_and_keep_are_errors():
    res = gptq_linear(torch.nn.Linear(32, 8), QuantSpec(4, None))
    with pytest.raises(ValueError, match="weight"):
        QuantLinear.from_result(torch.nn.Linear(32, 4), res)
    with pytest.raises(ValueError, match="`bits`"):
        QuantLinear.from_float(torch.nn.Linear(32, 4), QuantSpec(16))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_stand_in_computes_the_same_outputs(bias, dtype):
    linear = torch.nn.Linear(72, 24, bias=bias).to(dtype)
    res = gptq_linear(linear, QuantSpec(3, 32, False))
    q = QuantLinear.from_result(linear, res)
    dense = q.dense()
    x = torch.randn(5, 72, dtype=dtype)
    assert type(dense) is torch.nn.Linear and dense.weight.dtype == dtype
    assert torch.equal(dense.weight, q.dequantize_weight())
    with torch.no_grad():
        assert torch.equal(dense(x), q(x))
        assert torch.equal(q.dense(res.Q)(x), q(x))  # the result's Q is the dequantized weight


def test_from_results_packs_several_at_once_like_from_result():
    linears = [torch.nn.Linear(72, 24) for _ in range(3)]
    results = [gptq_linear(linear, QuantSpec(3, 32, False)) for linear in linears]
    for q, linear, res in zip(QuantLinear.from_results(linears, results), linears, results, strict=True):
        one = QuantLinear.from_result(linear, res)
        assert q.state_dict().keys() == one.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), one.state_dict().values()))
        assert torch.equal(q.dequantize_weight(), res.Q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(2, 32, True), QuantSpec(3, 32, False), QuantSpec(4, None, True),
                                  QuantSpec(8, 16, False), QuantSpec(8, 32, True)])
def test_code_cache_forward_is_bit_for_bit_the_dequantized_weight(spec, act_order, dtype):
    linear = torch.nn.Linear(72, 24).to(dtype)  # 72 inputs: the last group of 32 is partial
    q = QuantLinear.from_result(linear, gptq_linear(linear, spec, act_order=act_order))
    x = torch.randn(5, 72, dtype=dtype)
    assert q.code_cache_bytes() == 0  # built lazily, on first use
    assert torch.equal(q.cached_weight(), q.dequantize_weight())
    cached = q(x)
    per_byte = 2 if spec.bits == 8 else 1  # int16 holds code - zero in [-255, 255]
    assert q.code_cache_bytes() == per_byte * 24 * q.groups * q.group_size
    q.cache_codes = False
    assert torch.equal(cached, q(x))
    assert torch.equal(cached, F.linear(x, q.dequantize_weight(), q.bias))


def test_code_cache_follows_changes_to_the_packed_tensors():
    linear = torch.nn.Linear(64, 8, bias=False)
    q = QuantLinear.from_float(linear, QuantSpec(4, 16, False))
    x = torch.randn(3, 64)
    before = q(x)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    q.qweight.copy_(pack(unpack(q.qweight, 4, 64)[:, perm], 4))  # in place
    q.g_idx.copy_(q.g_idx[perm])  # any group assignment: the cache is (out, in) then
    assert torch.equal(q(x), F.linear(x, q.dequantize_weight()))
    assert not torch.equal(q(x), before)
    q.qzeros = torch.zeros_like(q.qzeros)  # a new tensor
    assert torch.equal(q(x), F.linear(x, q.dequantize_weight()))
    q.reset_g_idx()
    assert torch.equal(q(x), F.linear(x, q.dequantize_weight()))
    q.clear_code_cache()
    assert q.code_cache_bytes() == 0
