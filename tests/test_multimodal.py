"""Multimodal checkpoints (Llama 4, Qwen3.5-MoE, Gemma 4, dots.note3) are read as their MoE text model."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quantmoe
from quantmoe.anatomy import UnsupportedModelError, describe, family_of
from quantmoe.anatomy.describe import inspect_model
from quantmoe.anatomy.tiny import tiny_multimodal
from quantmoe.calib.data import CalibrationConfig
from quantmoe.cli import main
from quantmoe.models import embedded_root, load_model
from quantmoe.multimodal import MULTIMODAL, text_architecture, text_config_of
from quantmoe.quant.checkpoint import save_quantized
from quantmoe.quant.pipeline import quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.quant.stream import quantize_stream

TYPES = sorted(MULTIMODAL)
PLAN = Plan.from_dict({"default": {"bits": 4, "group_size": 16}, "kinds": {"down_proj": {"bits": 3}}})
CALIB = CalibrationConfig(min_expert_tokens=1, batch_size=4)
# transformers 5.24's Llama4ForConditionalGeneration fails on text-only input (it reads `image_outputs`
# from its language model's output): its language model, a Llama4ForCausalLM, is the reference there
REFERENCE_IS_LANGUAGE_MODEL = {"llama4"}


def _folder(tmp_path: Path, model_type: str) -> tuple[Path, torch.nn.Module]:
    model = tiny_multimodal(model_type, vocab_size=8192)
    folder = tmp_path / f"mm-{model_type}"
    model.save_pretrained(folder)
    for f in (embedded_root() / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder, model


def _windows(n=8, t=24):
    return torch.randint(0, 8192, (n, t), generator=torch.Generator().manual_seed(0))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("model_type", TYPES)
def test_the_text_model_is_read_out_of_the_multimodal_checkpoint_and_quantized(tmp_path, model_type):
    folder, multimodal = _folder(tmp_path, model_type)
    text, _ = load_model(str(folder))
    assert type(text).__name__ == text_architecture(MULTIMODAL[model_type].text_model_type)
    ids = _windows(2, 12)
    reference = multimodal.language_model if model_type in REFERENCE_IS_LANGUAGE_MODEL else multimodal
    with torch.no_grad():
        torch.testing.assert_close(text(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)

    # inspect describes the text model: every parameter of it, none of the towers
    anatomy = inspect_model(str(folder))
    assert anatomy.family == MULTIMODAL[model_type].text_model_type
    assert sum(anatomy.role_params.values()) == anatomy.total_params == sum(p.numel() for p in text.parameters())
    assert anatomy.total_params < sum(p.numel() for p in multimodal.parameters())

    # streamed from the multimodal folder = streamed from the text model saved alone = the whole-model path
    specs = PLAN.resolve(describe(text))
    windows = _windows()
    quantize_stream(folder, tmp_path / "stream", specs, windows, CALIB, dtype=torch.float32, progress=False)
    # saved, it is named as the text model class names its own checkpoints (not back to the multimodal names)
    text.save_pretrained(tmp_path / "text-alone")
    AutoModelForCausalLM.from_config(text.config).save_pretrained(tmp_path / "scratch")
    assert _tensors(tmp_path / "text-alone").keys() == _tensors(tmp_path / "scratch").keys()
    quantize_stream(tmp_path / "text-alone", tmp_path / "alone", specs, windows, CALIB, dtype=torch.float32,
                    progress=False)
    quantize_model(text, specs, windows, CALIB, progress=False)
    save_quantized(text, tmp_path / "whole", specs, {})
    stream, alone, whole = _tensors(tmp_path / "stream"), _tensors(tmp_path / "alone"), _tensors(tmp_path / "whole")
    assert stream.keys() == alone.keys() == whole.keys()
    assert all(torch.equal(stream[k], alone[k]) and torch.equal(stream[k], whole[k]) for k in stream)
    assert not any("vision" in k or "audio" in k or "visual" in k for k in stream)
    written = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert written["architectures"] == [type(text).__name__]
    loaded = quantmoe.load(tmp_path / "stream")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=windows).logits, text(input_ids=windows).logits)


def test_text_config_carries_the_checkpoints_dtype_and_tying():
    folder_config = tiny_multimodal("gemma4").config
    folder_config.dtype = torch.bfloat16
    folder_config.get_text_config().dtype = None
    text = text_config_of(folder_config)
    assert text.model_type == "gemma4_text" and text.architectures == ["Gemma4ForCausalLM"]
    assert text.dtype == torch.bfloat16
    assert text.tie_word_embeddings is folder_config.tie_word_embeddings is True
    assert folder_config.get_text_config().architectures is None  # a copy: the folder's config is untouched
    other = tiny_multimodal("llama4").config.get_text_config()
    assert text_config_of(other) is other


def test_family_of_a_multimodal_config_names_its_text_model():
    with pytest.raises(UnsupportedModelError, match="multimodal config: quantmoe works on its text model .llama4_text"):
        family_of(tiny_multimodal("llama4").config)


def test_quantize_asks_for_text_only_before_writing_a_checkpoint_without_the_tower(tmp_path, capsys, caplog):
    folder, _ = _folder(tmp_path, "llama4")
    out = tmp_path / "q"
    args = ["quantize", str(folder), "--bits", "4", "--group-size", "16", "--calib-windows", "4", "--calib-len", "16",
            "--out", str(out)]
    assert main(args) != 0
    assert "pass --text-only" in caplog.text and "Llama4ForCausalLM, without the vision tower" in caplog.text
    assert not out.exists()
    assert main([*args, "--text-only", "--stream"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]
    gptq = tmp_path / "gptq"  # the in-memory path's GPTQ export: the text model's own names too
    assert main([*args[:-1], str(gptq), "--text-only", "--format", "gptq"]) == 0
    names = _tensors(gptq).keys()
    assert "model.layers.0.self_attn.q_proj.qweight" in names and not any("language_model" in k for k in names)
    assert main(["inspect", str(folder)]) == 0
    assert "a multimodal Llama 4 (Scout, Maverick) checkpoint (llama4): its text model below" in capsys.readouterr().out


def test_a_multimodal_checkpoint_missing_a_text_tensor_is_an_error_naming_it(tmp_path):
    from safetensors.torch import save_file

    from quantmoe.quant.lazy import CheckpointFilesError, LazyCheckpoint

    folder, _ = _folder(tmp_path, "llama4")
    tensors = load_file(folder / "model.safetensors")
    del tensors["language_model.model.norm.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds no tensor for 1 weights of its text model .e.g. model.norm.weight"):
        load_model(str(folder))
    with pytest.raises(CheckpointFilesError, match="hold no tensor for 1 weights of the model .e.g. model.norm.weight"):
        LazyCheckpoint(folder)
