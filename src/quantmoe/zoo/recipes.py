"""Recipes of the embedded models: architecture and training settings, as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class Recipe:
    """One embedded model: its transformers config and how it is trained."""

    name: str
    model_type: str  # transformers config.model_type
    config: dict[str, Any]
    description: str
    steps: int = 5000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 4e-3
    min_lr_ratio: float = 0.05
    warmup_fraction: float = 0.03
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02  # matrices only, never norms, biases or the router
    init_std: float = 0.005
    grad_clip: float = 1.0
    bias_update_rate: float = 1e-3  # DeepSeek-V3 auxiliary-loss-free balancing
    eval_every: int = 250
    seed: int = 0
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)

RECIPES: dict[str, Recipe] = {
    "mixtral-s": Recipe(
        name="mixtral-s",
        model_type="mixtral",
        description="Mixtral-style: 6 blocks, routed experts only, top-2 of 8, grouped-query attention",
        config=dict(
            _COMMON,
            num_key_value_heads=2,
            intermediate_size=256,
            num_local_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
        ),
    ),
    "deepseek-s": Recipe(
        name="deepseek-s",
        model_type="deepseek_v3",
        description=(
            "DeepSeek-V3-style: 6 blocks, block 0 dense, MLA attention, 2 shared experts, "
            "fine-grained routed experts top-4 of 16, sigmoid routing with loss-free balancing"
        ),
        config=dict(
            _COMMON,
            num_key_value_heads=4,
            intermediate_size=384,
            moe_intermediate_size=96,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            routed_scaling_factor=1.0,
            norm_topk_prob=True,
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        ),
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}: choose one of {', '.join(RECIPES)}") from None
