"""The table of MoE families: every supported family's `FamilySpec`, and why the others are refused.

`FAMILIES` maps `config.model_type` to its spec; `REFUSED` maps the MoE model types of the
installed transformers that quantmoe does not handle to the reason, which `family_of`
puts in its error. `docs/families.md` is generated from both (`quantmoe families
--markdown`), and a test fails when the installed transformers has a MoE model type that is
in neither (see `quantmoe.anatomy.catalog`).
"""

from __future__ import annotations

from typing import Any

from quantmoe.anatomy.carry import Carry
from quantmoe.anatomy.specs import DOCS_HINT, ExpertLayout, FamilySpec, Mixer, UnsupportedModelError
from quantmoe.multimodal import MULTIMODAL

_MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_MLA_LORA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")  # always a low-rank query
# MLA with a per-head sigmoid gate on the attention output (`g_proj`, reading the block input)
_MLA_HEAD_GATED = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "g_proj", "o_proj")
_GATED_ATTENTION = ("q_proj", "k_proj", "v_proj", "gate_proj", "o_proj")  # a sigmoid gate on the attention output
_GATED_DELTANET_QKVZ = Mixer("linear_attn", ("in_proj_qkvz", "in_proj_ba", "out_proj"), "linear attention")
_GATED_DELTANET_QKV = Mixer("linear_attn", ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"),
                            "linear attention")
# KDA: linear attention with a low-rank forget gate inside a submodule (dotted linear names)
_KIMI_DELTA_ATTENTION = Mixer("self_attn", ("q_proj", "k_proj", "v_proj", "forget_gate.f_a_proj", "forget_gate.f_b_proj",
                                            "b_proj", "g_a_proj", "g_b_proj", "o_proj"), "linear attention (KDA)")
# Ling 3's KDA: a full-rank forget gate and output gate
_BAILING_DELTA_ATTENTION = Mixer("self_attn", ("q_proj", "k_proj", "v_proj", "forget_gate.f_proj", "b_proj", "g_proj",
                                               "o_proj"), "linear attention (KDA)")
_LIGHTNING = Mixer("self_attn", ("qkv_proj", "output_gate", "out_proj"), "lightning attention")
_SHORT_CONV = Mixer("conv", ("in_proj", "out_proj"), "short convolution")
_MAMBA = Mixer("mamba", ("in_proj", "out_proj"), "Mamba")
_MAMBA2 = Mixer("mamba", ("in_proj", "out_proj"), "Mamba2")
_GATE_UP_FUSED = ("input_linear", "output_linear")  # one linear computes [gate; up]
# the sparse-attention indexer's top-k indices, reused by the next block's "shared" indexer layers
_TOPK_INDICES = (Carry(output=1, argument="prev_topk_indices"),)
_GRANITE_MOE = {"num_experts_key": "num_local_experts", "mlp": "block_sparse_moe", "router": "block_sparse_moe.router",
                "experts": "block_sparse_moe.experts"}

_SPECS: tuple[FamilySpec, ...] = (
    FamilySpec("mixtral", "Mixtral", num_experts_key="num_local_experts"),
    FamilySpec("qwen2_moe", "Qwen2-MoE", num_experts_key="num_experts", moe_layers="sparse_step",
               shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate"),
    FamilySpec("qwen3_moe", "Qwen3-MoE", num_experts_key="num_experts", moe_layers="sparse_step"),
    FamilySpec("deepseek_v3", "DeepSeek-V3", num_experts_key="n_routed_experts", moe_layers="first_k_dense",
               attention_linears=_MLA, shared_expert="mlp.shared_experts"),
    FamilySpec("olmoe", "OLMoE", num_experts_key="num_experts"),
    FamilySpec("minimax_m3_vl_text", "MiniMax-M3 (text)", num_experts_key="num_local_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", mlp_linears=("gate_up_proj", "down_proj"),
               shared_expert="mlp.shared_experts", expert_layout=ExpertLayout(activation="clamped_swiglu")),
    FamilySpec("gpt_oss", "GPT-OSS", num_experts_key="num_local_experts", router="mlp.router",
               expert_layout=ExpertLayout(transposed=True, interleaved=True, has_bias=True,
                                          activation="clamped_swiglu")),
    # --- same layout as the above, other names and layer rules ---
    FamilySpec("deepseek_v2", "DeepSeek-V2", num_experts_key="n_routed_experts", moe_layers="first_k_dense",
               attention_linears=_MLA, shared_expert="mlp.shared_experts"),
    FamilySpec("deepseek_v32", "DeepSeek-V3.2", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", attention_linears=_MLA_LORA, shared_expert="mlp.shared_experts"),
    FamilySpec("glm_moe_dsa", "GLM-5", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", attention_linears=_MLA_LORA, shared_expert="mlp.shared_experts",
               carries=_TOPK_INDICES),
    FamilySpec("dots3_note_text", "dots.note3 (text)", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", attention_linears=_MLA_HEAD_GATED, shared_expert="mlp.shared_experts"),
    FamilySpec("glm4_moe", "GLM-4.5", num_experts_key="n_routed_experts", moe_layers="first_k_dense",
               shared_expert="mlp.shared_experts"),
    FamilySpec("glm4_moe_lite", "GLM-4.7-Flash", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", attention_linears=_MLA, shared_expert="mlp.shared_experts"),
    FamilySpec("dots1", "dots.llm1", num_experts_key="n_routed_experts", moe_layers="first_k_dense",
               shared_expert="mlp.shared_experts"),
    FamilySpec("ernie4_5_moe", "ERNIE-4.5-MoE", num_experts_key="moe_num_experts", top_k_key="moe_k",
               moe_layers="interval", shared_expert="mlp.shared_experts"),
    FamilySpec("hunyuan_v1_moe", "Hunyuan-A13B", num_experts_key="num_experts", top_k_key="moe_topk",
               shared_expert="mlp.shared_mlp"),
    FamilySpec("phimoe", "Phi-3.5-MoE", num_experts_key="num_local_experts", router="mlp.router"),
    FamilySpec("minimax_m2", "MiniMax-M2", num_experts_key="num_local_experts"),
    FamilySpec("flex_olmo", "FlexOlmo", num_experts_key="num_experts"),
    FamilySpec("granitemoe", "Granite-MoE", **_GRANITE_MOE),
    # --- a shared MLP beside the MoE module on the decoder layer, gate and up fused in one linear ---
    FamilySpec("granitemoeshared", "Granite-MoE-Shared", **_GRANITE_MOE, shared_expert="shared_mlp",
               shared_linears=_GATE_UP_FUSED),
    FamilySpec("granitemoe_swa", "Granite-MoE-SWA", **_GRANITE_MOE, shared_expert="shared_mlp",
               shared_linears=_GATE_UP_FUSED),
    FamilySpec("solar_open", "Solar-Open", num_experts_key="n_routed_experts", shared_expert="mlp.shared_experts"),
    FamilySpec("exaone_moe", "EXAONE-MoE", num_experts_key="num_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", shared_expert="mlp.shared_experts"),
    FamilySpec("mimo_v2_flash", "MiMo-V2-Flash", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types"),
    FamilySpec("hy_v3", "Hunyuan-V3", num_experts_key="num_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", shared_expert="mlp.shared_experts"),
    FamilySpec("laguna", "Laguna", num_experts_key="num_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", shared_expert="mlp.shared_experts"),
    FamilySpec("mellum", "Mellum", num_experts_key="num_local_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types"),
    FamilySpec("kolibri1", "Kolibri-1", num_experts_key="num_local_experts", shared_expert="mlp.shared_experts"),
    FamilySpec("cohere2_moe", "Command-MoE", num_experts_key="num_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", shared_expert="mlp.shared_experts"),
    FamilySpec("axk1", "A.X-K1", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", attention_linears=_MLA_LORA, shared_expert="mlp.shared_experts"),
    # MLA whose query and output gate come from one projection of the normed and raw query latent
    FamilySpec("axk2", "A.X-K2", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types",
               attention_linears=("q_a_proj", "q_gate_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
               shared_expert="mlp.shared_experts"),
    FamilySpec("afmoe", "AFMoE", num_experts_key="num_experts", moe_layers="first_k_dense",
               moe_layers_key="num_dense_layers", attention_linears=_GATED_ATTENTION, router="mlp.router",
               shared_expert="mlp.shared_experts"),
    FamilySpec("beam", "Beam", num_experts_key="num_experts", moe_layers="typed", moe_layers_key="mlp_layer_types",
               attention_linears=_GATED_ATTENTION),
    FamilySpec("aria_text", "Aria (text)", num_experts_key="moe_num_experts", top_k_key="moe_topk", router="mlp.router",
               shared_expert="mlp.shared_experts", expert_layout=ExpertLayout(transposed=True)),
    FamilySpec("flint", "Flint", num_experts_key="num_experts", moe_layers="sparse_step",
               shared_expert="mlp.shared_expert"),
    # --- experts on the decoder layer beside a dense MLP that runs in every block, their outputs summed ---
    FamilySpec("gemma4_text", "Gemma 4 (text)", num_experts_key="num_experts", top_k_key="top_k_experts",
               router="router", experts="experts",
               refuse_when=(("num_kv_shared_layers", "its last blocks reuse the keys and values of earlier blocks "
                                                     "(KV sharing), which the block-by-block driver does not carry"),)),
    # --- experts stacked as (E * I, H) matrices run by their own loop; attention and norms in one submodule ---
    FamilySpec("dbrx", "DBRX", num_experts_key="ffn_config.moe_num_experts", top_k_key="ffn_config.moe_top_k",
               layers="transformer.blocks", attention="norm_attn_norm.attn", attention_linears=("Wqkv", "out_proj"),
               mlp="ffn", router="ffn.router", experts="ffn.experts", embedding="transformer.wte",
               expert_layout=ExpertLayout(stacked=("mlp.w1", "mlp.v1", "mlp.w2"))),
    # --- one sublayer per block (`mixer`: Mamba2, attention, a dense MLP or the MoE), experts without a gate ---
    FamilySpec("nemotron_h", "Nemotron-H", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="layers_block_type", attention="mixer", mixers=(Mixer("mixer", ("in_proj", "out_proj"),
                                                                                   "Mamba2"),),
               mlp="mixer", mlp_linears=("up_proj", "down_proj"), router="mixer.gate", experts="mixer.experts",
               shared_expert="mixer.shared_experts", embedding="model.embeddings", sublayers=True,
               expert_layout=ExpertLayout(has_gate=False)),
    # --- experts reading router-scaled inputs (every expert on every token, unchosen ones scaled by 0) ---
    FamilySpec("llama4_text", "Llama 4", num_experts_key="num_local_experts", moe_layers="listed",
               moe_layers_key="moe_layers", mlp="feed_forward", router="feed_forward.router",
               experts="feed_forward.experts", shared_expert="feed_forward.shared_expert",
               expert_layout=ExpertLayout(transposed=True, scaled_input=True)),
    # --- DeepSeek-V3.2-style sparse attention (MLA, a per-head output gate `gate_proj`, a top-k indexer whose
    # indices "shared" layers reuse) and several residual streams mixed by hyper-connections around attention
    # and MLP; the blocks work on all streams at once, which the driver carries as their hidden states ---
    FamilySpec("hy_v4", "Hunyuan-V4", num_experts_key="n_routed_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types",
               attention_linears=("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "gate_proj", "o_proj"),
               shared_expert="mlp.shared_experts", carries=_TOPK_INDICES, residual_streams_key="hc_mult",
               expert_layout=ExpertLayout(activation="clamped_glu")),
    # --- several residual streams mixed by hyper-connections (Sinkhorn-projected); MLA-like attention with one
    # shared KV head (`kv_proj`) and a grouped low-rank output projection: the grouped, block-diagonal `o_a_proj`
    # (DeepseekV4GroupedLinear, its own batched matmul) stays in full precision, `o_b_proj` is quantized; the
    # KV compressors and the sparse-attention indexer stay in full precision; hash-routed layers (the expert
    # picked from the token id) and learned routers reach the experts alike ---
    FamilySpec("deepseek_v4", "DeepSeek-V4", num_experts_key="n_routed_experts",
               attention_linears=("q_a_proj", "q_b_proj", "kv_proj", "o_b_proj"), shared_expert="mlp.shared_experts",
               residual_streams_key="hc_mult", full_precision=("self_attn.o_a_proj",),
               expert_layout=ExpertLayout(activation="clamped_glu")),
    # --- blocks that hand their router's states to the next block's router (a Carry); CCA attention:
    # q/k/v linears under `qkv_proj` (convolutions mix q and k, half of v comes from the token before);
    # a router with its own small MLP and a skip class (its tokens reach expert 0 with weight 0) ---
    FamilySpec("zaya", "ZAYA1", num_experts_key="num_experts",
               attention_linears=("qkv_proj.q_proj", "qkv_proj.k_proj", "qkv_proj.v_proj_current",
                                  "qkv_proj.v_proj_delayed", "o_proj"),
               carries=(Carry(output=1, argument=1),)),
    # --- hybrid token mixers (linear attention, Mamba) ---
    FamilySpec("qwen3_next", "Qwen3-Next", num_experts_key="num_experts", moe_layers="sparse_step",
               mixers=(_GATED_DELTANET_QKVZ,), shared_expert="mlp.shared_expert",
               shared_expert_gate="mlp.shared_expert_gate"),
    FamilySpec("qwen3_5_moe_text", "Qwen3.5-MoE (text)", num_experts_key="num_experts",
               mixers=(_GATED_DELTANET_QKV,), shared_expert="mlp.shared_expert",
               shared_expert_gate="mlp.shared_expert_gate"),
    # Qwen3.5-MoE's blocks on several residual streams (`hc_count`, flattened into the hidden axis) mixed by gated
    # residual connections, with per-layer n-gram embeddings (`ple`, full precision) read from the token ids
    FamilySpec("qwen4_exp_text", "Qwen4-Exp (text)", num_experts_key="num_experts", mixers=(_GATED_DELTANET_QKV,),
               shared_expert="mlp.shared_expert", shared_expert_gate="mlp.shared_expert_gate",
               residual_streams_key="hc_count", full_precision=("ple", "attn_hyper_connection", "mlp_hyper_connection"),
               outside_full_precision=("model.hyper_connection_mixer",)),
    FamilySpec("lara_mini", "Lara-Mini", num_experts_key="num_experts", mixers=(_GATED_DELTANET_QKV,),
               shared_expert="mlp.shared_expert"),
    FamilySpec("kimi_linear", "Kimi-Linear", num_experts_key="num_local_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", attention_linears=_MLA_LORA, mixers=(_KIMI_DELTA_ATTENTION,),
               shared_expert="mlp.shared_experts"),
    FamilySpec("bailing_hybrid", "Ling 3 (Bailing-Hybrid)", num_experts_key="num_local_experts", moe_layers="typed",
               moe_layers_key="mlp_layer_types", attention_linears=_MLA_HEAD_GATED, mixers=(_BAILING_DELTA_ATTENTION,),
               shared_expert="mlp.shared_experts"),
    FamilySpec("minimax", "MiniMax-Text-01", num_experts_key="num_local_experts", mixers=(_LIGHTNING,)),
    FamilySpec("lfm2_moe", "LFM2-MoE", num_experts_key="num_experts", moe_layers="first_k_dense",
               moe_layers_key="num_dense_layers", attention_linears=("q_proj", "k_proj", "v_proj", "out_proj"),
               mixers=(_SHORT_CONV,), mlp="feed_forward", router="feed_forward.gate", experts="feed_forward.experts",
               mlp_linears=("w1", "w3", "w2")),
    FamilySpec("jamba", "Jamba", num_experts_key="num_experts", moe_layers="counted",
               moe_layers_key="layers_num_experts", mlp="feed_forward", router="feed_forward.router",
               experts="feed_forward.experts", mixers=(_MAMBA,)),
    FamilySpec("granitemoehybrid", "Granite-4.0-H", **_GRANITE_MOE, mixers=(_MAMBA2,), shared_expert="shared_mlp",
               shared_linears=_GATE_UP_FUSED),
)

FAMILIES: dict[str, FamilySpec] = {spec.model_type: spec for spec in _SPECS}

# model_type -> why quantmoe does not handle it (shown by family_of and in docs/families.md)
REFUSED: dict[str, str] = {
    "doge": "its DogeCDMoE experts are retrieval-style embedding tables (`down_embed`, `up_embed`) picked by product "
            "keys, not gated MLPs",
    "inkling_text": "its shared experts are stored as 3D tensors (InklingSharedExperts) and its attention runs short "
                    "convolutions (`k_sconv`, `v_sconv`) on the projections",
    "inkling2_text": "its attention projections are custom modules (Inkling2QueryProjection, "
                     "Inkling2GatedOutputProjection), not nn.Linear, and each block attends over earlier blocks' "
                     "outputs (`attention_input`, `mlp_input`)",
    "inkling2_loop_text": "like inkling2_text: custom attention projection modules (not nn.Linear) and block-attention "
                          "residuals over earlier blocks, here with looped (repeated) blocks",
    "jetmoe": "its experts are JetMoeParallelExperts (`input_linear`, `output_linear`) run by its own top-k gating, and "
              "the attention itself is a mixture of attention experts (JetMoeMoA)",
    "longcat_flash": "its router adds zero-computation (identity) experts to the routed ones (`zero_expert_num`), "
                     "for which transformers' `gate_up_proj` holds rows that `down_proj` lacks and nothing reads, "
                     "and each block holds two attention and two dense MLP sublayers (ModuleLists `self_attn`, "
                     "`mlps`) around a shortcut MoE; the per-expert view and the anatomy model neither yet",
}


def family_of(model_or_config: Any) -> FamilySpec:
    """The FamilySpec of a model or config, by `config.model_type`.

    Raises UnsupportedModelError (a ValueError): for a refused MoE family with the reason, for
    any other model type with the list of supported families.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if spec is not None:
        return spec
    if model_type in MULTIMODAL:  # the loaders read its text model; this is a config passed as it is
        raise UnsupportedModelError(f"model_type {model_type!r} is a multimodal config: quantmoe works on its text "
                                    f"model ({MULTIMODAL[model_type].text_model_type}), which its loaders read out of "
                                    "the checkpoint (quantmoe.multimodal.text_config_of gives its config)")
    if model_type in REFUSED:
        raise UnsupportedModelError(f"model_type {model_type!r} is a MoE family quantmoe refuses: {REFUSED[model_type]}")
    supported = ", ".join(f"{s.model_type} ({s.display_name})" for s in FAMILIES.values())
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not a supported MoE family. Supported: {supported}. "
        f"To add one, declare a FamilySpec in FAMILIES in quantmoe/anatomy/families.py ({DOCS_HINT})."
    )
