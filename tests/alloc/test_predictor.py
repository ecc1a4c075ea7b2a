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


def test_block_similarity_is_cosine_of_block_input_and_output(model):
    anatomy = describe(model)
    sims = block_similarity(model, anatomy, windows(0))
    assert sorted(sims) == [1, 2]
    X, cos = sims[1]
    assert X.shape == (32, 32) and cos.shape == (32,) and (cos.abs() <= 1 + 1e-6).all()
    assert all(not m._forward_hooks for m in model.modules())


def test_block_importance_ranks_every_moe_block_reproducibly(model, tmp_path):
    anatomy = describe(model)
    result = block_importance(model, anatomy, windows(0), windows(1), SMALL)
    assert sorted(result.ranking()) == sorted(result.ranking("measured")) == [1, 2]
    assert math.isnan(result.spearman) or -1 <= result.spearman <= 1
    assert set(result.epochs.values()) <= set(range(1, 9))
    again = block_importance(model, anatomy, windows(0), windows(1), SMALL)
    assert again.to_json() == result.to_json()  # (== would fail on a nan Spearman)
    result.save(tmp_path / "importance.json")
    assert BlockImportance.from_json((tmp_path / "importance.json").read_text()).to_json() == result.to_json()


def test_bad_predictor_settings_are_errors():
    with pytest.raises(ValueError, match="`holdout`"):
        PredictorConfig(holdout=1.5)
    with pytest.raises(ValueError, match="at least 2 training tokens"):
        train_predictor(torch.zeros(1, 4), torch.zeros(1))
