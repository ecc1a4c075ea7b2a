"""Tiny random models of every supported family, for tests and examples.

Each config is a few layers of width 32-64 with a 128-token vocabulary and a handful of
experts, chosen so that every structural feature of the family appears at least once
(dense blocks next to MoE blocks, shared experts, MLA low-rank projections, biases,
attention sinks). Models are fp32, eager attention and eager experts. Every family also
comes tied (`tied=True`: `tie_word_embeddings`, lm_head shares the embedding matrix), as
small models of several families ship.

Example:
    >>> model = tiny_model("mixtral")
    >>> sum(p.numel() for p in model.parameters()) < 200_000
    True
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from quantmoe.anatomy.families import FAMILIES
from quantmoe.anatomy.specs import UnsupportedModelError, is_norm

logger = logging.getLogger(__name__)

_COMMON: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Shared by several families below.
_DEEPSEEK_MOE: dict[str, Any] = {
    "num_hidden_layers": 3,
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "n_routed_experts": 6,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
}
_MLA: dict[str, Any] = {
    **_DEEPSEEK_MOE,
    "num_key_value_heads": 4,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
}
_TYPED_MOE: dict[str, Any] = {  # mlp_layer_types: block 0 dense
    "num_hidden_layers": 3,
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "num_experts_per_tok": 2,
    "mlp_layer_types": ["dense", "sparse", "sparse"],
}
_GATED_DELTANET: dict[str, Any] = {
    "num_hidden_layers": 3,
    "head_dim": 8,
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
    "num_experts": 6,
    "num_experts_per_tok": 2,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
}

# Per family: what differs from _COMMON. Kept small enough that a forward pass over a
# few dozen tokens takes milliseconds on one CPU core.
_TINY: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 64,  # dense blocks
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "mlp_only_layers": [0],
        "decoder_sparse_step": 1,
        "norm_topk_prob": False,
    },
    "qwen3_moe": {
        "num_hidden_layers": 3,
        "head_dim": 8,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,  # only block 1 is MoE: (i + 1) % 2 == 0
        "norm_topk_prob": True,
    },
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "routed_scaling_factor": 2.5,
    },
    "olmoe": {"intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2},
    "gpt_oss": {
        "head_dim": 8,
        "intermediate_size": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 8,
        "attention_bias": True,
        "max_position_embeddings": 131072,  # matches the default YaRN rope_parameters (no warning)
    },
    "deepseek_v2": {**_MLA, "first_k_dense_replace": 1, "n_shared_experts": 1, "topk_method": "greedy"},
    "deepseek_v32": {**_MLA, "n_shared_experts": 1, "index_n_heads": 2,
                     "index_head_dim": 16, "index_topk": 4, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "dots3_note_text": {**_MLA, "n_shared_experts": 1, "shared_experts_intermediate_size": 24, "index_n_heads": 2,
                        "index_head_dim": 16, "index_topk": 4, "mlp_layer_types": ["dense", "sparse", "sparse"],
                        "layer_types": ["indexed_attention", "sliding_attention", "full_attention"], "sliding_window": 8,
                        # the sliding-window blocks' own attention shapes (per_layer_config)
                        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 16,
                        "swa_kv_lora_rank": 16, "swa_head_dim": 16, "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 8},
    "glm4_moe": {**_DEEPSEEK_MOE, "first_k_dense_replace": 1, "n_shared_experts": 1, "head_dim": 8},
    "glm4_moe_lite": {**_MLA, "n_shared_experts": 1, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "dots1": {**_DEEPSEEK_MOE, "first_k_dense_replace": 1, "n_shared_experts": 1, "head_dim": 8},
    "ernie4_5_moe": {"num_hidden_layers": 3, "intermediate_size": 64, "moe_intermediate_size": 24,
                     "moe_num_experts": 6, "moe_k": 2, "moe_num_shared_experts": 1, "moe_layer_start_index": 1,
                     "moe_layer_end_index": 2, "moe_layer_interval": 1, "tie_word_embeddings": False},
    "hunyuan_v1_moe": {"head_dim": 8, "intermediate_size": 24, "num_experts": 6, "moe_topk": 2,
                       "num_shared_expert": 1, "use_qk_norm": True},
    "phimoe": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "minimax_m2": {"head_dim": 8, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "flex_olmo": {"intermediate_size": 32, "num_experts": 6, "num_experts_per_tok": 2},
    "granitemoe": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoeshared": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
                         "shared_intermediate_size": 40},
    "granitemoe_swa": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
                       "shared_intermediate_size": 40, "sliding_window": 8,
                       "layer_types": ["full_attention", "sliding_attention"]},
    "granitemoehybrid": {"num_hidden_layers": 3, "intermediate_size": 48, "num_local_experts": 4,
                         "num_experts_per_tok": 2, "shared_intermediate_size": 40,
                         "layer_types": ["linear_attention", "attention", "linear_attention"], "mamba_n_heads": 8,
                         "mamba_d_head": 8, "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 8},
    "solar_open": {**_DEEPSEEK_MOE, "n_shared_experts": 1, "head_dim": 8},
    "exaone_moe": {**_TYPED_MOE, "num_experts": 6, "num_shared_experts": 1, "head_dim": 8,
                   "layer_types": ["full_attention"] * 3},
    "mimo_v2_flash": {**_TYPED_MOE, "n_routed_experts": 6, "head_dim": 8, "v_head_dim": 8,
                      "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
    "hy_v3": {**_TYPED_MOE, "num_experts": 6, "num_shared_experts": 1, "head_dim": 8},
    "laguna": {**_TYPED_MOE, "num_experts": 6, "shared_expert_intermediate_size": 40, "head_dim": 8,
               "layer_types": ["full_attention"] * 3},
    "mellum": {**_TYPED_MOE, "num_local_experts": 6, "head_dim": 8, "layer_types": ["full_attention"] * 3},
    "kolibri1": {"head_dim": 8, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
                 "num_local_experts": 6, "num_experts_per_tok": 2, "layer_types": ["full_attention"] * 2},
    "cohere2_moe": {**_TYPED_MOE, "head_dim": 8, "num_experts": 6, "num_shared_experts": 1,
                    "mlp_layer_types": ["dense", "sparse", "sparse"], "layer_types": ["full_attention"] * 3},
    "axk1": {**_MLA, "n_shared_experts": 1, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "axk2": {**_MLA, "n_shared_experts": 1, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
             "gated_norm_rank": 4, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "afmoe": {**_TYPED_MOE, "num_experts": 6, "num_shared_experts": 1, "num_dense_layers": 1, "head_dim": 8,
              "layer_types": ["full_attention"] * 3},
    "beam": {**_TYPED_MOE, "num_experts": 6, "head_dim": 8, "n_group": 1, "topk_group": 1,
             "layer_types": ["full_attention"] * 3},
    "aria_text": {"head_dim": 8, "intermediate_size": 24, "moe_num_experts": 6, "moe_topk": 2,
                  "moe_num_shared_experts": 1},
    "flint": {"num_hidden_layers": 3, "head_dim": 8, "intermediate_size": 64, "moe_intermediate_size": 24,
              "shared_expert_intermediate_size": 40, "num_experts": 6, "num_experts_per_tok": 2,
              "mlp_only_layers": [0], "decoder_sparse_step": 1, "layer_types": ["full_attention"] * 3},
    "qwen3_next": {**_GATED_DELTANET, "decoder_sparse_step": 1, "mlp_only_layers": [1],
                   "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    "qwen3_5_moe_text": {**_GATED_DELTANET, "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    "lara_mini": {**_GATED_DELTANET, "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    "kimi_linear": {**_MLA, "num_local_experts": 6, "n_shared_experts": 1, "linear_head_dim": 8, "linear_num_heads": 4,
                    "mlp_layer_types": ["dense", "sparse", "sparse"],
                    "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    "bailing_hybrid": {**_MLA, "num_local_experts": 6, "n_shared_experts": 1, "mlp_layer_types": ["dense", "sparse", "sparse"],
                       "layer_types": ["linear_attention", "full_attention", "linear_attention"]},
    "glm_moe_dsa": {**_MLA, "n_shared_experts": 1, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
                    "mlp_layer_types": ["dense", "sparse", "sparse"],
                    "indexer_types": ["full", "shared", "full"]},  # block 1 reuses block 0's top-k (a Carry)
    "minimax": {"head_dim": 8, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
                "block_size": 8, "layer_types": ["linear_attention", "full_attention"]},
    "lfm2_moe": {"num_hidden_layers": 3, "intermediate_size": 64, "moe_intermediate_size": 24, "num_experts": 6,
                 "num_experts_per_tok": 2, "num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv"]},
    "gemma4_text": {"head_dim": 8, "global_head_dim": 8, "intermediate_size": 48, "moe_intermediate_size": 24,
                    "enable_moe_block": True, "num_experts": 6, "top_k_experts": 2, "hidden_size_per_layer_input": 0,
                    "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
    "dbrx": {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
             "ffn_config": {"hidden_size": 32, "ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}},
    "nemotron_h": {"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
                   "head_dim": 8, "intermediate_size": 48, "moe_intermediate_size": 24,
                   "moe_shared_expert_intermediate_size": 40, "n_routed_experts": 6, "num_experts_per_tok": 2,
                   "mamba_num_heads": 8, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1, "chunk_size": 8},
    "minimax_m3_vl_text": {**_TYPED_MOE, "num_local_experts": 6, "head_dim": 8, "rotary_dim": 4,
                           "dense_intermediate_size": 64, "intermediate_size": 24, "shared_intermediate_size": 40,
                           "index_n_heads": 2, "index_head_dim": 8, "index_block_size": 4, "index_topk_blocks": 2,
                           "layer_types": ["full_attention", "minimax_m3_sparse", "full_attention"]},
    "llama4_text": {"num_hidden_layers": 3, "head_dim": 8, "intermediate_size": 24, "intermediate_size_mlp": 64,
                    "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2},
    "hy_v4": {**_MLA, "n_shared_experts": 1, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4,
              "mlp_layer_types": ["dense", "sparse", "sparse"], "indexer_types": ["full", "shared", "full"],
              "hc_mult": 2, "swiglu_limit": 0.5},  # a low limit: the clamps act on the tiny model's values
    "deepseek_v4": {"num_hidden_layers": 3, "num_key_value_heads": 1, "head_dim": 16, "q_lora_rank": 16,
                    "moe_intermediate_size": 24, "n_routed_experts": 6, "num_experts_per_tok": 2, "hc_mult": 2,
                    "hc_sinkhorn_iters": 3, "o_groups": 2, "o_lora_rank": 8, "index_n_heads": 2, "index_head_dim": 8,
                    "index_topk": 4, "sliding_window": 8, "swiglu_limit": 0.5,
                    "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                    "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                    "mlp_layer_types": ["hash_moe", "moe", "moe"]},
    "qwen4_exp_text": {**_GATED_DELTANET, "num_hidden_layers": 2, "layer_types": ["linear_attention",
                                                                                 "indexed_attention"],
                       "hc_count": 2, "hc_lowrank": 8, "ple_layer_ids": [1], "ple_embed_dim": 32, "ngram_size": 2,
                       "heads_per_ngram": 2, "ngram_vocab_size_base": 61, "make_ngram_vocab_size_divisible_by": 8,
                       "split_ngram_parts": 2, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8,
                       "indexer_budget": 8, "indexer_compress_ratio": 2},
    "zaya": {"num_hidden_layers": 3, "head_dim": 8, "moe_intermediate_size": 24, "num_experts": 4,
             "num_experts_per_tok": 1, "router_hidden_size": 16, "sliding_window": 8,
             "layer_types": ["hybrid", "hybrid_sliding", "hybrid"]},
    "jamba": {"num_hidden_layers": 3, "intermediate_size": 48, "num_experts": 4, "num_experts_per_tok": 2,
              "attn_layer_period": 3, "attn_layer_offset": 2, "expert_layer_period": 2, "expert_layer_offset": 1,
              "mamba_d_state": 8, "mamba_dt_rank": 4, "mamba_expand": 2, "use_mamba_kernels": False},
}


def tiny_config(model_type: str, tied: bool = False, **overrides: Any) -> PretrainedConfig:
    """A tiny transformers config of `model_type` with eager attention and eager experts.

    `tied` ties lm_head to the input embeddings. `overrides` replace any config field, e.g.
    `tiny_config("deepseek_v3", q_lora_rank=None)`.
    """
    if model_type not in _TINY:
        raise UnsupportedModelError(
            f"no tiny config for model_type {model_type!r}; known: {', '.join(sorted(_TINY))}. "
            "Add one to quantmoe/anatomy/tiny.py (see docs/adding-a-family.md)."
        )
    kwargs = {**_COMMON, **_TINY[model_type], "tie_word_embeddings": tied, **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Fill every parameter with random values in place: N(0, std), norm weights N(1, std).

    Transformers initialises biases, routers and some experts to zero or one; random
    values everywhere make exactness tests meaningful (a wrong bias or a swapped
    gate/up shows up in the logits).
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        offset = 1.0 if is_norm(module) else 0.0
        for param in module.parameters(recurse=False):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std + offset
            param.copy_(values.to(param.dtype))
    return model


def tiny_model(model_type: str, seed: int = 0, tied: bool = False, **overrides: Any) -> nn.Module:
    """A tiny fp32 eager model of `model_type` with every parameter random (see `randomize_`);
    `tied`: lm_head is the embedding matrix itself."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"model_type {model_type!r} is not one of {', '.join(sorted(FAMILIES))}")
    config = tiny_config(model_type, tied=tied, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_experts_implementation("eager")
    randomize_(model, seed=seed)
    model.eval()
    logger.debug("built tiny %s with %d parameters", model_type, sum(p.numel() for p in model.parameters()))
    return model


_TOWER_SIZES = {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "projector_input_dim": 32,
                "projector_output_dim": 32, "vision_output_dim": 32, "output_dim": 32, "num_hidden_layers": 1,
                "depth": 1, "num_layers": 1, "num_attention_heads": 2, "num_heads": 2, "num_key_value_heads": 2,
                "head_dim": 16}
# towers whose sizes must agree with each other beyond _TOWER_SIZES (an `adapter_out_dim` is set to the
# text model's hidden size wherever a tower has one)
_TINY_TOWERS = {
    "dots3_note": {"vision_config": {"moe_intermediate_size": 32, "num_local_experts": 2, "per_layer_config": {},
                                     "adapter_in_dim": 32},
                   "audio_config": {"downsample_hidden_size": 8, "adapter_input_size": 32, "conv_output_size": 128}},
}


def tiny_multimodal(model_type: str, seed: int = 0, **text_overrides: Any) -> nn.Module:
    """A tiny fp32 multimodal model of `model_type` (quantmoe/multimodal.py: Llama 4, Qwen3.5-MoE, Gemma 4, dots.note3):
    the tiny text config of its text model (with `text_overrides`), towers of one small layer, every
    parameter random."""
    from transformers import AutoModelForImageTextToText

    from quantmoe.multimodal import MULTIMODAL

    if model_type not in MULTIMODAL:
        raise UnsupportedModelError(f"model_type {model_type!r} is not one of {', '.join(sorted(MULTIMODAL))}")
    text = tiny_config(MULTIMODAL[model_type].text_model_type, **text_overrides)
    sizes = {**_TOWER_SIZES, "adapter_out_dim": text.hidden_size}
    towers = {}
    for name, sub in AutoConfig.for_model(model_type).sub_configs.items():
        if name != "text_config":
            defaults = sub().to_dict()
            towers[name] = {**defaults, **{k: v for k, v in sizes.items() if k in defaults},
                            **_TINY_TOWERS.get(model_type, {}).get(name, {})}
    config = AutoConfig.for_model(model_type, text_config=text.to_dict(), **towers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.set_experts_implementation("eager")
    randomize_(model, seed=seed)
    return model.eval()
