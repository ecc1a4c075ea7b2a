"""Model families declared as data: where blocks, attention, router and experts live.

One `FamilySpec` per family, in `families.FAMILIES`, keyed by `config.model_type`. Code that walks a
model (describe, expert view, quantization driver) reads these fields and never branches
on the family name. Module paths are relative: `layers` from the model root, every other
part (`attention`, `mlp`, `router`, `experts`, `shared_expert`, `shared_expert_gate`) from a
block, as a dotted path: `mlp.experts` inside the block's MLP, `shared_mlp` on the decoder
layer itself (Granite-MoE-Shared), `experts` beside a dense `mlp` (Gemma 4).

Layouts follow transformers 5.x (`transformers/integrations/moe.py`): fused experts hold
`gate_up_proj` (E, 2I, H) with rows [gate; up] and `down_proj` (E, H, I); GPT-OSS stores
them transposed, (E, H, 2I) and (E, I, H), with gate/up interleaved along 2I and biases
`gate_up_proj_bias` (E, 2I), `down_proj_bias` (E, H).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from quantmoe.anatomy.carry import Carry

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

MoeLayerRule = Literal["all", "sparse_step", "first_k_dense", "interval", "listed", "typed", "counted"]
Activation = Literal["glu", "clamped_swiglu", "clamped_glu"]
_MOE_LAYER_RULES = ("all", "sparse_step", "first_k_dense", "interval", "listed", "typed", "counted")
_KEYED_RULES = ("listed", "typed", "counted")  # these read the config list named by `moe_layers_key`
_ACTIVATIONS = ("glu", "clamped_swiglu", "clamped_glu")

DOCS_HINT = "see docs/adding-a-family.md"


def module_at(block: Any, path: str) -> Any:
    """The module at the dotted `path` from `block` ("" is the block itself), or None where a step
    is missing or None (a config without a shared expert, a dense block without experts)."""
    module = block
    for step in filter(None, path.split(".")):
        module = getattr(module, step, None)
        if module is None:
            return None
    return module


def has_path(block: Any, path: str) -> bool:
    """Whether every step of the dotted `path` exists as an attribute from `block` (a last step set
    to None counts: transformers sets a linear a config does not use to None)."""
    module = block
    for step in filter(None, path.split(".")):
        if module is None or not hasattr(module, step):
            return False
        module = getattr(module, step)
    return True


def is_norm(module: Any) -> bool:
    """Whether a module is a norm, by its class name (RMSNorm, LayerNorm, AXK2GatedRMSNorm, ...)."""
    return "norm" in type(module).__name__.lower()


class UnsupportedModelError(ValueError):
    """The model's `config.model_type` has no entry in `FAMILIES`."""


@dataclass(frozen=True)
class ExpertLayout:
    """How a family stores its fused routed experts.

    transposed:  weights are (in, out) per expert instead of nn.Linear's (out, in).
    interleaved: gate/up alternate along the 2I axis (g0, u0, g1, u1, ...) instead of [gate; up].
    has_bias:    `gate_up_proj_bias` and `down_proj_bias` exist.
    has_gate:    False for experts without a gate (Nemotron-H, `has_gate=False`): `up_proj` (E, I, H)
                 and `down_proj` (E, H, I), each expert down(act_fn(up(x))).
    stacked:     instead of gate_up_proj/down_proj, three parameters of the experts module (dotted
                 names) hold gate, up and down, each (E * I, H) with the experts stacked along rows:
                 DBRX's `mlp.w1`, `mlp.v1`, `mlp.w2`; down's (I, H) is nn.Linear's weight transposed.
    activation:  "glu" is act_fn(gate) * up with the experts' own `act_fn` (`activation_fn`);
                 "clamped_swiglu" is GPT-OSS's (up.clamp(+-limit) + 1) * g * sigmoid(alpha * g),
                 g = gate.clamp(max=limit), reading `alpha` and `limit` (MiniMax-M3: `swiglu_alpha`,
                 `swiglu_limit`) from the experts module; "clamped_glu" is
                 act(gate.clamp(max=limit)) * up.clamp(+-limit) with the experts' `act_fn` (SiLU where they
                 have none), reading `swiglu_limit` or `limit` (Hunyuan-V4, DeepSeek-V4).
    scaled_input: the router weight multiplies the expert's input, not its output (Llama 4). Such
                 experts are called with every token for every expert, scaled by a router score that
                 is 0 where the expert is not chosen, and the router returns (scores (T, E), logits).
                 Without biases an expert maps 0 to 0, so the per-expert view's top-k dispatch (each
                 expert on its routed tokens times their weight) is the same function; the view also
                 makes the MoE module call the experts as a top-k dispatch (expert_view.py).
    """

    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False
    activation: Activation = "glu"
    stacked: tuple[str, str, str] | None = None
    has_gate: bool = True
    scaled_input: bool = False

    def __post_init__(self) -> None:
        if self.scaled_input and (self.has_bias or not self.has_gate or self.stacked is not None or self.activation != "glu"):
            raise ValueError("check `scaled_input` in ExpertLayout: experts reading router-scaled inputs must map 0 "
                             "to 0 (no biases, act_fn(gate) * up) and hold gate_up_proj/down_proj")
        if not self.has_gate and (self.interleaved or self.has_bias or self.stacked is not None
                                  or self.activation != "glu"):
            raise ValueError("check `has_gate` in ExpertLayout: experts without a gate have no interleaved, biased, "
                             "stacked or clamped layout")
        if self.stacked is not None and (len(self.stacked) != 3 or self.transposed or self.interleaved
                                         or self.has_bias or self.activation != "glu"):
            raise ValueError("check `stacked` in ExpertLayout: it names the (gate, up, down) parameters of a "
                             "layout without transpose, interleave, biases or a clamped activation")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"check `activation` in ExpertLayout: {self.activation!r} is not one of {', '.join(_ACTIVATIONS)}"
            )


@dataclass(frozen=True)
class Mixer:
    """A token mixer that some blocks hold instead of the softmax attention (hybrid models).

    attr:    the block's attribute (`linear_attn`, `mamba`).
    linears: its quantizable projections in execution order. Projections that are not listed
             (Mamba's small `x_proj` / `dt_proj`, convolutions, decay parameters) stay in full
             precision under the role "other".
    label:   what it is, for reports ("linear attention", "Mamba").

    Its linears take the role "attention" (the block's token mixer), so every policy that
    covers attention covers them.
    """

    attr: str
    linears: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class FamilySpec:
    """Where the parts of one MoE family live, and how its experts are stored.

    attention_linears lists every projection the family may have, in execution order;
    a name transformers sets to None for a given config (DeepSeek's q_proj when
    q_lora_rank is set, q_a_proj/q_b_proj when it is None) is skipped.
    mixers lists the other token mixers a block may hold instead of `attention` (Qwen3-Next's
    `linear_attn`, Jamba's `mamba`); each block must hold exactly one of them.
    mlp, router, experts, shared_expert and shared_expert_gate are dotted paths from the block.
    A block is MoE when `experts` resolves to a module. In a MoE block the `mlp` holds the
    experts (`mlp.experts`) and is not a dense MLP; when the experts sit elsewhere (Gemma 4's
    `experts` on the decoder layer), the `mlp` runs beside them in every block (`dense_beside_experts`).
    The shared expert may sit inside the MoE module (`mlp.shared_experts`) or beside it on the
    block (Granite's `shared_mlp`).
    sublayers: each block holds one sublayer, all at the same attribute (Nemotron-H's `mixer`): a
    token mixer, a dense MLP or the MoE; a block then may have no token mixer, and no MLP (the
    `mlp` path then holds another sublayer, without the `mlp_linears`).
    mlp_linears and shared_linears name the MLP's linears in execution order: those reading the
    MLP input, then the output projection (last). Three for gate/up/down; two when gate and up
    are fused into one linear (Granite's `input_linear`, `output_linear`).
    view_refusal, when set, says why the family's experts have no per-expert view: `describe`,
    `quantmoe inspect` and `quantmoe plan` work from shapes, quantization is refused with it.
    moe_layers says which blocks are MoE: "all"; "sparse_step" (Qwen: not in
    `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0); "first_k_dense"
    (DeepSeek: i >= `first_k_dense_replace`, or the count `moe_layers_key` names); "interval" (ERNIE: (i + 1) % `moe_layer_interval`
    == 0 and `moe_layer_start_index` <= i <= `moe_layer_end_index`); and three rules reading the
    config list named by `moe_layers_key`: "listed" (i is in it: Llama 4's `moe_layers`),
    "typed" (its i-th entry is "sparse" or "moe": GLM-4.7-Flash's `mlp_layer_types`, Nemotron-H's
    `layers_block_type`), "counted" (its
    i-th entry, a number of experts, is > 1: Jamba's `layers_num_experts`).
    carries lists the tensors a block hands to the next beside its hidden states (GLM-5's top-k
    indices, ZAYA's router states; see quantmoe/anatomy/carry.py).
    full_precision names the block's other modules with linears that stay in full precision (role
    "other"): paths from the block (Qwen4-Exp's gated residual connections and per-layer embeddings,
    DeepSeek-V4's grouped `self_attn.o_a_proj`); outside_full_precision, paths from the model root
    (Qwen4-Exp's final stream mixer). Token-mixer internals that are not listed linears (Mamba's
    `x_proj`, sparse-attention indexers) need no entry.
    residual_streams_key names the config's number of residual streams when the hidden states
    between blocks are several streams of the hidden size (Hunyuan-V4's hyper-connections,
    `hc_mult`: (batch, tokens, streams, hidden)); the memory estimate counts them.
    """

    model_type: str
    display_name: str
    num_experts_key: str
    top_k_key: str = "num_experts_per_tok"
    moe_layers: MoeLayerRule = "all"
    moe_layers_key: str | None = None
    layers: str = "model.layers"
    attention: str = "self_attn"
    attention_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mixers: tuple[Mixer, ...] = ()
    mlp: str = "mlp"
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    shared_linears: tuple[str, ...] | None = None  # None: the same as mlp_linears
    sublayers: bool = False
    expert_layout: ExpertLayout = field(default_factory=ExpertLayout)
    embedding: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    view_refusal: str | None = None  # why there is no per-expert view (so no quantization); shapes still describe
    # (config key, why): configs that set the key (truthy) are described but not quantized
    refuse_when: tuple[tuple[str, str], ...] = ()
    carries: tuple[Carry, ...] = ()
    residual_streams_key: str | None = None
    full_precision: tuple[str, ...] = ()
    outside_full_precision: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.model_type:
            raise ValueError("check `model_type` in FamilySpec: it must be the config's model_type, not empty")
        if self.moe_layers not in _MOE_LAYER_RULES:
            raise ValueError(
                f"check `moe_layers` in FamilySpec {self.model_type!r}: {self.moe_layers!r} "
                f"is not one of {', '.join(_MOE_LAYER_RULES)}"
            )
        keyed = self.moe_layers in _KEYED_RULES
        if (keyed and self.moe_layers_key is None) or (
            not keyed and self.moe_layers != "first_k_dense" and self.moe_layers_key is not None
        ):
            raise ValueError(
                f"check `moe_layers_key` in FamilySpec {self.model_type!r}: the rules {', '.join(_KEYED_RULES)} "
                "need the name of the config list they read, first_k_dense may name its count, the others take none"
            )
        for name in ("mlp_linears", "shared_linears"):
            linears = getattr(self, name)
            if linears is not None and len(linears) not in (2, 3):
                raise ValueError(
                    f"check `{name}` in FamilySpec {self.model_type!r}: expected the (gate, up, down) names, "
                    "or (gate_up, down) for a fused gate and up"
                )
        if self.shared_expert_gate is not None and self.shared_expert is None:
            raise ValueError(
                f"check `shared_expert` in FamilySpec {self.model_type!r}: a shared_expert_gate needs a shared_expert"
            )

    @property
    def shared_expert_linears(self) -> tuple[str, ...]:
        return self.shared_linears if self.shared_linears is not None else self.mlp_linears

    @property
    def moe_module(self) -> str:
        """The path of the module holding the experts ("" for the block itself)."""
        return self.experts.rpartition(".")[0]

    @property
    def dense_beside_experts(self) -> bool:
        """Whether the dense `mlp` runs beside the experts in MoE blocks (it does not hold them)."""
        return self.moe_module != self.mlp

    def config_refusal(self, config: Any) -> str | None:
        """Why this config of the family cannot be quantized (a `refuse_when` key it sets), or None."""
        for key, why in self.refuse_when:
            value = module_at(config, key)
            if value:
                return f"{why} (config.{key} = {value!r})"
        return None

    def residual_streams(self, config: Any) -> int:
        """How many hidden-size streams the hidden states between blocks hold (1 but with hyper-connections)."""
        return int(getattr(config, self.residual_streams_key)) if self.residual_streams_key else 1

    def num_experts(self, config: Any) -> int:
        # a dotted key reads a nested config (DBRX's ffn_config.moe_num_experts); None: a dense config (Gemma 4)
        return int(module_at(config, self.num_experts_key) or 0)

    def top_k(self, config: Any) -> int:
        return int(module_at(config, self.top_k_key))

    def is_moe_layer(self, config: Any, index: int) -> bool:
        """Whether block `index` is MoE according to the config alone (no weights needed)."""
        if self.num_experts(config) <= 0:
            return False
        if self.moe_layers == "sparse_step":
            mlp_only = getattr(config, "mlp_only_layers", None) or []
            return index not in mlp_only and (index + 1) % config.decoder_sparse_step == 0
        if self.moe_layers == "first_k_dense":
            return index >= getattr(config, self.moe_layers_key or "first_k_dense_replace")
        if self.moe_layers == "interval":
            start, end = config.moe_layer_start_index, config.moe_layer_end_index
            end = config.num_hidden_layers - 1 if end is None or end < 0 else end
            return (index + 1) % config.moe_layer_interval == 0 and start <= index <= end
        if self.moe_layers in _KEYED_RULES:
            values = getattr(config, self.moe_layers_key)
            if self.moe_layers == "listed":
                return index in values
            if self.moe_layers == "typed":
                return values[index] in ("sparse", "moe")
            return values[index] > 1
        return True
