"""Quantized folders outside quantmoe.load: refused by transformers, evaluated correctly by quantmoe."""

import json
import re

import pytest
import torch

from quantmoe import api
from quantmoe.calib.data import CalibrationConfig
from quantmoe.cli import main
from quantmoe.data.corpora import load_tokens
from quantmoe.eval.metrics import evaluate, make_windows
from quantmoe.models import load_model
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan

MIXED_EXPERTS = {"default": {"bits": 4, "group_size": 32},
                 "modules": {"model.layers.1.mlp.experts.2.down_proj": {"bits": 8}}}


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    """A saved quantmoe checkpoint of the tiny model and the in-memory model it was saved from."""
    root = tmp_path_factory.mktemp("cli-export")
    model, tokenizer = load_model(str(tiny_model_dir))
    plan, calib = Plan.from_dict(MIXED_EXPERTS), CalibrationConfig(num_windows=4, seq_len=32, min_expert_tokens=1)
    result = api.quantize(model, tokenizer, plan, calib, GPTQConfig(), progress=False)
    ckpt = api.save(result, root / "ckpt", tokenizer, plan, calib, GPTQConfig(), str(tiny_model_dir))
    return root, ckpt, result.model, tokenizer


def _ppl(capsys) -> str:
    return re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1)


def test_transformers_refuses_a_quantmoe_checkpoint(quantized):
    from transformers import AutoModelForCausalLM

    _, ckpt, _, _ = quantized
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["load_with"] == "quantmoe.load(PATH)"
    with pytest.raises(ValueError, match="model type `quantmoe`"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_eval_of_saved_checkpoint_and_export_equals_the_in_memory_model(quantized, capsys):
    root, ckpt, model, tokenizer = quantized
    windows = make_windows(load_tokens("test", tokenizer), 64, 3)
    expected = f"{evaluate(model, windows).ppl:.3f}"
    assert main(["eval", str(ckpt), "--seq-len", "64", "--max-windows", "3"]) == 0
    assert _ppl(capsys) == expected
    assert main(["export", str(ckpt), "--out", str(root / "gptq"), "--target", "gptqmodel"]) == 0
    assert "dynamic rules" in capsys.readouterr().out
    assert main(["eval", str(root / "gptq"), "--seq-len", "64", "--max-windows", "3"]) == 0
    assert _ppl(capsys) == expected
    assert main(["inspect", str(ckpt)]) == 0 and main(["inspect", str(root / "gptq")]) == 0


def test_commands_that_need_full_precision_refuse_quantized_folders(quantized, caplog):
    root, ckpt, _, _ = quantized
    assert main(["quantize", str(ckpt), "--bits", "4", "--out", str(root / "again")]) == 2
    assert "is a quantized model (quantmoe format)" in caplog.text and not (root / "again").exists()


def test_export_for_vllm_names_the_layer_and_the_fix(quantized, caplog):
    root, ckpt, _, _ = quantized
    assert main(["export", str(ckpt), "--out", str(root / "vllm"), "--target", "vllm"]) == 2
    assert "model.layers.1.mlp.experts: its routed experts mix formats" in caplog.text
    assert "quantmoe solve --granularity block" in caplog.text and not (root / "vllm").exists()


def test_quantize_format_gptq_writes_the_export_directly(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "direct"
    assert main(["quantize", str(tiny_model_dir), "--bits", "4", "--group-size", "16", "--calib-windows", "4",
                 "--calib-len", "32", "--min-expert-tokens", "1", "--format", "gptq", "--target", "vllm",
                 "--out", str(out)]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["dynamic"]) == (4, 16, {})
    assert (out / "quant_report.json").exists() and (out / "tokenizer.json").exists()
    model, _ = api.load_model_or_quantized(str(out))
    assert sum(1 for m in model.modules() if type(m).__name__ == "QuantLinear") > 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_serve_check_without_a_gpu_says_what_it_would_check(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benches" / "serve_check.py"
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: serve_check runs for real (minutes), not as a unit test")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1
    assert "would serve" in proc.stdout and "vLLM" in proc.stdout
