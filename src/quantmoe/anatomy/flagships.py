"""Shapes of flagship models of the supported families, from their published configs.

Each entry is (model_type, config fields); `flagship_config(name)` builds the transformers
config, so `quantmoe plan NAME` and `quantmoe.anatomy.describe_config` work on the `meta`
device without downloading anything. Only fields that change shapes or the block layout are
written; the rest are the family's transformers defaults. Multi-token-prediction layers
are not part of the transformers models and are not counted.
"""

from __future__ import annotations

from typing import Any

FLAGSHIPS: dict[str, tuple[str, dict[str, Any]]] = {
    # zai-org/GLM-4.5: 92 blocks (3 dense), 160 routed experts top-8 + 1 shared
    "glm-4.5": ("glm4_moe", dict(
        vocab_size=151552, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128, attention_bias=True,
        use_qk_norm=True, n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
        n_group=1, topk_group=1, routed_scaling_factor=2.5, tie_word_embeddings=False)),
    # Qwen/Qwen3-Next-80B-A3B-Instruct: 48 blocks, 3 of 4 Gated DeltaNet, 512 experts top-10 + 1 gated shared
    "qwen3-next-80b-a3b": ("qwen3_next", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5120, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4, num_experts=512,
        num_experts_per_tok=10, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)),
    # meta-llama/Llama-4-Scout-17B-16E (text model): 48 MoE blocks, 16 experts top-1 + 1 shared
    "llama-4-scout": ("llama4_text", dict(
        vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_local_experts=16,
        num_experts_per_tok=1, interleave_moe_layer_step=1, tie_word_embeddings=False)),
    # MiniMaxAI/MiniMax-M2: 62 blocks, 256 experts top-8
    "minimax-m2": ("minimax_m2", dict(
        vocab_size=200064, hidden_size=3072, intermediate_size=1536, num_hidden_layers=62, num_attention_heads=48,
        num_key_value_heads=8, head_dim=128, num_local_experts=256, num_experts_per_tok=8,
        tie_word_embeddings=False)),
    # deepseek-ai/DeepSeek-V2-Lite: 27 blocks (1 dense), MLA without a query low rank, 64 experts top-6 + 2 shared
    "deepseek-v2-lite": ("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        tie_word_embeddings=False)),
    # microsoft/Phi-3.5-MoE-instruct: 32 blocks, 16 experts top-2, biased attention and lm_head
    "phi-3.5-moe": ("phimoe", dict(
        vocab_size=32064, hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
        tie_word_embeddings=False)),
}


def flagship_config(name: str):
    """The transformers config of a flagship model (see `FLAGSHIPS`); ValueError for an unknown name."""
    from transformers import AutoConfig

    if name not in FLAGSHIPS:
        raise ValueError(f"unknown flagship model {name!r}; choose one of {', '.join(FLAGSHIPS)}")
    model_type, kwargs = FLAGSHIPS[name]
    return AutoConfig.for_model(model_type, **kwargs)
