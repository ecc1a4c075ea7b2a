"""The per-expert view is exact and reversible, and routes exactly the right tokens."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from quantmoe.anatomy import (
    UnfusedExperts,
    describe,
    family_of,
    fuse_experts,
    is_unfused,
    per_expert_view,
    tiny_model,
    unfuse_experts,
)

FAMILY_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _pristine(model_type: str) -> nn.Module:
    return tiny_model(model_type)


def _model(model_type: str) -> nn.Module:
    return copy.deepcopy(_pristine(model_type))


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(_ids()).logits


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_round_trip_is_exact(model_type):
    model = _model(model_type)
    assert model.config._experts_implementation == "eager"
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    fused_logits = _logits(model)
    assert fused_logits.abs().max() > 0.1  # random weights give non-trivial logits

    unfuse_experts(model)
    assert is_unfused(model)
    unfused_logits = _logits(model)
    assert (unfused_logits - fused_logits).abs().max() < TOL
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in original.values())

    fuse_experts(model)
    assert not is_unfused(model)
    assert (_logits(model) - fused_logits).abs().max() < TOL
    restored = dict(model.named_parameters())
    assert restored.keys() == original.keys()
    for name, p in restored.items():
        assert torch.equal(p, original[name]), name


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_unfused_linears_are_the_fused_slices(model_type):
    model = _model(model_type)
    layout = family_of(model).expert_layout
    block = [b for b in describe(model).blocks if b.is_moe][-1]
    fused = model.get_submodule(block.experts_module)
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    unfuse_experts(model)
    e = block.num_experts - 1
    gate, up, dn = (model.get_submodule(n).weight for n in block.experts[e])
    w = gate_up[e].T if layout.transposed else gate_up[e]  # (2I, H)
    ref_gate, ref_up = (w[0::2], w[1::2]) if layout.interleaved else w.chunk(2)
    assert torch.equal(gate, ref_gate) and torch.equal(up, ref_up)
    assert torch.equal(dn, down[e].T if layout.transposed else down[e])


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_hook_on_one_expert_sees_exactly_its_tokens(model_type):
    model = unfuse_experts(_model(model_type))
    block = [b for b in describe(model).blocks if b.is_moe][-1]
    router = model.get_submodule(block.router)
    routed: list[torch.Tensor] = []
    block_input: list[torch.Tensor] = []
    seen: dict[str, list[torch.Tensor]] = {"gate_proj": [], "down_proj": []}
    hooks = [
        router.register_forward_hook(lambda m, i, out: routed.append(out[2])),  # (T, k) expert indices
        model.get_submodule(block.experts_module).register_forward_pre_hook(
            lambda m, args: block_input.append(args[0])
        ),
    ]
    counts = {}
    try:
        for e in range(block.num_experts):
            gate_name, _, down_name = block.experts[e]
            hooks.append(model.get_submodule(gate_name).register_forward_hook(
                lambda m, i, o, e=e: seen["gate_proj"].append((e, i[0]))))  # fmt: skip
            hooks.append(model.get_submodule(down_name).register_forward_hook(
                lambda m, i, o, e=e: seen["down_proj"].append((e, i[0]))))  # fmt: skip
        _logits(model)
    finally:
        for h in hooks:
            h.remove()
    (indices,), (hidden,) = routed, block_input
    assert indices.shape == (hidden.shape[0], model.config.num_experts_per_tok)
    for e in range(block.num_experts):
        mask = (indices == e).any(dim=-1)  # (T,) tokens routed to expert e
        counts[e] = int(mask.sum())
        gate_inputs = [x for i, x in seen["gate_proj"] if i == e]
        down_inputs = [x for i, x in seen["down_proj"] if i == e]
        if counts[e] == 0:
            assert gate_inputs == [] and down_inputs == []
            continue
        (gate_in,), (down_in,) = gate_inputs, down_inputs
        assert gate_in.shape[0] == down_in.shape[0] == counts[e] == int((indices == e).sum())
        # each row the expert saw is one of its routed tokens' hidden states, each token once
        matches = (gate_in[:, None, :] == hidden[None, :, :]).all(dim=-1)  # (n, T)
        assert torch.equal(matches.sum(dim=1), torch.ones(counts[e], dtype=torch.long))
        assert torch.equal(matches.any(dim=0), mask)
    assert sum(counts.values()) == indices.numel()
    assert sum(c > 0 for c in counts.values()) >= 2  # routing is not degenerate


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_edited_expert_weights_are_packed_back(model_type):
    model = _model(model_type)
    layout = family_of(model).expert_layout
    block = describe(model).blocks[0]
    with per_expert_view(model):
        down = model.get_submodule(block.experts[1][2])
        gate = model.get_submodule(block.experts[1][0])
        with torch.no_grad():
            down.weight.mul_(2.0)  # (H, I)
            gate.weight.zero_()  # (I, H)
            if layout.has_bias:
                gate.bias.fill_(3.0)
        new_down, edited_logits = down.weight.detach().clone(), _logits(model)
    fused = model.get_submodule(block.experts_module)
    stored_down = fused.down_proj[1].T if layout.transposed else fused.down_proj[1]
    assert torch.equal(stored_down, new_down)
    w = fused.gate_up_proj[1].T if layout.transposed else fused.gate_up_proj[1]  # (2I, H)
    gate_rows = w[0::2] if layout.interleaved else w.chunk(2)[0]
    assert torch.equal(gate_rows, torch.zeros_like(gate_rows))
    if layout.has_bias:
        gate_bias = fused.gate_up_proj_bias[1][0::2]
        assert torch.equal(gate_bias, torch.full_like(gate_bias, 3.0))
    assert (_logits(model) - edited_logits).abs().max() < TOL
    assert (_logits(model) - _logits(_pristine(model_type))).abs().max() > TOL


def test_per_expert_view_restores_on_error_and_nests():
    model = _model("olmoe")
    reference = _logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with per_expert_view(model):
            assert is_unfused(model)
            raise RuntimeError("boom")
    assert not is_unfused(model)
    with per_expert_view(model):
        with per_expert_view(model):
            pass
        assert is_unfused(model)  # the inner view does not fuse what the outer one unfused
    assert not is_unfused(model)
    assert torch.equal(_logits(model), reference)


def test_fuse_rejects_a_linear_without_dense_weight():
    model = unfuse_experts(_model("mixtral"))
    block = describe(model).blocks[0]
    model.set_submodule(block.experts[0][2], nn.Identity())
    with pytest.raises(ValueError, match="dequantize"):
        fuse_experts(model)


def _one_hot_loop(experts: UnfusedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop (one-hot mask, one torch.where per expert): the reference."""
    final = torch.zeros_like(hidden)
    mask = nn.functional.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)  # (E+1, k, T)
    for e in (mask.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist():
        if e == experts.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        out = experts[e](hidden[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_sorted_dispatch_is_the_eager_loop_bit_for_bit(model_type):
    model = unfuse_experts(_model(model_type))
    experts = model.get_submodule(describe(model).blocks[0].experts_module)
    g = torch.Generator().manual_seed(3)
    T, k, E = 40, 2, experts.num_experts
    hidden = torch.randn(T, model.config.hidden_size, generator=g)
    top_k_index = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # expert E-1 idle
    top_k_index[5, 1] = E  # transformers' expert-parallel sentinel: skipped
    weights = torch.rand(T, k, generator=g)
    routes = experts.routes(top_k_index)
    assert [e for e, _, _ in routes] == sorted({e for e in top_k_index.flatten().tolist() if e < E})
    for e, token_idx, top_k_pos in routes:
        pos, tok = torch.where((top_k_index == e).T)
        assert torch.equal(token_idx, tok) and torch.equal(top_k_pos, pos)
    with torch.no_grad():
        assert torch.equal(experts(hidden, top_k_index, weights), _one_hot_loop(experts, hidden, top_k_index, weights))


def test_llama4_experts_see_their_routed_tokens_scaled_before_the_expert():
    """Llama 4 runs every expert on every token times its router score (0 where not chosen); the view
    runs each expert on its routed tokens only, scaled before the expert, and gives the same logits."""
    model = tiny_model("llama4_text", num_experts_per_tok=2)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    unfuse_experts(model)
    block = [b for b in describe(model).blocks if b.is_moe][-1]
    experts = model.get_submodule(block.experts_module)
    scores, seen, dispatched = [], {}, []
    hooks = [model.get_submodule(block.router).register_forward_hook(lambda m, i, out: scores.append((i[0], *out))),
             experts.register_forward_pre_hook(lambda m, args: dispatched.append(args))]
    hooks += [model.get_submodule(block.experts[e][0]).register_forward_pre_hook(
        lambda m, args, e=e: seen.__setitem__(e, args[0])) for e in range(block.num_experts)]  # fmt: skip
    try:
        with torch.no_grad():
            assert (model(input_ids=ids).logits - reference).abs().max() < TOL
    finally:
        for h in hooks:
            h.remove()
    ((hidden, router_scores, logits),), ((_, top_k_index, top_k_weights),) = scores, dispatched
    chosen = logits.topk(2, dim=-1).indices  # (T, 2)
    assert torch.equal(top_k_index, chosen) and torch.equal(top_k_weights, router_scores.gather(1, chosen))
    assert int((router_scores > 0).sum()) == chosen.numel()  # the unchosen experts' scores are 0
    for e, rows in seen.items():
        token_idx, top_k_pos = (chosen == e).T.nonzero(as_tuple=True)[::-1]  # (top-k position, token) order
        assert torch.equal(rows, hidden[token_idx] * router_scores[token_idx, e, None])
        assert torch.equal(rows, experts.expert_input(hidden, token_idx, top_k_pos, top_k_weights))
    assert sum(len(rows) for rows in seen.values()) == chosen.numel()
    fuse_experts(model)
    assert "forward" not in vars(model.get_submodule(block.module_name).feed_forward)


@pytest.mark.parametrize("kwargs, setting", [
    (dict(has_gate=False, has_bias=True), "has_gate"),  # the gate-less view packs no biases
    (dict(has_gate=False, interleaved=True), "has_gate"),
    (dict(stacked=("w1", "v1", "w2"), has_bias=True), "stacked"),
    (dict(stacked=("w1", "w2")), "stacked"),
    (dict(scaled_input=True, has_bias=True), "scaled_input"),  # 0 must map to 0
    (dict(scaled_input=True, has_gate=False), "scaled_input"),
])
def test_expert_layouts_the_view_cannot_carry_are_refused(kwargs, setting):
    from quantmoe.anatomy.specs import ExpertLayout

    with pytest.raises(ValueError, match=f"check `{setting}` in ExpertLayout"):
        ExpertLayout(**kwargs)


def test_a_choice_with_router_weight_0_is_no_token_of_its_expert():
    """ZAYA's router sends the tokens of its skip class to expert 0 with weight 0: the view gives the
    same logits, but those tokens are not expert 0's (not calibrated on, not counted by collect_routing)."""
    from quantmoe.calib.routing import collect_routing

    model = _model("zaya")
    anatomy = describe(model)
    for b in anatomy.blocks:  # the skip class competes on equal terms (its bias is -1 by default)
        model.get_submodule(b.router).balancing_biases.zero_()
    windows = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = model(input_ids=windows).logits
    unfuse_experts(model)
    calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {b.index: [] for b in anatomy.blocks}
    handles = [model.get_submodule(b.experts_module).register_forward_pre_hook(
        lambda m, args, i=b.index: calls[i].append((args[1], args[2]))) for b in anatomy.blocks]
    try:
        with torch.no_grad():
            unfused = model(input_ids=windows).logits
    finally:
        for h in handles:
            h.remove()
    assert (fused - unfused).abs().max() < TOL
    skipped = 0
    routing = collect_routing(model, anatomy, windows)
    for b in anatomy.blocks:
        experts = model.get_submodule(b.experts_module)
        index = torch.cat([i for i, _ in calls[b.index]])
        weight = torch.cat([w for _, w in calls[b.index]])
        skipped += int((weight == 0).sum())
        routed = torch.zeros(b.num_experts, dtype=torch.long)
        for e, token_idx, _ in experts.routes(index, weight):
            routed[e] = token_idx.numel()
        assert torch.equal(routed, torch.bincount(index[weight != 0], minlength=b.num_experts))
        assert routing.counts[b.index].tolist() == routed.tolist()
    assert skipped > 0  # the skip class was chosen
