"""Flagship shapes: the published configs, described on the meta device, give the published sizes."""

from __future__ import annotations

import pytest

from quantmoe.alloc.presets import MODEL_SHAPES, paper_config
from quantmoe.anatomy import describe_config
from quantmoe.anatomy.flagships import FLAGSHIPS, flagship_config

# published total parameters (model cards), MoE blocks, routed experts per block, top-k. GLM-4.5 and
# Qwen3-Next count their multi-token-prediction layer and Llama-4-Scout its vision tower, which the
# transformers text models leave out: hence the 2% tolerance.
PUBLISHED = {
    "glm-4.5": (355e9, 89, 160, 8),
    "qwen3-next-80b-a3b": (80e9, 48, 512, 10),
    "llama-4-scout": (109e9, 48, 16, 1),
    "minimax-m2": (230e9, 62, 256, 8),
    "deepseek-v2-lite": (15.7e9, 26, 64, 6),
    "phi-3.5-moe": (41.9e9, 32, 16, 2),
}


def test_every_flagship_is_listed_and_plannable():
    assert set(PUBLISHED) == set(FLAGSHIPS)
    assert set(FLAGSHIPS) <= set(MODEL_SHAPES)


@pytest.mark.parametrize("name", sorted(FLAGSHIPS))
def test_flagship_shapes_match_the_published_model(name):
    total, moe_blocks, experts, top_k = PUBLISHED[name]
    anatomy = describe_config(flagship_config(name))
    assert anatomy.total_params == pytest.approx(total, rel=0.02)
    moe = [b for b in anatomy.blocks if b.is_moe]
    assert len(moe) == moe_blocks
    assert {(b.num_experts, b.top_k) for b in moe} == {(experts, top_k)}
    assert paper_config(name).to_dict() == flagship_config(name).to_dict()


def test_unknown_flagship_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        flagship_config("glm-4")
