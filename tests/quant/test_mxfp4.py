"""GPT-OSS checkpoints with MXFP4 experts (quant/mxfp4.py): streamed readers dequantize them as
transformers does, a few experts at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from quantmoe.anatomy import describe, tiny_model, unfuse_experts
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant import mxfp4
from quantmoe.quant.lazy import LazyCheckpoint
from quantmoe.quant.mxfp4 import FP4_VALUES, Mxfp4Slice, dequantize_mxfp4
from quantmoe.quant.plan import Plan
from quantmoe.quant.stream import quantize_stream

PROJECTIONS = ("gate_up_proj", "down_proj")


def _to_mxfp4(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of a fused (experts, in, out) parameter, as GPT-OSS stores it: per 32 inputs
    the power of two that brings the largest magnitude within 6, each value rounded to E2M1."""
    w = param.transpose(1, 2).float()  # (experts, out, in)
    experts, out, inputs = w.shape
    groups = w.reshape(experts, out, inputs // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0))
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(-1) + 8 * (scaled < 0)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exponent + 127).to(torch.uint8)


def _mxfp4_folder(tmp_path: Path, **overrides) -> tuple[Path, dict, dict]:
    """Tiny GPT-OSS saved with its experts in MXFP4 (blocks and scales in a shard of their own);
    returns the folder, the float weights and the experts as transformers dequantizes them."""
    path = tmp_path / "mxfp4"
    tiny_model("gpt_oss", **overrides).save_pretrained(path)
    floats = load_file(path / "model.safetensors")
    rest, packed, expected = {}, {}, {}
    for key, t in floats.items():
        if key.rsplit(".", 1)[-1] in PROJECTIONS:
            packed[key + "_blocks"], packed[key + "_scales"] = _to_mxfp4(t)
            expected[key] = convert_moe_packed_tensors(packed[key + "_blocks"], packed[key + "_scales"],
                                                       dtype=torch.float32)
        else:
            rest[key] = t
    (path / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": rest, "model-00002-of-00002.safetensors": packed}
    for name, tensors in shards.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path, floats, expected


def test_dequantization_equals_transformers_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(115, 135, (3, 5, 2), generator=g, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (3, 64, 5)
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert torch.equal(got.bfloat16(), convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="do not pair"):
        dequantize_mxfp4(blocks, scales[:, :, :1])


def test_a_slice_reads_only_the_experts_it_selects(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (4, 6, 1, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 130, (4, 6, 1), generator=g, dtype=torch.uint8)
    save_file({"p_blocks": blocks, "p_scales": scales}, tmp_path / "x.safetensors")
    full = dequantize_mxfp4(blocks, scales)
    read = []
    real = mxfp4.dequantize_mxfp4
    monkeypatch.setattr(mxfp4, "dequantize_mxfp4", lambda b, s: read.append(b.shape[0]) or real(b, s))
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        part = Mxfp4Slice(fh.get_slice("p_blocks"), fh.get_slice("p_scales"))
        assert part.get_shape() == [4, 32, 6] and not read
        assert torch.equal(part[1:3], full[1:3]) and read == [2]
        assert torch.equal(part[...], full) and read == [2, 4]


@pytest.mark.parametrize("per_expert", [False, True])
def test_streamed_reading_dequantizes_mxfp4_experts(tmp_path, per_expert, caplog):
    path, floats, expected = _mxfp4_folder(tmp_path)
    lazy = LazyCheckpoint(path, dtype=torch.float32)
    assert set(lazy.mxfp4) == set(expected)
    assert lazy._expert_reads(0) is not None  # the experts can be read a few at a time, by rows
    lazy.load_outside()
    for i in range(len(lazy.model.model.layers)):
        lazy.load_block(i, per_expert=per_expert)
    assert "skipped" not in caplog.text  # every blocks and scales tensor was used
    fused = {k: v for k, v in lazy.model.state_dict().items()} if not per_expert else None
    if fused is not None:
        for key, want in expected.items():
            assert torch.equal(fused[key], want), key
    model = unfuse_experts(lazy.model)
    reference = tiny_model("gpt_oss")
    reference.load_state_dict(floats | expected)
    reference = unfuse_experts(reference)
    approx = unfuse_experts(tiny_model("gpt_oss"))
    for name, p in reference.named_parameters():
        q = model.get_parameter(name)
        assert torch.equal(q, p), name  # the dequantized experts, every other tensor as stored
        original = approx.get_parameter(name)
        assert (q - original).abs().max() <= original.abs().max() / 4 + 1e-6, name  # E2M1: 1 mantissa bit


def test_quantize_stream_of_mxfp4_equals_the_dequantized_float_checkpoint(tmp_path):
    """The streamed quantization of the MXFP4 folder writes the same tensors as that of a float
    folder holding transformers' dequantization of it."""
    path, floats, expected = _mxfp4_folder(tmp_path)
    plain = tmp_path / "plain"
    model = tiny_model("gpt_oss")
    model.load_state_dict(floats | expected)
    model.save_pretrained(plain)
    plan = Plan.from_dict({"default": {"bits": 4, "group_size": 16}, "kinds": {"down_proj": {"bits": 3}}})
    specs = plan.resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    calib = CalibrationConfig(min_expert_tokens=1, batch_size=4)
    outputs = {}
    for name, src in (("mxfp4", path), ("plain", plain)):
        quantize_stream(src, tmp_path / f"q-{name}", specs, windows, calib, progress=False, dtype=torch.float32)
        outputs[name] = {}
        for f in sorted((tmp_path / f"q-{name}").glob("model*.safetensors")):
            outputs[name].update(load_file(f))
    assert outputs["mxfp4"].keys() == outputs["plain"].keys()
    assert any(k.endswith("qweight") and ".experts." in k for k in outputs["mxfp4"])
    for key, value in outputs["plain"].items():
        assert torch.equal(outputs["mxfp4"][key], value), key


def test_whole_model_loading_dequantizes_mxfp4_experts(tmp_path, monkeypatch):
    """Without --stream the folder goes through transformers, asked for floats: on a GPU with MXFP4
    kernels it would otherwise keep the experts packed, which quantmoe cannot calibrate."""
    import shutil

    from transformers import AutoModelForCausalLM

    from quantmoe.models import embedded_root, load_model

    path, _, expected = _mxfp4_folder(tmp_path, vocab_size=8192)
    for f in (embedded_root() / "tokenizer").iterdir():
        shutil.copy(f, path / f.name)
    asked = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: asked.append(k.get("quantization_config")) or real(*a, **k))
    model, _ = load_model(str(path))
    assert len(asked) == 1 and asked[0].dequantize is True
    state = model.state_dict()
    for key, want in expected.items():
        assert torch.equal(state[key], want), key
