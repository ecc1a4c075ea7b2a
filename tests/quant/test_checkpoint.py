import json

import pytest
import torch

import quantmoe
import quantmoe.quant.checkpoint as ckpt
from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant.checkpoint import CorruptCheckpointError, load_quantized, save_quantized
from quantmoe.quant.pipeline import quantize_model
from quantmoe.quant.plan import Plan

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]


def _quantized(family, plan=None, tied=False):
    model = tiny_model(family, tied=tied)
    plan = plan or Plan.from_dict({"default": {"bits": 4, "group_size": 16},
                                   "kinds": {"down_proj": {"bits": 3, "symmetric": False}},
                                   "roles": {"attention": {"bits": 8}}})
    specs = plan.resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), progress=False)
    return model, specs, windows


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_gives_identical_logits(tmp_path, family):
    model, specs, windows = _quantized(family)
    save_quantized(model, tmp_path / "q", specs, {"note": "test"})
    loaded = quantmoe.load(tmp_path / "q", attn_implementation="eager")  # the tiny models run eager
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, loaded(input_ids=windows).logits)
    cfg = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    assert cfg["modules"].keys() == specs.keys() and cfg["note"] == "test"


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings_stay_tied_through_quantize_save_and_reload(tmp_path, family):
    model, specs, windows = _quantized(family, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the fixture is tied
    assert not any(name.startswith("lm_head") for name in specs)  # never quantized
    save_quantized(model, tmp_path / "q", specs, {})
    loaded = quantmoe.load(tmp_path / "q", attn_implementation="eager")
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # one matrix, not an equal copy
    from safetensors import safe_open
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:  # stored once
        assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, loaded(input_ids=windows).logits)
        loaded.model.embed_tokens.weight.mul_(2)  # and it stays one matrix after a change
        assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


def test_disk_size_close_to_theory(tmp_path):
    model, specs, _ = _quantized("mixtral", Plan.uniform(2, group_size=None))
    path = save_quantized(model, tmp_path / "q", specs, {})
    theory_bits = 0
    for name, t in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        spec = specs.get(module_name)
        if spec is not None and leaf in ("qweight", "qzeros"):
            unit = describe(model).unit(module_name)
            n = unit.numel if leaf == "qweight" else unit.out_features * spec.groups(unit.in_features)
            theory_bits += n * spec.bits
        else:
            theory_bits += t.numel() * t.element_size() * 8
    raw = (path / "model.safetensors").read_bytes()
    data_bytes = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # without the JSON header
    assert abs(data_bytes / (theory_bits / 8) - 1) < 0.05


def test_interrupted_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    model, specs, _ = _quantized("mixtral")

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "file_sha256", crash)  # after the weights are written, before the config
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "q", specs, {})
    assert not (tmp_path / "q").exists()
    assert not list(tmp_path.iterdir())  # the partial folder was removed too
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_quantized(tmp_path / "q")


def test_interrupted_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, specs, windows = _quantized("mixtral")
    save_quantized(model, tmp_path / "q", specs, {"version": 1})
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_quantized(model, tmp_path / "q", specs, {"version": 2}, overwrite=True)
    monkeypatch.undo()
    cfg = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    assert cfg["version"] == 1
    load_quantized(tmp_path / "q")


def test_corrupt_weights_are_detected(tmp_path):
    model, specs, _ = _quantized("mixtral")
    path = save_quantized(model, tmp_path / "q", specs, {})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="SHA-256"):
        load_quantized(path)
