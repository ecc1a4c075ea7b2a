"""Outlier, WANDA-like and massive-activation scores on hand-made weights and tiny models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from quantmoe.alloc.scorers import (
    ExpertScores,
    massive_routing,
    outlier_score,
    outlier_scores,
    wanda_expert_scores,
    wanda_score,
)
from quantmoe.anatomy import describe, per_expert_view, tiny_model
from quantmoe.calib.routing import collect_routing


@pytest.fixture(scope="module")
def model():
    return tiny_model("deepseek_v3")  # block 0 dense, blocks 1-2 MoE with 8 experts


@pytest.fixture(scope="module")
def anatomy(model):
    return describe(model)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def no_hooks(model) -> bool:
    return all(not (m._forward_pre_hooks or m._forward_hooks) for m in model.modules())


def test_outlier_score_known_answer():
    # columns |W|: (1, 3) -> max 3 / mean 2 = 1.5; (0, 2) -> 2 / 1 = 2; (0, 0) -> 0 (all zero)
    W = torch.tensor([[1.0, 0.0, 0.0], [-3.0, 2.0, 0.0]])
    assert outlier_score(W) == pytest.approx(2.0)
    assert outlier_score(7 * W) == pytest.approx(2.0)  # scale-free
    assert outlier_score(torch.ones(4, 3)) == pytest.approx(1.0)


def test_wanda_score_known_answer():
    assert wanda_score(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 1.0])) == pytest.approx((3 + 2) / 2)


def test_outlier_scores_cover_routed_linears_and_leave_the_model_fused(model, anatomy):
    scores = outlier_scores(model, anatomy)
    assert list(scores) == [u.name for u in anatomy.units if u.role == "routed_expert"]
    with per_expert_view(model):
        name = anatomy.blocks[2].experts[3][2]
        assert scores[name] == pytest.approx(outlier_score(model.get_submodule(name).weight))
    assert not any("ExpertMLP" in type(m).__name__ for m in model.modules())


def test_wanda_hooks_are_removed_and_outputs_unchanged(model, anatomy, windows):
    with torch.no_grad():
        before = model(input_ids=windows).logits
    result = wanda_expert_scores(model, anatomy, windows)
    with torch.no_grad():
        after = model(input_ids=windows).logits
    assert torch.equal(before, after) and no_hooks(model)
    assert sorted(result.scores) == [1, 2] and all(s.shape == (8,) and (s >= 0).all() for s in result.scores.values())
    routed = collect_routing(model, anatomy, windows)
    for b in (1, 2):  # an expert no token reached has all-zero input norms
        assert np.array_equal(result.scores[b] > 0, routed.counts[b] > 0)


def test_wanda_hooks_are_removed_on_error(model, anatomy):
    with pytest.raises(IndexError):
        wanda_expert_scores(model, anatomy, torch.full((1, 4), 10_000))  # token id beyond the vocabulary
    assert no_hooks(model)


def test_massive_routing_counts_routing_of_massive_tokens(model, anatomy, windows, caplog):
    routed = collect_routing(model, anatomy, windows)
    everything = massive_routing(model, anatomy, windows, threshold=0.0)
    for b in (1, 2):
        assert np.array_equal(everything.scores[b], routed.counts[b])
    assert everything.info["massive_tokens"] == 2 * windows.numel()
    with caplog.at_level(logging.WARNING):
        nothing = massive_routing(model, anatomy, windows, threshold=1e9)
    assert all((s == 0).all() for s in nothing.scores.values()) and "no token reached" in caplog.text
    assert no_hooks(model)


# DBRX's router returns its logits alone; Llama 4's experts take the top-k call only in the per-expert view
@pytest.mark.parametrize("family", ["dbrx", "mixtral", "llama4_text"])
def test_massive_routing_reads_the_choices_where_the_experts_get_them(family):
    model = tiny_model(family)
    anatomy = describe(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    routed = collect_routing(model, anatomy, ids)
    everything = massive_routing(model, anatomy, ids, threshold=0.0)
    moe = [b.index for b in anatomy.blocks if b.is_moe]
    assert moe and all(np.array_equal(everything.scores[b], routed.counts[b]) for b in moe)
    assert all(routed.counts[b].sum() == ids.numel() * anatomy.blocks[b].top_k for b in moe)


def test_expert_scores_json_round_trip(tmp_path):
    scores = ExpertScores("massive", {3: np.array([1.0, 0.5])}, {"threshold": 1000.0})
    scores.save(tmp_path / "s.json")
    back = ExpertScores.from_json((tmp_path / "s.json").read_text())
    assert back.kind == "massive" and np.array_equal(back.scores[3], scores.scores[3]) and back.info == scores.info


def test_scorers_on_meta_models_say_they_need_weights():
    from transformers import AutoModelForCausalLM

    from quantmoe.anatomy import tiny_config

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    with pytest.raises(ValueError, match="needs the model's weights"):
        outlier_scores(meta, describe(meta))
