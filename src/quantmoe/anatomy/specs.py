"""Model families declared as data: where blocks, attention, router and experts live.

One `FamilySpec` per family, in `FAMILIES`, keyed by `config.model_type`. Code that walks a
model (describe, expert view, quantization driver) reads these fields and never branches
on the family name. Module paths are relative: `layers` from the model root, `attention`
and `mlp` from a block, `router`, `experts`, `shared_expert`, `shared_expert_gate` from
the block's mlp.

Layouts follow transformers 5.x (`transformers/integrations/moe.py`): fused experts hold
`gate_up_proj` (E, 2I, H) with rows [gate; up] and `down_proj` (E, H, I); GPT-OSS stores
them transposed, (E, H, 2I) and (E, I, H), with gate/up interleaved along 2I and biases
`gate_up_proj_bias` (E, 2I), `down_proj_bias` (E, H).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ROLES: tuple[str, ...] = (
    "attention",
    "router",
    "routed_expert",
    "shared_expert",
    "shared_expert_gate",
    "dense_mlp",
    "embedding",
    "lm_head",
    "norm",
    "other",
)
QUANTIZABLE_ROLES: tuple[str, ...] = ("attention", "routed_expert", "shared_expert", "dense_mlp")

MoeLayerRule = Literal["all", "sparse_step", "first_k_dense"]
Activation = Literal["glu", "clamped_swiglu"]
_MOE_LAYER_RULES = ("all", "sparse_step", "first_k_dense")
_ACTIVATIONS = ("glu", "clamped_swiglu")

DOCS_HINT = "see docs/adding-a-family.md"


class UnsupportedModelError(ValueError):
    """The model's `config.model_type` has no entry in `FAMILIES`."""


@dataclass(frozen=True)
class ExpertLayout:
    """How a family stores its fused routed experts.

    transposed:  weights are (in, out) per expert instead of nn.Linear's (out, in).
    interleaved: gate/up alternate along the 2I axis (g0, u0, g1, u1, ...) instead of [gate; up].
    has_bias:    `gate_up_proj_bias` and `down_proj_bias` exist.
    activation:  "glu" is act_fn(gate) * up with the experts' own `act_fn`;
                 "clamped_swiglu" is GPT-OSS's (up.clamp(+-limit) + 1) * g * sigmoid(alpha * g),
                 g = gate.clamp(max=limit), reading `alpha` and `limit` from the experts module.
    """

    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False
    activation: Activation = "glu"

    def __post_init__(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"check `activation` in ExpertLayout: {self.activation!r} is not one of {', '.join(_ACTIVATIONS)}"
            )


@dataclass(frozen=True)
class FamilySpec:
    """Where the parts of one MoE family live, and how its experts are stored.

    attention_linears lists every projection the family may have, in execution order;
    a name transformers sets to None for a given config (DeepSeek's q_proj when
    q_lora_rank is set, q_a_proj/q_b_proj when it is None) is skipped.
    moe_layers says which blocks are MoE: "all"; "sparse_step" (Qwen: not in
    `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0); "first_k_dense"
    (DeepSeek: i >= `first_k_dense_replace`).
    """

    model_type: str
    display_name: str
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"
    moe_layers: MoeLayerRule = "all"
    layers: str = "model.layers"
    attention: str = "self_attn"
    attention_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    expert_layout: ExpertLayout = field(default_factory=ExpertLayout)
    embedding: str = "model.embed_tokens"
    lm_head: str = "lm_head"

    def __post_init__(self) -> None:
        if not self.model_type:
            raise ValueError("check `model_type` in FamilySpec: it must be the config's model_type, not empty")
        if self.moe_layers not in _MOE_LAYER_RULES:
            raise ValueError(
                f"check `moe_layers` in FamilySpec {self.model_type!r}: {self.moe_layers!r} "
                f"is not one of {', '.join(_MOE_LAYER_RULES)}"
            )
        if len(self.mlp_linears) != 3:
            raise ValueError(
                f"check `mlp_linears` in FamilySpec {self.model_type!r}: expected the (gate, up, down) names"
            )
        if self.shared_expert_gate is not None and self.shared_expert is None:
            raise ValueError(
                f"check `shared_expert` in FamilySpec {self.model_type!r}: a shared_expert_gate needs a shared_expert"
            )

    def num_experts(self, config: Any) -> int:
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config: Any) -> int:
        return int(getattr(config, self.top_k_key))

    def is_moe_layer(self, config: Any, index: int) -> bool:
        """Whether block `index` is MoE according to the config alone (no weights needed)."""
        if self.num_experts(config) <= 0:
            return False
        if self.moe_layers == "sparse_step":
            mlp_only = getattr(config, "mlp_only_layers", None) or []
            return index not in mlp_only and (index + 1) % config.decoder_sparse_step == 0
        if self.moe_layers == "first_k_dense":
            return index >= config.first_k_dense_replace
        return True


FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in (
        FamilySpec("mixtral", "Mixtral", num_experts_key="num_local_experts"),
        FamilySpec(
            "qwen2_moe",
            "Qwen2-MoE",
            num_experts_key="num_experts",
            moe_layers="sparse_step",
            shared_expert="shared_expert",
            shared_expert_gate="shared_expert_gate",
        ),
        FamilySpec("qwen3_moe", "Qwen3-MoE", num_experts_key="num_experts", moe_layers="sparse_step"),
        FamilySpec(
            "deepseek_v3",
            "DeepSeek-V3",
            num_experts_key="n_routed_experts",
            moe_layers="first_k_dense",
            attention_linears=("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            shared_expert="shared_experts",
        ),
        FamilySpec("olmoe", "OLMoE", num_experts_key="num_experts"),
        FamilySpec(
            "gpt_oss",
            "GPT-OSS",
            num_experts_key="num_local_experts",
            router="router",
            expert_layout=ExpertLayout(
                transposed=True, interleaved=True, has_bias=True, activation="clamped_swiglu"
            ),
        ),
    )
}


def family_of(model_or_config: Any) -> FamilySpec:
    """The FamilySpec of a model or config, by `config.model_type`.

    Raises UnsupportedModelError (a ValueError) naming the supported families.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        supported = ", ".join(f"{s.model_type} ({s.display_name})" for s in FAMILIES.values())
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family. Supported: {supported}. "
            f"To add one, declare a FamilySpec in FAMILIES in quantmoe/anatomy/specs.py ({DOCS_HINT})."
        )
    return spec
