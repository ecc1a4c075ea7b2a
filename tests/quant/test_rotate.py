"""Residual-stream rotation (quant/rotate.py): same logits in full precision, orthogonal Q, norms at 1,
refusals that name the family, and a rotated quantized checkpoint that reloads exactly.

Tolerance: the rotated float32 model's logits are within 1e-4 (max abs) of the original's
(logits are O(1); the rotation is computed in float64 and rounded once into float32 weights).
"""

import json
from dataclasses import asdict

import pytest
import torch

import quantmoe
from quantmoe.anatomy import FAMILIES, describe, is_unfused, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.export.writer import write_export
from quantmoe.quant.checkpoint import save_quantized
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.quant.rotate import BLOCK_NORMS, hadamard, random_hadamard, rotate_model

LOGIT_ATOL = 1e-4


def _norms(model):
    layers = model.model.layers
    return [getattr(b, n) for b in layers for n in BLOCK_NORMS] + [model.model.norm]


@pytest.mark.parametrize("n", [1, 7, 32, 96, 128])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    Q = random_hadamard(n, seed=3)
    assert Q.dtype == torch.float64 and Q.shape == (n, n)
    assert torch.allclose(Q.T @ Q, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(Q, random_hadamard(n, seed=3))
    if n > 1:
        assert not torch.equal(Q, random_hadamard(n, seed=4))
    if n & (n - 1) == 0:  # a power of two: a signed, normalized Hadamard matrix
        assert torch.allclose(Q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_hadamard_is_sylvester():
    H = hadamard(4)
    assert torch.equal(H @ H.T, 4 * torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(6)


def _check_rotation_keeps_logits(model, ids):
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    embedding = model.model.embed_tokens.weight.detach().clone()
    fused = not is_unfused(model)
    assert any(not torch.allclose(n.weight, torch.ones_like(n.weight)) for n in _norms(model))  # a fold to do
    Q = rotate_model(model, seed=0)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max().item() < LOGIT_ATOL
    assert torch.allclose(model.model.embed_tokens.weight.double(), embedding.double() @ Q, atol=1e-6)
    assert not torch.allclose(model.model.embed_tokens.weight, embedding, atol=1e-3)  # the weights did change
    for norm in _norms(model):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert is_unfused(model) is not fused  # the experts stay in the view they were in
    return Q


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_rotation_keeps_the_logits_of_tiny_models(family):
    model = tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    _check_rotation_keeps_logits(model, ids)


def test_rotation_keeps_the_logits_of_mixtral_s():
    from quantmoe.models import load_model

    model, _ = load_model("mixtral-s", dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    _check_rotation_keeps_logits(model, ids)


@pytest.mark.parametrize(("family", "tied", "reason"), [
    ("mixtral", True, "tied"),
    ("phimoe", False, "is not an RMSNorm"),
    ("qwen3_next", False, "hybrid token mixers"),
    ("laguna", False, "g_proj"),  # an output gate the family spec does not declare
    ("flex_olmo", False, "post_feedforward_layernorm"),
])
def test_refused_families_say_which_and_why(family, tied, reason):
    model = tiny_model(family, tied=tied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"--rotate does not apply to {family} .*{reason}"):
        rotate_model(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before touching a weight


def test_rotated_quantized_checkpoint_and_export_reload_with_identical_logits(tmp_path):
    model = tiny_model("mixtral")
    specs = Plan.uniform(4, group_size=16).resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    gptq = GPTQConfig(rotate=True)
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), gptq, progress=False)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in _norms(model))  # it was rotated
    save_quantized(model, tmp_path / "q", specs, {"gptq": asdict(gptq)})
    write_export(model, specs, tmp_path / "g", metadata={"gptq": asdict(gptq)})  # the GPTQ format too
    with torch.no_grad():
        ref = model(input_ids=windows).logits
        for folder in ("q", "g"):
            loaded = quantmoe.load(tmp_path / folder, attn_implementation="eager")
            assert torch.equal(loaded(input_ids=windows).logits, ref), folder
    assert json.loads((tmp_path / "q" / "quantization_config.json").read_text())["gptq"]["rotate"] is True


def test_quantize_command_rotate(quantize_settings):
    from quantmoe.cli import build_parser
    from quantmoe.quant import cli

    _, gptq = quantize_settings(["mixtral-s", "--bits", "3", "--out", "unused", "--rotate"])
    assert gptq.rotate is True
    args = build_parser().parse_args(["quantize", "mixtral-s", "--bits", "3", "--out", "unused", "--rotate",
                                      "--stream"])
    with pytest.raises(ValueError, match="--rotate .*drop --stream"):
        cli._cmd_quantize(args)


def test_stream_identity_records_rotate_only_when_on():
    from quantmoe.quant.stream import _run_identity

    windows = torch.zeros(2, 4, dtype=torch.long)
    args = ("m", {}, CalibrationConfig())
    assert "rotate" not in _run_identity(*args, GPTQConfig(), torch.float32, windows)["gptq"]  # older work folders
    assert _run_identity(*args, GPTQConfig(rotate=True), torch.float32, windows)["gptq"]["rotate"] is True


# families whose tiny models rotate with the same logits; every other family is refused (never silently wrong)
ROTATABLE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "deepseek_v2", "glm4_moe",
             "glm4_moe_lite", "dots1", "ernie4_5_moe", "minimax_m2", "granitemoe", "solar_open", "exaone_moe",
             "mimo_v2_flash", "hy_v3", "mellum", "aria_text", "flint", "granitemoe_swa", "granitemoeshared",
             "llama4_text"}


@pytest.mark.parametrize("family", sorted(f for f, s in FAMILIES.items() if s.view_refusal is None))
def test_every_family_rotates_exactly_or_is_refused(family):
    model = tiny_model(family).eval()
    ids = torch.randint(3, model.config.get_text_config().vocab_size, (1, 12),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        if family not in ROTATABLE:
            with pytest.raises(ValueError, match=f"--rotate does not apply to {family} "):
                rotate_model(model)
            return
        rotate_model(model)
        assert (model(input_ids=ids).logits - ref).abs().max().item() < LOGIT_ATOL
