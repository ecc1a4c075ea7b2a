"""A reversible per-expert view of fused MoE experts.

Transformers 5.x stores the routed experts of a block as 3D parameters (`gate_up_proj`,
`down_proj`, see specs.py for the layouts). Quantizing one expert's linear, hooking the
tokens routed to one expert, or swapping one linear for a quantized module needs each
expert as its own `nn.Linear`s. `unfuse_experts` replaces every fused experts module by an
`UnfusedExperts` whose children are `<experts>.<e>.gate_proj / up_proj / down_proj`;
`fuse_experts` packs the (possibly modified) weights back into the original module.

One generic class serves every family: the family's `ExpertLayout` (transposed,
interleaved, bias, activation) says how to cut and re-pack the fused tensors.

Example:
    >>> from quantmoe.anatomy.tiny import tiny_model
    >>> model = tiny_model("gpt_oss")
    >>> with per_expert_view(model):
    ...     tuple(model.get_submodule("model.layers.0.mlp.experts.1.gate_proj").weight.shape)  # (I, H)
    (32, 32)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

from quantmoe.anatomy.families import family_of
from quantmoe.anatomy.specs import ExpertLayout, FamilySpec, UnsupportedModelError, module_at

logger = logging.getLogger(__name__)

GATE_UP, DOWN, GATE_UP_BIAS, DOWN_BIAS = "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"
UNIT_KINDS: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
EXPERT_INPUT_KINDS: tuple[str, str] = UNIT_KINDS[:2]  # read the expert's input itself (ExpertMLP.forward)
EXPERT_HIDDEN_KIND: str = UNIT_KINDS[2]  # reads ExpertMLP.hidden of the expert's input
UP = "up_proj"  # the fused up projection of experts without a gate (ExpertLayout.has_gate False)


def unit_kinds(layout: ExpertLayout) -> tuple[str, ...]:
    """The linears of one expert in the per-expert view: gate/up/down, or up/down without a gate."""
    return UNIT_KINDS if layout.has_gate else UNIT_KINDS[1:]


# --- activations (pure) -------------------------------------------------------------------


def _glu(act_fn: Callable[[Tensor], Tensor], gate: Tensor, up: Tensor) -> Tensor:
    hidden = act_fn(gate)
    if torch.is_grad_enabled() or hidden is gate or hidden.dtype != up.dtype:  # autograd, identity, promotion
        return hidden * up
    return hidden.mul_(up)  # the same product, in the activation's own fresh buffer (no new allocation)


def _ungated(act_fn: Callable[[Tensor], Tensor], gate: None, up: Tensor) -> Tensor:
    return act_fn(up)


def _clamped_swiglu(alpha: float, limit: float, gate: Tensor, up: Tensor) -> Tensor:
    # GptOssExperts._apply_gate after de-interleaving
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _clamped_glu(act_fn: Callable[[Tensor], Tensor], limit: float, gate: Tensor, up: Tensor) -> Tensor:
    # HYV4Experts / DeepseekV4Experts._apply_gate: act of the clamped gate times the clamped up (no alpha, no + 1)
    return act_fn(gate.clamp(min=None, max=limit)) * up.clamp(min=-limit, max=limit)


def _activation(fused: nn.Module, layout: ExpertLayout) -> Callable[[Tensor, Tensor], Tensor]:
    if layout.activation == "clamped_glu":  # Hunyuan-V4: swiglu_limit, SiLU; DeepSeek-V4: limit, act_fn
        limit = getattr(fused, "swiglu_limit", None)
        limit = fused.limit if limit is None else limit
        return partial(_clamped_glu, getattr(fused, "act_fn", torch.nn.functional.silu), float(limit))
    if layout.activation == "clamped_swiglu":  # GPT-OSS: alpha, limit; MiniMax-M3: swiglu_alpha, swiglu_limit
        alpha, limit = (getattr(fused, name, None) or getattr(fused, f"swiglu_{name}") for name in ("alpha", "limit"))
        return partial(_clamped_swiglu, float(alpha), float(limit))
    owner = fused if layout.stacked is None else module_at(fused, layout.stacked[0].rpartition(".")[0])
    act_fn = getattr(owner, "act_fn", None) or owner.activation_fn  # DBRX's DbrxExpertGLU: activation_fn
    return partial(_glu if layout.has_gate else _ungated, act_fn)


# --- layout (pure) ------------------------------------------------------------------------


def _as_linear(w: Tensor, layout: ExpertLayout) -> Tensor:
    """One expert's stored matrix -> nn.Linear's (out, in); the inverse is the same transpose."""
    return w.transpose(-2, -1) if layout.transposed else w


def _split(t: Tensor, layout: ExpertLayout) -> tuple[Tensor, Tensor]:
    """(2I, ...) -> gate (I, ...), up (I, ...)."""
    if layout.interleaved:
        return t[0::2], t[1::2]
    gate, up = t.chunk(2, dim=0)
    return gate, up


def _join(gate: Tensor, up: Tensor, layout: ExpertLayout) -> Tensor:
    """gate (I, ...), up (I, ...) -> (2I, ...); inverse of `_split`."""
    if layout.interleaved:
        return torch.stack((gate, up), dim=1).flatten(0, 1)
    return torch.cat((gate, up), dim=0)


def _linear(weight: Tensor, bias: Tensor | None, requires_grad: bool) -> nn.Linear:
    out_features, in_features = weight.shape  # (out, in)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.clone(memory_format=torch.contiguous_format), requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone(memory_format=torch.contiguous_format), requires_grad=requires_grad)
    return linear


# --- modules ------------------------------------------------------------------------------


class ExpertMLP(nn.Module):
    """One routed expert as three nn.Linear: down(activation(gate(x), up(x))); without a gate
    (`gate_proj` None) two: down(activation(None, up(x)))."""

    def __init__(
        self,
        gate_proj: nn.Module | None,
        up_proj: nn.Module,
        down_proj: nn.Module,
        activation: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.activation = activation  # plain callable, not a submodule

    def hidden(self, x: Tensor) -> Tensor:  # (tokens, H) -> (tokens, I): what down_proj reads
        gate = self.gate_proj(x) if self.gate_proj is not None else None
        return self.activation(gate, self.up_proj(x))

    def forward(self, x: Tensor) -> Tensor:  # (tokens, H) -> (tokens, H)
        return self.down_proj(self.hidden(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement of a fused experts module: same forward arguments, same output.

    Children are `ExpertMLP`s named "0".."E-1". Only experts that receive tokens run, each on
    exactly its tokens, so a hook on `<experts>.5.down_proj` sees what expert 5 computes.
    The original module is kept (outside the module tree, its parameters on `meta`) so
    `fuse_experts` can restore it with the weights packed back.
    """

    def __init__(self, experts: list[ExpertMLP], layout: ExpertLayout, fused: nn.Module) -> None:
        super().__init__(experts)
        self.num_experts = len(experts)
        self.layout = layout
        self._fused = (fused,)  # a tuple keeps it out of parameters(), state_dict() and .to()

    def routes(self, top_k_index: Tensor, top_k_weights: Tensor | None = None) -> list[tuple[int, Tensor, Tensor]]:
        """(expert, token_idx, top_k_pos) for every expert that receives tokens, in expert order.

        ``top_k_index`` (T, k). An expert's rows are ordered by (top-k position, token): the
        order transformers' eager loop gives them. One stable sort of the (k, T) flattened
        indices groups all experts at once; index ``num_experts`` (transformers'
        expert-parallel sentinel) is skipped, and so is a choice whose weight in
        ``top_k_weights`` is exactly 0: it adds nothing to the output (ZAYA's router sends the
        tokens of its skip class to expert 0 with weight 0), so it is no token of that expert.
        """
        num_tokens = top_k_index.shape[0]
        flat = top_k_index.T.reshape(-1)  # (k * T,) position-major
        if top_k_weights is not None:
            flat = flat.masked_fill(top_k_weights.T.reshape(-1) == 0, self.num_experts)
        order = torch.argsort(flat, stable=True)  # (k * T,) grouped by expert, flat order inside a group
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        routes, start = [], 0
        for e, count in enumerate(counts):
            if count:
                rows = order[start:start + count]
                routes.append((e, rows % num_tokens, rows // num_tokens))
            start += count
        return routes

    def expert_input(self, hidden_states: Tensor, token_idx: Tensor, top_k_pos: Tensor, top_k_weights: Tensor) -> Tensor:
        """The rows one expert reads: its tokens, times their router weight where the layout scales
        the input (`ExpertLayout.scaled_input`, Llama 4). hidden_states (T, H) -> (tokens, H)."""
        x = hidden_states.index_select(0, token_idx)  # the rows of x[token_idx], several times faster on CPU
        if self.layout.scaled_input:
            x = x * top_k_weights[token_idx, top_k_pos, None].to(x.dtype)
        return x

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        # hidden_states (T, H) (or (B, S, H), DBRX: the output keeps the shape); top_k_index, top_k_weights (T, k)
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        final = torch.zeros_like(hidden_states)
        for e, token_idx, top_k_pos in self.routes(top_k_index, top_k_weights):
            out = self[e](self.expert_input(hidden_states, token_idx, top_k_pos, top_k_weights))
            if not self.layout.scaled_input:
                weight = top_k_weights[token_idx, top_k_pos, None]
                in_place = not torch.is_grad_enabled() and out.dtype == weight.dtype  # out: down's fresh output
                out = out.mul_(weight) if in_place else out * weight
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final.view(shape)


def scaled_input_dispatch(
    router: nn.Module, experts: nn.Module, shared_expert: nn.Module | None, top_k: int, hidden_states: Tensor
) -> tuple[Tensor, Tensor]:
    """The forward of a MoE module whose experts read router-scaled inputs (Llama4TextMoe), calling
    the experts as a top-k dispatch: `experts(hidden, top_k_index, top_k_weights)`.

    The router returns (scores, logits), both (T, E), scores the sigmoid of the top-k logits and 0
    elsewhere; transformers feeds every expert every token times its score, and an unchosen expert
    maps 0 to 0, so only the chosen experts contribute. Returns (out (T, H), logits) as the module does.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # (T, H)
    scores, logits = router(hidden)  # (T, E) each
    top_k_index = logits.topk(top_k, dim=-1).indices  # the router's own choice: topk of the same logits
    routed = experts(hidden, top_k_index, scores.gather(1, top_k_index))
    out = shared_expert(hidden) + routed if shared_expert is not None else routed
    return out, logits


# --- unfuse / fuse ------------------------------------------------------------------------


def experts_module_names(model: nn.Module, spec: FamilySpec) -> list[str]:
    """Names of the routed-experts modules (fused or not), in block order."""
    names = []
    for i, block in enumerate(model.get_submodule(spec.layers)):
        if module_at(block, spec.experts) is not None:
            names.append(f"{spec.layers}.{i}.{spec.experts}")
    return names


UnitShape = tuple[int, int, bool]  # (out_features, in_features, has_bias)


def unit_shape(linear: nn.Module) -> UnitShape:
    """(out, in, has_bias) of a linear-like module (nn.Linear or a quantized stand-in)."""
    weight = getattr(linear, "weight", None)
    out_f = getattr(linear, "out_features", None) or weight.shape[0]
    in_f = getattr(linear, "in_features", None) or weight.shape[1]
    return int(out_f), int(in_f), getattr(linear, "bias", None) is not None


def expert_unit_shapes(experts: nn.Module, layout: ExpertLayout, name: str) -> list[tuple[UnitShape, ...]]:
    """Per routed expert, the (out, in, has_bias) of its gate_proj, up_proj, down_proj.

    Works on a fused or unfused experts module and reads shapes only (fine on `meta`).
    """
    if isinstance(experts, UnfusedExperts):
        return [tuple(unit_shape(getattr(expert, kind)) for kind in unit_kinds(experts.layout)) for expert in experts]
    if layout.stacked is not None:
        gate_w, num = module_at(experts, layout.stacked[0]), getattr(experts, "num_experts", None)
        if not isinstance(gate_w, Tensor) or gate_w.dim() != 2 or not num:
            raise ValueError(f"`{name}` has no 2D `{layout.stacked[0]}` or no `num_experts`; check `stacked` in "
                             "the expert_layout of this family's FamilySpec (quantmoe/anatomy/specs.py)")
        inter, hidden = int(gate_w.shape[0]) // int(num), int(gate_w.shape[1])  # (E * I, H)
        return [((inter, hidden, False), (inter, hidden, False), (hidden, inter, False))] * int(num)
    gate_up, down = getattr(experts, GATE_UP if layout.has_gate else UP, None), getattr(experts, DOWN, None)
    if not isinstance(gate_up, Tensor) or not isinstance(down, Tensor) or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(
            f"`{name}` has no 3D `{GATE_UP}` and `{DOWN}`; check `experts` and `expert_layout` "
            "in this family's FamilySpec (quantmoe/anatomy/specs.py)"
        )
    gu_out, gu_in = gate_up.shape[1:][::-1] if layout.transposed else gate_up.shape[1:]  # (2I, H)
    d_out, d_in = down.shape[1:][::-1] if layout.transposed else down.shape[1:]  # (H, I)
    if not layout.has_gate:  # up_proj (E, I, H)
        return [((int(gu_out), int(gu_in), layout.has_bias), (int(d_out), int(d_in), layout.has_bias))] * int(
            gate_up.shape[0])
    gate = (int(gu_out) // 2, int(gu_in), layout.has_bias)
    return [(gate, gate, (int(d_out), int(d_in), layout.has_bias))] * int(gate_up.shape[0])


def expected_params(layout: ExpertLayout) -> set[str]:
    """The parameter names (dotted, inside the experts module) of a fused experts module of `layout`."""
    if layout.stacked is not None:
        return set(layout.stacked)
    if not layout.has_gate:  # never biased (ExpertLayout refuses it)
        return {UP, DOWN}
    return {GATE_UP, DOWN} | ({GATE_UP_BIAS, DOWN_BIAS} if layout.has_bias else set())


def _set_param(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    owner, _, attr = dotted.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, param)


def _stacked_weights(params: dict[str, Tensor], layout: ExpertLayout, num: int) -> list[tuple[Tensor, ...]]:
    """Per expert, (gate (I, H), up (I, H), down (H, I)) of a stacked layout: the rows of expert e."""
    gate, up, down = (params[p].view(num, -1, params[p].shape[-1]) for p in layout.stacked)  # (E, I, H) each
    return [(gate[e], up[e], down[e].T) for e in range(num)]


@torch.no_grad()
def expert_mlps(fused: nn.Module, params: dict[str, Tensor], layout: ExpertLayout, num: int,
                requires_grad: bool) -> list[ExpertMLP]:
    """`num` experts as `ExpertMLP`s with their own copies of the weights, cut from `params`: the
    fused parameters of `fused` (names as `expected_params`), or their rows for `num` consecutive
    experts (a lazy reader passes a few experts at a time)."""
    activation = _activation(fused, layout)
    experts = []
    if layout.stacked is not None:
        for weights in _stacked_weights(params, layout, num):
            experts.append(ExpertMLP(*(_linear(w, None, requires_grad) for w in weights), activation=activation))
    elif not layout.has_gate:
        up, down = params[UP], params[DOWN]
        for e in range(num):
            linears = (_linear(_as_linear(up[e], layout), None, requires_grad),
                       _linear(_as_linear(down[e], layout), None, requires_grad))
            experts.append(ExpertMLP(None, *linears, activation=activation))
    else:
        gate_up, down = params[GATE_UP], params[DOWN]
        for e in range(num):
            gate_w, up_w = _split(_as_linear(gate_up[e], layout), layout)  # (I, H) each
            down_w = _as_linear(down[e], layout)  # (H, I)
            gate_b = up_b = down_b = None
            if layout.has_bias:
                gate_b, up_b = _split(params[GATE_UP_BIAS][e], layout)
                down_b = params[DOWN_BIAS][e]
            linears = (_linear(gate_w, gate_b, requires_grad), _linear(up_w, up_b, requires_grad),
                       _linear(down_w, down_b, requires_grad))
            experts.append(ExpertMLP(*linears, activation=activation))
    return experts


def _unfuse(fused: nn.Module, layout: ExpertLayout, name: str) -> list[ExpertMLP]:
    params = dict(fused.named_parameters())
    if set(params) != expected_params(layout):
        raise ValueError(
            f"`{name}` has parameters {sorted(params)}, expected {sorted(expected_params(layout))}; "
            "check `expert_layout` in this family's FamilySpec (quantmoe/anatomy/specs.py)"
        )
    num = int(fused.num_experts) if layout.stacked is not None else next(iter(params.values())).shape[0]
    grad = next(iter(params.values())).requires_grad
    return expert_mlps(fused, params, layout, num, grad)


def _on_meta(fused: nn.Module) -> nn.Module:
    """`fused` with its parameters on ``meta`` (the storage freed; shapes stay for checks at fuse time)."""
    for pname, p in dict(fused.named_parameters()).items():
        if not p.is_meta:
            _set_param(fused, pname, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    return fused


def _dense(linear: nn.Module, name: str, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"`{name}` is a {type(linear).__name__} without a dense 2D `weight`; dequantize it "
            "(or keep the per-expert view) before fuse_experts"
        )
    if has_bias != (bias is not None):
        raise ValueError(
            f"`{name}` {'lacks' if has_bias else 'has'} a bias but the fused layout "
            f"{'has' if has_bias else 'has no'} biases; keep the linear's bias as unfuse_experts made it"
        )
    return weight, bias


@torch.no_grad()
def _fuse(unfused: UnfusedExperts, name: str) -> nn.Module:
    fused, layout = unfused._fused[0], unfused.layout
    gate_up, down, gate_up_b, down_b = [], [], [], []
    for e, expert in enumerate(unfused):
        if not layout.has_gate:
            (u, _), (d, _) = (_dense(getattr(expert, kind), f"{name}.{e}.{kind}", False) for kind in unit_kinds(layout))
            gate_up.append(_as_linear(u, layout))
            down.append(_as_linear(d, layout))
            continue
        (g, gb), (u, ub), (d, db) = (
            _dense(getattr(expert, kind), f"{name}.{e}.{kind}", layout.has_bias) for kind in UNIT_KINDS
        )
        gate_up.append(_as_linear(_join(g, u, layout), layout))
        down.append(_as_linear(d, layout))
        if layout.has_bias:
            gate_up_b.append(_join(gb, ub, layout))
            down_b.append(db)
    packed = {GATE_UP if layout.has_gate else UP: gate_up, DOWN: down}
    if layout.has_bias:
        packed |= {GATE_UP_BIAS: gate_up_b, DOWN_BIAS: down_b}
    if layout.stacked is not None:  # gate_up holds [gate; up] per expert: cut it back, down goes back to (I, H)
        gates, ups = zip(*(w.chunk(2, dim=0) for w in gate_up), strict=True)
        packed = dict(zip(layout.stacked, (gates, ups, [d.T for d in down]), strict=True))
    for pname, tensors in packed.items():
        old = module_at(fused, pname)
        new = torch.stack(tensors)
        new = (new.flatten(0, 1) if layout.stacked is not None else new).contiguous()
        if new.shape != old.shape:
            raise ValueError(
                f"`{name}.{pname}` would be packed as {tuple(new.shape)} but the model expects "
                f"{tuple(old.shape)}; expert linears must keep the shapes unfuse_experts gave them"
            )
        _set_param(fused, pname, nn.Parameter(new, requires_grad=old.requires_grad))
    return fused


def view_refusal(model: nn.Module) -> str | None:
    """Why `model`'s experts have no per-expert view (the error `unfuse_experts` raises), or None."""
    spec = family_of(model)
    if spec.view_refusal is not None:
        return (f"{spec.model_type} ({spec.display_name}) has no per-expert view, so it cannot be quantized: "
                f"{spec.view_refusal}. `quantmoe inspect` and `quantmoe plan` still work from its shapes.")
    refusal = spec.config_refusal(model.config)
    if refusal is not None:
        return (f"this {spec.model_type} ({spec.display_name}) config cannot be quantized: {refusal}. "
                "`quantmoe inspect` and `quantmoe plan` still work from its shapes.")
    return None


def install_unfused(model: nn.Module, name: str, experts: list[ExpertMLP]) -> UnfusedExperts:
    """Put `experts` (all of them, in order) in place of the fused experts module `name`, whose
    parameters go to ``meta``; the MoE module of a `scaled_input` layout dispatches top-k to them."""
    spec = family_of(model)
    unfused = UnfusedExperts(experts, spec.expert_layout, _on_meta(model.get_submodule(name)))
    model.set_submodule(name, unfused)
    if spec.expert_layout.scaled_input:
        _dispatch_top_k(model, spec, name)
    return unfused


def unfuse_experts(model: nn.Module, only: Collection[str] | None = None) -> nn.Module:
    """Replace every fused experts module of `model` (or those named in `only`) by an
    `UnfusedExperts`, in place.

    The per-expert linears hold copies of the fused weights (de-interleaved and transposed
    where the layout says so); the fused storage is freed. Idempotent.
    """
    refusal = view_refusal(model)
    if refusal is not None:
        raise UnsupportedModelError(refusal)
    spec = family_of(model)
    names = [n for n in experts_module_names(model, spec)
             if (only is None or n in only) and not isinstance(model.get_submodule(n), UnfusedExperts)]
    for name in names:
        install_unfused(model, name, _unfuse(model.get_submodule(name), spec.expert_layout, name))
    logger.debug("unfused %d experts modules of %s", len(names), spec.model_type)
    return model


def _dispatch_top_k(model: nn.Module, spec: FamilySpec, name: str) -> None:
    """Make the MoE module holding the experts `name` call them as a top-k dispatch
    (`scaled_input_dispatch`), with an instance `forward` that `fuse_experts` removes."""
    block = model.get_submodule(name.removesuffix("." + spec.experts))
    moe = module_at(block, spec.moe_module)
    shared = module_at(block, spec.shared_expert) if spec.shared_expert else None
    top_k = spec.top_k(model.config)
    moe.forward = partial(scaled_input_dispatch, module_at(block, spec.router), module_at(block, spec.experts),
                          shared, top_k)


def fuse_experts(model: nn.Module) -> nn.Module:
    """Put every original fused experts module back, in place, with the per-expert weights packed in."""
    names = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    for name in names:
        if model.get_submodule(name).layout.scaled_input:  # the MoE module's own forward again
            model.get_submodule(name.rpartition(".")[0]).__dict__.pop("forward", None)
        model.set_submodule(name, _fuse(model.get_submodule(name), name))
    logger.debug("fused %d experts modules", len(names))
    return model


def is_unfused(model: nn.Module) -> bool:
    """Whether any experts module of `model` is in the per-expert view."""
    return any(isinstance(m, UnfusedExperts) for m in model.modules())


@contextmanager
def per_expert_view(model: nn.Module) -> Iterator[nn.Module]:
    """Unfuse on entry, fuse back on exit (also on error). A no-op if already unfused."""
    already = is_unfused(model)
    unfuse_experts(model)
    try:
        yield model
    finally:
        if not already:
            fuse_experts(model)
