"""Every way of loading a checkpoint gives the logits of the in-memory quantized model."""

import functools

import pytest
import torch

import quantmoe
from quantmoe.anatomy import UnfusedExperts, describe, family_of, tiny_model, unfuse_experts
from quantmoe.anatomy.expert_view import experts_module_names
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant.checkpoint import save_quantized
from quantmoe.quant.dense import code_cache_bytes, dequantize_model
from quantmoe.quant.pipeline import quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.quant.qlinear import QuantLinear

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]
# Dense fuses the experts back: gate and up are one matmul over the fused (2I, H) weight where
# the per-expert view does two (I, H) matmuls, so BLAS may order the float32 sums differently.
# The weights themselves are equal bit for bit (tested); the logits within this tolerance.
DENSE_ATOL = 1e-5


@functools.cache
def _saved(family, tmp_root):
    model = tiny_model(family)
    plan = Plan.from_dict({"default": {"bits": 4, "group_size": 16},
                           "kinds": {"down_proj": {"bits": 3, "symmetric": False}},
                           "roles": {"attention": {"bits": 8, "group_size": None}}})
    specs = plan.resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), progress=False)
    path = save_quantized(model, tmp_root / family, specs, {})
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    return path, windows, logits


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("load-paths")


@torch.no_grad()
def _logits(model, windows):
    return model(input_ids=windows).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_paths_are_bit_for_bit(tmp_root, family):
    path, windows, reference = _saved(family, tmp_root)
    cached = quantmoe.load(path, attn_implementation="eager")
    assert torch.equal(_logits(cached, windows), reference)
    assert code_cache_bytes(cached) > 0
    uncached = quantmoe.load(path, attn_implementation="eager", cache_codes=False)
    assert torch.equal(_logits(uncached, windows), reference)
    assert code_cache_bytes(uncached) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_is_a_plain_transformers_model_with_the_same_weights(tmp_root, family):
    path, windows, reference = _saved(family, tmp_root)
    packed = quantmoe.load(path, attn_implementation="eager")
    dense = quantmoe.load(path, attn_implementation="eager", dense=True)
    assert not any(isinstance(m, (QuantLinear, UnfusedExperts)) for m in dense.modules())
    assert dense.config._experts_implementation == "eager"  # never batched_mm: it OOMs on CPU
    names = experts_module_names(dense, family_of(dense))
    assert names and all(dense.get_submodule(n).down_proj.dim() == 3 for n in names)  # transformers' fused 3D
    # the dense weights are the dequantized weights bit for bit: unfusing gives them back
    expected = dequantize_model(packed, fuse=False).state_dict()
    got = unfuse_experts(dense).state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    fused = quantmoe.load(path, attn_implementation="eager", dense=True)
    torch.testing.assert_close(_logits(fused, windows), reference, rtol=0, atol=DENSE_ATOL)
    assert torch.equal(_logits(dense, windows), reference)  # unfused again: bit for bit
