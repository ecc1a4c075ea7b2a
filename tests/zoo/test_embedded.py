"""The committed embedded models: structure, size, and the numbers on their cards."""

import json
from pathlib import Path

import pytest
import torch

from quantmoe.anatomy import describe
from quantmoe.calib.routing import collect_routing
from quantmoe.data import split_tokens
from quantmoe.eval.metrics import evaluate, make_windows
from quantmoe.models import EMBEDDED_MODELS, embedded_root, load_model

MAX_FILE_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module", params=EMBEDDED_MODELS)
def embedded(request):
    model, tokenizer = load_model(request.param)
    return request.param, model, tokenizer


def test_files_are_small_and_safetensors(embedded):
    name = embedded[0]
    folder = embedded_root() / name
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    for f in folder.iterdir():
        assert f.stat().st_size <= MAX_FILE_BYTES, f
    for f in ("README.md", "loss_curve.png", "realism.json", "training.json"):
        assert (folder / f).exists(), f


def test_structure_matches_the_family(embedded):
    name, model, _ = embedded
    anatomy = describe(model)
    cfg = model.config
    assert anatomy.total_params == sum(p.numel() for p in model.parameters()) == sum(anatomy.role_params.values())
    moe = [b for b in anatomy.blocks if b.is_moe]
    if name == "mixtral-s":
        assert cfg.model_type == "mixtral" and len(moe) == cfg.num_hidden_layers
        assert all(b.num_experts == 8 and b.top_k == 2 and not b.shared for b in moe)
    else:
        assert cfg.model_type == "deepseek_v3"
        assert not anatomy.blocks[0].is_moe and anatomy.blocks[0].dense_mlp
        assert all(b.num_experts >= 16 and b.top_k >= 4 and b.shared for b in moe)
    for b in moe:
        assert len(b.experts) == b.num_experts
        assert b.experts[5][2] == f"{b.module_name}.mlp.experts.5.down_proj"


GOLDEN = Path(__file__).with_name("golden_embedded.json")  # first 32 test windows of 256 tokens


def test_test_perplexity_matches_the_golden_value(embedded):
    name, model, tokenizer = embedded
    golden = json.loads(GOLDEN.read_text())[name]
    windows = make_windows(split_tokens("test", tokenizer), 256, max_windows=32)
    with torch.no_grad():
        ppl = evaluate(model, windows).ppl
    assert ppl == pytest.approx(golden["test_ppl_32x256"], rel=1e-3)
    assert ppl < 200  # a trained model, not a random one (vocabulary 8192)


def test_routing_statistics_of_the_embedded_models(embedded):
    name, model, tokenizer = embedded
    windows = make_windows(split_tokens("test", tokenizer), 256, max_windows=16)
    stats = collect_routing(model, describe(model), windows)
    for block, counts in stats.counts.items():
        assert counts.sum() == stats.tokens * stats.top_k[block]
        if name == "deepseek-s":  # loss-free balancing keeps every expert busy
            assert stats.balance(block)["unused_experts"] == 0
        else:  # mixtral-s has rare experts (block 4 has one below 1% of uniform): at most one idle here
            assert stats.balance(block)["unused_experts"] <= 1


def test_realism_targets_recorded(embedded):
    name = embedded[0]
    card = json.loads((embedded_root() / name / "realism.json").read_text())
    assert {"base_ppl", "rows", "targets"} <= card.keys()
    assert len(card["rows"]) == 20


def test_every_expert_of_the_embedded_models_is_calibrated_or_listed(embedded):
    import copy

    from quantmoe.calib.data import calibration_windows
    from quantmoe.quant.pipeline import quantize_model
    from quantmoe.quant.plan import Plan

    name, fp, tokenizer = embedded
    model = copy.deepcopy(fp)
    windows = calibration_windows(split_tokens("calibration", tokenizer), 8, 256, seed=0)
    specs = Plan.uniform(4).resolve(describe(model))
    report = quantize_model(model, specs, windows, progress=False)
    assert set(report.units) == set(specs)
    anatomy = describe(model)
    for block in anatomy.blocks:
        if not block.is_moe:
            continue
        tokens = report.expert_tokens[block.index]
        assert sum(tokens) == windows.numel() * block.top_k
        for e, units in enumerate(block.experts):
            for unit in units:
                r = report.units[unit]
                assert r.tokens == tokens[e]
                if r.method == "gptq":
                    assert r.tokens >= 16
                else:
                    assert r.method == "rtn-fallback" and unit in report.fallbacks and r.tokens < 16
