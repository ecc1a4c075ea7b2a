"""Checkpoints store unquantized tensors in the source checkpoint's dtype, losslessly."""

import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open

import quantmoe
from quantmoe import api
from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.models import embedded_root, load_model
from quantmoe.quant.checkpoint import save_quantized, source_dtype
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan

PLAN = Plan.from_dict({
    "default": {"bits": 4, "group_size": 16},
    "roles": {"attention": {"bits": 8, "group_size": None}},
    "kinds": {"down_proj": {"bits": 3, "symmetric": False}},
    "modules": {"model.layers.1.self_attn.o_proj": {"bits": 16}},  # kept: stored in the source dtype too
})


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A tiny Mixtral saved in bfloat16, as hub checkpoints are (with the embedded tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-bf16")
    tiny_model("mixtral", vocab_size=8192).to(torch.bfloat16).save_pretrained(folder)
    for f in (embedded_root() / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _quantized_from(folder):
    model, _ = load_model(str(folder))  # float32 in memory, bf16 values
    specs = PLAN.resolve(describe(model))
    windows = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), progress=False)
    return model, specs, windows


def _dtypes(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def test_source_dtype_is_the_checkpoint_s_not_the_model_s(bf16_folder):
    model, _ = load_model(str(bf16_folder))
    assert next(model.parameters()).dtype == torch.float32 and model.config.dtype == torch.float32
    assert source_dtype(model) == torch.bfloat16  # read from the source's config.json
    assert source_dtype(tiny_model("mixtral")) is None  # built from a config: unknown


def test_unquantized_tensors_in_source_dtype_and_reload_is_exact(tmp_path, bf16_folder):
    model, specs, windows = _quantized_from(bf16_folder)
    path = save_quantized(model, tmp_path / "q", specs, {})
    dtypes = _dtypes(path)
    quantized = {n for n, s in specs.items() if not s.keep}
    for key, dtype in dtypes.items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in ("qweight", "qzeros"):
            assert dtype == "I32", key
        elif module in quantized and leaf == "scales":
            assert dtype == "F32", key  # as the quantizer produced them (the model's dtype)
        else:
            assert dtype == "BF16", key  # embeddings, norms, LM head, routers, biases, the 16-bit o_proj
    assert "model.layers.1.self_attn.o_proj.weight" in dtypes
    assert json.loads((path / "quantization_config.json").read_text())["storage_dtype"] == "bfloat16"
    for dense in (False, True):  # the reload casts back to float32: the in-memory model bit for bit
        loaded = quantmoe.load(path, dense=dense)
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        with torch.no_grad():
            got, want = loaded(input_ids=windows).logits, model(input_ids=windows).logits
        if dense:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fused experts, see test_load_paths
        else:
            assert torch.equal(got, want)


def test_a_tensor_the_source_dtype_cannot_hold_is_kept_exact(tmp_path, bf16_folder, caplog):
    model, specs, windows = _quantized_from(bf16_folder)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-4  # no longer a bfloat16 value
    with caplog.at_level(logging.WARNING, logger="quantmoe.quant.checkpoint"):
        path = save_quantized(model, tmp_path / "q", specs, {})
    assert "model.norm.weight" in caplog.text
    dtypes = _dtypes(path)
    assert dtypes["model.norm.weight"] == "F32" and dtypes["model.embed_tokens.weight"] == "BF16"
    loaded = quantmoe.load(path)  # sdpa attention, as load_model built the source
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=windows).logits, model(input_ids=windows).logits)


def test_mixtral_s_folder_size_is_the_theory(tmp_path):
    """Every file of a saved mixtral-s checkpoint against a size computed from the plan.

    Theory: per quantized linear, bits x weights (codes), bits x out x groups (zero points) and
    4 bytes x out x groups (float32 scales, the quantizer's dtype for a float32 model); every
    other parameter at 2 bytes (bfloat16, the source checkpoint's). Overhead, stated: the
    safetensors header (at most 128 bytes per tensor), the tokenizer files (as the tokenizer
    writes them, 0.55 MB), config.json, quantization_config.json and quant_report.json (at most
    512 bytes per linear plus 4 KB).
    """
    model, tok = load_model("mixtral-s")
    params = sum(p.numel() for p in model.parameters())
    plan = Plan.from_dict({"default": {"bits": 4, "group_size": 128},
                           "roles": {"attention": {"bits": 8, "group_size": None}},
                           "kinds": {"down_proj": {"bits": 3, "group_size": 64, "symmetric": False}},
                           "patterns": [{"pattern": r"model\.layers\.0\.mlp\.experts\.[01]\..*", "bits": 2}],
                           "modules": {"model.layers.5.self_attn.o_proj": {"bits": 16}}})
    calib = CalibrationConfig(num_windows=2, seq_len=64, min_expert_tokens=1)
    gptq = GPTQConfig(method="rtn")
    result = api.quantize(model, tok, plan, calib, gptq, progress=False)
    path = api.save(result, tmp_path / "q", tok, plan, calib, gptq, "mixtral-s")

    theory, quantized_params, linears = 0.0, 0, 0
    for unit in describe(model).units:
        spec = result.specs[unit.name]
        if spec.keep:
            continue
        groups = spec.groups(unit.in_features)
        theory += unit.numel * spec.bits / 8 + unit.out_features * groups * (spec.bits / 8 + 4)
        quantized_params += unit.numel
        linears += 1
    theory += (params - quantized_params) * 2
    files = {f.name: f.stat().st_size for f in path.iterdir()}
    raw = (path / "model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    tensors = len(json.loads(raw[8:8 + header])) - 1  # without __metadata__
    assert abs((files["model.safetensors"] - 8 - header) / theory - 1) < 0.001
    assert header <= 128 * tensors
    tokenizer = sum(size for name, size in files.items() if name.startswith("tokenizer"))
    assert tokenizer <= 1.01 * (embedded_root() / "mixtral-s" / "tokenizer.json").stat().st_size + 1024
    metadata = files["config.json"] + files["quantization_config.json"] + files["quant_report.json"]
    assert metadata <= 512 * linears + 4096
    assert set(files) == {"model.safetensors", "config.json", "quantization_config.json", "quant_report.json",
                          "tokenizer.json", "tokenizer_config.json"}
    total = sum(files.values())
    assert total <= theory + 8 + 128 * tensors + tokenizer + 512 * linears + 4096
    # against the bfloat16 original: what the bits promise (about half here: 3-8 bits, 8-bit attention)
    original = (embedded_root() / "mixtral-s" / "model.safetensors").stat().st_size
    assert files["model.safetensors"] < 0.5 * original
