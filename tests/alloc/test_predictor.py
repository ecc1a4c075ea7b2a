"""The block-importance predictor: it learns, it is seeded, and it ranks every MoE block."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantmoe.alloc.predictor import (
    BlockImportance,
    PredictorConfig,
    block_importance,
    block_similarity,
    spearman,
    train_predictor,
)
from quantmoe.anatomy import describe, tiny_model

SMALL = PredictorConfig(width=16, max_epochs=8, patience=3, batch_size=16, lr=1e-2)


@pytest.fixture(scope="module")
def model():
    return tiny_model("deepseek_v3")  # block 0 dense, blocks 1-2 MoE


def windows(seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_spearman_known_values():
    assert spearman(np.array([1.0, 2, 3]), np.array([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.array([1.0, 1.0]), np.array([1.0, 2.0])))


def test_predictor_learns_a_simple_target_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, 8, generator=gen)
    y = torch.tanh(X[:, 0]) * 0.5  # (tokens,)
    config = PredictorConfig(width=32, max_epochs=30, patience=5, batch_size=64, lr=1e-2)
    net, mse, epochs = train_predictor(X, y, config)
    assert mse < 0.2 * float(y.var()) and 1 <= epochs <= 30
    assert net[1].bias is None and isinstance(net[-1], torch.nn.Tanh)
    net2, mse2, _ = train_predictor(X, y, config)
    assert mse2 == mse and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                                  net2.state_dict().values(), strict=True))


def _block_io(model, index, ids):
    """Input and output rows (tokens, hidden) of block ``index``, from hooks of the test's own."""
    seen = {}
    block = model.model.layers[index]
    pre = block.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("x", a[0] if a else k["hidden_states"]),
                                          with_kwargs=True)
    post = block.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        pre.remove()
        post.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1]), seen["y"].reshape(-1, seen["y"].shape[-1])


def test_block_similarity_is_cosine_of_block_input_and_output(model):
    anatomy = describe(model)
    ids = windows(0)
    sims = block_similarity(model, anatomy, ids)
    assert sorted(sims) == [1, 2]
    for b in (1, 2):
        X, cos = sims[b]
        x, y = _block_io(model, b, ids)
        by_hand = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))  # (tokens,)
        assert torch.equal(X, x)
        torch.testing.assert_close(cos, by_hand, rtol=1e-5, atol=1e-6)
        assert cos.std() > 0.01  # per token, not one value broadcast
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _with_identity_block(index: int):
    """The tiny DeepSeek with block ``index`` made an identity (attention and MoE outputs zero):
    its output equals its input, similarity 1, so it is the least important block."""
    m = tiny_model("deepseek_v3")
    with torch.no_grad():
        layer = m.model.layers[index]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.experts.down_proj.zero_()
        layer.mlp.shared_experts.down_proj.weight.zero_()
    return m


@pytest.mark.parametrize("identity", [1, 2])
def test_block_importance_ranks_the_identity_block_last(identity, tmp_path):
    model = _with_identity_block(identity)
    anatomy = describe(model)
    result = block_importance(model, anatomy, windows(0), windows(1), SMALL)
    other = 3 - identity
    assert result.measured[identity] == pytest.approx(1.0, abs=1e-5) and result.measured[other] < 0.99
    assert result.ranking("measured") == (other, identity)  # most important (least similar) first
    # Spearman of predicted vs measured over the two blocks, by hand: +1 if they order them alike
    alike = (result.predicted[1] < result.predicted[2]) == (result.measured[1] < result.measured[2])
    assert result.spearman == pytest.approx(1.0 if alike else -1.0, abs=1e-12)
    assert result.ranking() == tuple(sorted(result.predicted, key=result.predicted.get))
    # a block whose target is the constant 1 is easy: the trained predictor ranks it last too
    assert result.ranking() == (other, identity) and alike
    assert set(result.epochs.values()) <= set(range(1, 9))
    again = block_importance(model, anatomy, windows(0), windows(1), SMALL)
    assert again.to_json() == result.to_json()
    result.save(tmp_path / "importance.json")
    assert BlockImportance.from_json((tmp_path / "importance.json").read_text()) == result


def test_spearman_matches_its_definition_on_random_data():
    """1 - 6 sum d^2 / (n (n^2 - 1)) with distinct values, d the rank differences."""
    gen = np.random.default_rng(0)
    for _ in range(5):
        a, b = gen.normal(size=9), gen.normal(size=9)
        d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
        assert spearman(a, b) == pytest.approx(1 - 6 * (d**2).sum() / (9 * (81 - 1)), abs=1e-12)


def test_bad_predictor_settings_are_errors():
    with pytest.raises(ValueError, match="`holdout`"):
        PredictorConfig(holdout=1.5)
    with pytest.raises(ValueError, match="at least 2 training tokens"):
        train_predictor(torch.zeros(1, 4), torch.zeros(1))
