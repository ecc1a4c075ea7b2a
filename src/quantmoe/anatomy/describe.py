"""What a MoE model is made of: blocks, experts, quantizable linears, parameters by role.

`describe(model)` reads module structure and parameter shapes only, so it gives the same
answer for a model with fused experts, the same model in the per-expert view, and a model
built on the `meta` device (no weights). Unit names always use the per-expert view
(`model.layers.3.mlp.experts.5.down_proj`), the names a bit allocation refers to.

Example:
    >>> from quantmoe.anatomy.tiny import tiny_model
    >>> anatomy = describe(tiny_model("mixtral"))
    >>> anatomy.unit("model.layers.1.mlp.experts.3.down_proj").in_features
    48
    >>> sum(anatomy.role_params.values()) == anatomy.total_params
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from quantmoe.anatomy.expert_view import expert_unit_shapes, unit_kinds, unit_shape
from quantmoe.anatomy.families import family_of
from quantmoe.anatomy.specs import QUANTIZABLE_ROLES, ROLES, FamilySpec, has_path, is_norm, module_at
from quantmoe.multimodal import text_config_of
from quantmoe.suggest import did_you_mean

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearUnit:
    """One quantizable linear, named as in the per-expert view."""

    name: str
    role: str
    block: int
    expert: int | None  # routed experts only
    kind: str  # q_proj, gate_proj, down_proj, kv_a_proj_with_mqa, ...
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def numel(self) -> int:
        """Weight elements (bias excluded)."""
        return self.in_features * self.out_features


@dataclass(frozen=True)
class BlockAnatomy:
    """One decoder block. Unit names refer to `ModelAnatomy.units`."""

    index: int
    is_moe: bool
    attention: tuple[str, ...]
    router: str | None
    num_experts: int  # 0 for dense blocks
    top_k: int  # 0 for dense blocks
    experts: tuple[tuple[str, ...], ...]  # per routed expert: (gate_proj, up_proj, down_proj)
    shared: tuple[str, ...]
    shared_gate: str | None
    dense_mlp: tuple[str, ...]
    module_name: str
    experts_module: str | None
    mixer: str = "self_attn"  # the block's token-mixer attribute (self_attn, linear_attn, mamba, ...)


@dataclass(frozen=True)
class ModelAnatomy:
    """The whole model. `role_params` assigns every parameter to exactly one role of ROLES.

    A linear's bias counts in its linear's role; `LinearUnit.numel` counts weights only.
    """

    family: str
    num_blocks: int
    blocks: tuple[BlockAnatomy, ...]
    units: tuple[LinearUnit, ...]
    role_params: dict[str, int]
    total_params: int

    @cached_property
    def _by_name(self) -> dict[str, LinearUnit]:
        return {u.name: u for u in self.units}

    def unit(self, name: str) -> LinearUnit:
        try:
            return self._by_name[name]
        except KeyError:
            hint = did_you_mean(name, self._by_name) or (f"e.g. {self.units[0].name}" if self.units else "")
            raise KeyError(f"no quantizable linear named {name!r} in this {self.family} model; {hint}") from None

    def units_by_role(self, role: str) -> tuple[LinearUnit, ...]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        return tuple(u for u in self.units if u.role == role)

    @property
    def quantizable_params(self) -> int:
        """Parameters of the quantizable roles (attention, routed/shared experts, dense MLP), biases included."""
        return sum(self.role_params[r] for r in QUANTIZABLE_ROLES)


def _units(
    parent: nn.Module, parent_name: str, kinds: tuple[str, ...], role: str, block: int, field: str
) -> list[LinearUnit]:
    """Units for the linears `kinds` of `parent` (a kind may be a dotted path into a submodule:
    Kimi-Linear's `forget_gate.f_a_proj`); a kind that transformers set to None is skipped."""
    units = []
    for kind in kinds:
        if not has_path(parent, kind):
            raise ValueError(f"`{parent_name}` has no `{kind}`; check `{field}` in this family's FamilySpec")
        linear = module_at(parent, kind)
        if linear is None:
            continue
        out_f, in_f, has_bias = unit_shape(linear)
        units.append(LinearUnit(f"{parent_name}.{kind}", role, block, None, kind, in_f, out_f, has_bias))
    return units


def _mixer(block: nn.Module, prefix: str, spec: FamilySpec) -> tuple[str, tuple[str, ...], str]:
    """(attribute, linears, FamilySpec field) of the token mixer `block` holds: the first of
    `attention`, then `mixers`, whose attribute exists and has every declared linear (Kimi-Linear's
    MLA and KDA layers both live in `self_attn`)."""
    candidates = [(spec.attention, spec.attention_linears, "attention_linears")]
    candidates += [(m.attr, m.linears, "mixers") for m in spec.mixers]
    for attr, linears, field in candidates:
        module = module_at(block, attr)
        if module is not None and all(has_path(module, kind) for kind in linears):
            return attr, linears, field
    if spec.sublayers:  # this block's one sublayer is not a token mixer
        return "", (), ""
    for attr, linears, field in candidates:  # present, but a declared linear is missing: name it
        module = module_at(block, attr)
        if module is not None:
            missing = next(kind for kind in linears if not has_path(module, kind))
            raise ValueError(f"`{prefix}.{attr}` has no `{missing}`; check `{field}` in the {spec.model_type} FamilySpec")
    names = ", ".join([spec.attention, *(m.attr for m in spec.mixers)])
    raise ValueError(f"`{prefix}` has none of {names}; check `attention` and `mixers` in the {spec.model_type} FamilySpec")


def _path(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix


def _describe_block(model: nn.Module, spec: FamilySpec, index: int) -> tuple[BlockAnatomy, list[LinearUnit]]:
    config = model.config
    prefix = f"{spec.layers}.{index}"
    block = model.get_submodule(prefix)
    mixer, mixer_linears, mixer_field = _mixer(block, prefix, spec)
    attn_name, mlp_name = f"{prefix}.{mixer}", _path(prefix, spec.mlp)
    attention = _units(module_at(block, mixer), attn_name, mixer_linears, "attention", index, mixer_field) if mixer else []
    experts = module_at(block, spec.experts)
    is_moe = experts is not None
    if is_moe != spec.is_moe_layer(config, index):
        raise ValueError(
            f"block {index} is {'MoE' if is_moe else 'dense'} in the model but not by the config; "
            f"check `moe_layers` ({spec.moe_layers!r}) and `experts` in the {spec.model_type} FamilySpec"
        )
    dense: list[LinearUnit] = []
    mlp = module_at(block, spec.mlp)
    # with sublayers, the block's one sublayer is a dense MLP only when it has the MLP's linears
    has_mlp = not spec.sublayers or (not is_moe and all(has_path(mlp, kind) for kind in spec.mlp_linears))
    if has_mlp and (not is_moe or spec.dense_beside_experts):
        if mlp is None:
            raise ValueError(f"`{prefix}` has no `{spec.mlp}`; check `mlp` in the {spec.model_type} FamilySpec")
        dense = _units(mlp, mlp_name, spec.mlp_linears, "dense_mlp", index, "mlp_linears")
    if not is_moe:
        anatomy = BlockAnatomy(
            index=index,
            is_moe=False,
            attention=tuple(u.name for u in attention),
            router=None,
            num_experts=0,
            top_k=0,
            experts=(),
            shared=(),
            shared_gate=None,
            dense_mlp=tuple(u.name for u in dense),
            module_name=prefix,
            experts_module=None,
            mixer=mixer,
        )
        return anatomy, attention + dense

    experts_name = f"{prefix}.{spec.experts}"
    if module_at(block, spec.router) is None:
        raise ValueError(f"`{prefix}` has no `{spec.router}`; check `router` in the {spec.model_type} FamilySpec")
    shapes = expert_unit_shapes(experts, spec.expert_layout, experts_name)
    if len(shapes) != spec.num_experts(config):
        raise ValueError(
            f"`{experts_name}` holds {len(shapes)} experts but config.{spec.num_experts_key} is "
            f"{spec.num_experts(config)}; check `num_experts_key` in the {spec.model_type} FamilySpec"
        )
    routed: list[list[LinearUnit]] = []
    for e, expert_shapes in enumerate(shapes):
        routed.append([
            LinearUnit(f"{experts_name}.{e}.{kind}", "routed_expert", index, e, kind, in_f, out_f, bias)
            for kind, (out_f, in_f, bias) in zip(unit_kinds(spec.expert_layout), expert_shapes, strict=True)
        ])  # fmt: skip
    shared: list[LinearUnit] = []
    shared_gate = None
    shared_mod = None
    if spec.shared_expert is not None:
        parent_path, _, attr = spec.shared_expert.rpartition(".")
        parent = module_at(block, parent_path)
        if parent is None or not hasattr(parent, attr):
            raise ValueError(f"`{prefix}` has no `{spec.shared_expert}`; check `shared_expert` in the FamilySpec")
        shared_mod = getattr(parent, attr)
    if shared_mod is not None:  # None: this config has no shared expert (Command-MoE with num_shared_experts=0)
        shared_name = f"{prefix}.{spec.shared_expert}"
        shared = _units(shared_mod, shared_name, spec.shared_expert_linears, "shared_expert", index, "shared_linears")
    if spec.shared_expert_gate is not None and shared_mod is not None:
        if module_at(block, spec.shared_expert_gate) is None:
            raise ValueError(
                f"`{prefix}` has no `{spec.shared_expert_gate}`; check `shared_expert_gate` in the FamilySpec"
            )
        shared_gate = f"{prefix}.{spec.shared_expert_gate}"
    # Sequential order: attention; every linear reading an MLP input (routed gate/up, shared and
    # dense MLP: the same or another normed input); every output projection (down).
    units = attention + [u for ex in routed for u in ex[:-1]] + shared[:-1] + dense[:-1]
    units += [ex[-1] for ex in routed] + shared[-1:] + dense[-1:]
    anatomy = BlockAnatomy(
        index=index,
        is_moe=True,
        attention=tuple(u.name for u in attention),
        router=f"{prefix}.{spec.router}",
        num_experts=len(routed),
        top_k=spec.top_k(config),
        experts=tuple(tuple(u.name for u in ex) for ex in routed),
        shared=tuple(u.name for u in shared),
        shared_gate=shared_gate,
        dense_mlp=tuple(u.name for u in dense),
        module_name=prefix,
        experts_module=experts_name,
        mixer=mixer,
    )
    return anatomy, units


def _role_prefixes(spec: FamilySpec, blocks: tuple[BlockAnatomy, ...]) -> dict[str, str]:
    """Module name -> role; a parameter takes the role of its nearest listed ancestor module."""
    prefixes = {spec.embedding: "embedding", spec.lm_head: "lm_head"}
    for b in blocks:
        prefixes.update(dict.fromkeys(b.attention, "attention"))
        if b.dense_mlp:
            prefixes[_path(b.module_name, spec.mlp)] = "dense_mlp"
        if b.is_moe:
            prefixes[b.router] = "router"
            prefixes[b.experts_module] = "routed_expert"
            if b.shared:
                prefixes[f"{b.module_name}.{spec.shared_expert}"] = "shared_expert"
            if b.shared_gate:
                prefixes[b.shared_gate] = "shared_expert_gate"
    return prefixes


def _inside_norm(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether module `name` is a norm or inside one (a gated norm's own small MLP)."""
    while True:
        if is_norm(modules[name]):
            return True
        if not name:
            return False
        name = name.rpartition(".")[0]


def _role_params(model: nn.Module, spec: FamilySpec, blocks: tuple[BlockAnatomy, ...]) -> dict[str, int]:
    prefixes = _role_prefixes(spec, blocks)
    modules = dict(model.named_modules())
    counts = dict.fromkeys(ROLES, 0)
    for pname, param in model.named_parameters():
        owner = name = pname.rpartition(".")[0]
        while name and name not in prefixes:
            name = name.rpartition(".")[0]
        if name:
            role = prefixes[name]
        else:  # not under a listed module: norms (RMSNorm, q_a_layernorm, the low-rank gate inside
            # A.X-K2's AXK2GatedRMSNorm, ...) or other (GPT-OSS sinks)
            role = "norm" if _inside_norm(owner, modules) else "other"
        counts[role] += param.numel()
    return counts


def _check_full_precision(model: nn.Module, spec: FamilySpec, num_blocks: int) -> None:
    """Every declared full-precision path exists (set to None counts: a block without per-layer embeddings)."""
    for index in range(num_blocks):
        block = model.get_submodule(f"{spec.layers}.{index}")
        for path in spec.full_precision:
            if not has_path(block, path):
                raise ValueError(f"`{spec.layers}.{index}` has no `{path}`; check `full_precision` in the "
                                 f"{spec.model_type} FamilySpec")
    for path in spec.outside_full_precision:
        if not has_path(model, path):
            raise ValueError(f"the model has no `{path}`; check `outside_full_precision` in the {spec.model_type} "
                             "FamilySpec")


def describe(model: nn.Module) -> ModelAnatomy:
    """The anatomy of a supported MoE model (fused, unfused or on `meta`); shapes only."""
    spec = family_of(model)
    num_blocks = len(model.get_submodule(spec.layers))
    _check_full_precision(model, spec, num_blocks)
    described = [_describe_block(model, spec, i) for i in range(num_blocks)]
    blocks = tuple(b for b, _ in described)
    units = tuple(u for _, block_units in described for u in block_units)
    role_params = _role_params(model, spec, blocks)
    total = sum(p.numel() for p in model.parameters())
    if sum(role_params.values()) != total:  # both walk the same de-duplicated parameters
        raise RuntimeError(f"role totals {sum(role_params.values())} != {total} parameters; this is a bug")
    logger.debug("described %s: %d blocks, %d quantizable units", spec.model_type, num_blocks, len(units))
    return ModelAnatomy(spec.model_type, num_blocks, blocks, units, role_params, total)


def describe_config(config: Any, trust_remote_code: bool = False) -> ModelAnatomy:
    """Describe the model a config defines, built on the `meta` device (no memory for weights)."""
    from transformers import AutoModelForCausalLM

    config = text_config_of(config)  # a multimodal config: its text model (quantmoe/multimodal.py)
    family_of(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return describe(model)


def inspect_model(model_id_or_path: str, trust_remote_code: bool = False) -> ModelAnatomy:
    """Describe a checkpoint from its config alone: no weights are downloaded or loaded.

    Works offline for a local directory; a hub id needs the hub (or its cache).
    """
    from quantmoe.models import source_config

    config = source_config(model_id_or_path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):  # a GPTQ folder: its structure is the model's
        del config.quantization_config
    return describe_config(config, trust_remote_code=trust_remote_code)
