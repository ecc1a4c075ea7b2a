"""Hessians recorded at the experts' dispatch are exactly those of hooks on each expert's linears."""

import pytest
import torch

from quantmoe.anatomy import describe, tiny_model, unfuse_experts
from quantmoe.calib.hessian import ExpertsHookTarget, HessianCollector, InputStats, StopForward
from quantmoe.quant.stages import input_key


def _setup(family, kinds):
    model = unfuse_experts(tiny_model(family))
    anatomy = describe(model)
    block = next(b for b in anatomy.blocks if b.is_moe)
    units = [u for u in anatomy.units if u.block == block.index and u.kind in kinds]
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(s))
               for s in (0, 1)]
    return model, block, units, batches


def _reference(model, block, batches, mode, kind):
    """Per expert: what a hook on its ``kind`` linear sees when the expert runs on its rows."""
    experts = model.get_submodule(block.experts_module)
    dispatched = []
    hook = experts.register_forward_pre_hook(lambda m, args: dispatched.append(args))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        hook.remove()
    stats = {}
    for hidden, top_k_index, top_k_weights in dispatched:
        for e in range(block.num_experts):
            pos, tok = torch.where((top_k_index == e).T)  # transformers' eager order
            rows = hidden if mode == "all" else experts.expert_input(hidden, tok, pos, top_k_weights)
            if not len(rows):
                continue
            seen = []
            h = getattr(experts[e], kind).register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # noqa: B023
            try:
                with torch.no_grad():
                    experts[e](rows)
            finally:
                h.remove()
            stats.setdefault(e, InputStats(seen[0].shape[-1], torch.device("cpu")))
            weighted = mode == "weighted" and not experts.layout.scaled_input  # Llama 4: the weight is in the rows
            stats[e].add(seen[0], top_k_weights[tok, pos] if weighted else None)
    return stats


# shared expert: none, before the routed ones, after them (routed down then recorded by its own hook);
# Llama 4: each expert reads its rows scaled by the router weight
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "llama4_text"])
@pytest.mark.parametrize("kind", ["gate_proj", "down_proj"])
@pytest.mark.parametrize("mode", ["routed", "weighted", "all"])
def test_expert_hessians_equal_per_expert_hooks(family, kind, mode):
    kinds = ("gate_proj", "up_proj") if kind == "gate_proj" else ("down_proj",)
    model, block, units, batches = _setup(family, kinds)
    ref = _reference(model, block, batches, mode, kind)
    collector = HessianCollector(model, units, input_key, [ExpertsHookTarget(block.experts_module, block.num_experts)],
                                 mode, stop_early=True)
    with collector.attached({u.name: block.experts_module if u.expert is not None else None for u in units}):
        with torch.no_grad():
            for ids in batches:
                collector.start_batch()
                with pytest.raises(StopForward):
                    model(input_ids=ids)
    for u in units:
        if u.expert is None:
            assert collector.hessian(u)[1] == sum(ids.numel() for ids in batches)  # a shared expert
            continue
        H, tokens = collector.hessian(u)
        assert tokens == (ref[u.expert].tokens if u.expert in ref else 0)
        assert torch.equal(H, ref[u.expert].hessian() if tokens else torch.zeros_like(H)), u.name


@pytest.mark.parametrize("kinds", [("gate_proj", "up_proj"), ("down_proj",)])
def test_routed_stages_stop_at_the_dispatch(kinds):
    model, block, units, batches = _setup("mixtral", kinds)  # no shared expert: nothing else to wait for
    ran = []
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda m, a: ran.append(1))
             for expert in block.experts for name in expert]
    collector = HessianCollector(model, units, input_key, [ExpertsHookTarget(block.experts_module, block.num_experts)],
                                 "routed", stop_early=True)
    try:
        with collector.attached({u.name: block.experts_module for u in units}), torch.no_grad():
            collector.start_batch()
            with pytest.raises(StopForward):
                model(input_ids=batches[0])
    finally:
        for h in hooks:
            h.remove()
    # the experts module itself did not run: only the gate/up that compute down's input, once per expert
    assert len(ran) == (0 if "gate_proj" in kinds else 2 * len({u.expert for u in units if collector.hessian(u)[1]}))
    assert sum(collector.hessian(u)[1] for u in units if u.kind == kinds[0]) == batches[0].numel() * block.top_k


@pytest.mark.parametrize("kind", ["gate_proj", "down_proj"])
def test_weighted_hessian_is_2_over_sum_w_xt_diag_w_x(kind):
    """``weighted`` mode, one expert, by hand: H = 2/n X^T diag(w) X where X holds the rows routed
    to the expert, w their router weights, and n = sum(w) (the weights' sum, not the row count:
    InputStats.weight_sum). Computed in float64 from the dispatch's own arguments."""
    kinds = ("gate_proj", "up_proj") if kind == "gate_proj" else ("down_proj",)
    model, block, units, batches = _setup("mixtral", kinds)
    experts = model.get_submodule(block.experts_module)
    dispatched = []
    spy = experts.register_forward_pre_hook(lambda m, args: dispatched.append(args))
    collector = HessianCollector(model, units, input_key, [ExpertsHookTarget(block.experts_module, block.num_experts)],
                                 "weighted")
    with collector.attached({u.name: block.experts_module for u in units}), torch.no_grad():
        for ids in batches:
            collector.start_batch()
            model(input_ids=ids)
    spy.remove()
    e = 1
    rows, w = [], []
    with torch.no_grad():
        for hidden, top_k_index, top_k_weights in dispatched:
            tok, pos = torch.where(top_k_index == e)
            x = hidden[tok]
            if kind == "down_proj":  # down reads act(gate(x)) * up(x)
                ex = experts[e]
                x = ex.activation(ex.gate_proj(x), ex.up_proj(x))
            rows.append(x.double())
            w.append(top_k_weights[tok, pos].double())
    X, w = torch.cat(rows), torch.cat(w)  # (n_rows, in), (n_rows,)
    assert len(w) > 4 and not torch.allclose(w, w[0].expand_as(w))  # the weights differ: the test can tell
    expected = 2 / w.sum() * X.T @ torch.diag(w) @ X
    unit = next(u for u in units if u.expert == e and u.kind == kind)
    H, tokens = collector.hessian(unit)
    assert tokens == len(w)
    torch.testing.assert_close(H.double(), expected, rtol=1e-5, atol=1e-6)
    # the unweighted H of the same rows is another matrix: the check above sees the weights
    assert not torch.allclose(H.double(), 2 / len(w) * X.T @ X, rtol=1e-3)


@pytest.mark.parametrize("features", [255, 256, 300, 512])
def test_wide_inputs_accumulate_the_upper_triangle_and_mirror_it(features):
    """From TRIANGLE_MIN_FEATURES on only the upper block triangle of x^T x is accumulated (the
    rest stays zero), and hessian() is the full, exactly symmetric 2/n x^T x (float64 reference)."""
    from quantmoe.calib.hessian import TRIANGLE_MIN_FEATURES

    g = torch.Generator().manual_seed(features)
    stats = InputStats(features, torch.device("cpu"))
    batches = [torch.randn(n, features, generator=g) for n in (37, 64, 5)]
    weights = [torch.rand(n, generator=g) for n in (37, 64, 5)]
    for x, w in zip(batches, weights):
        stats.add(x, w)
    reference = sum((x.double() * w.double().unsqueeze(-1)).T @ x.double() for x, w in zip(batches, weights))
    reference *= 2.0 / float(sum(w.double().sum() for w in weights))
    h = stats.hessian()
    if features >= TRIANGLE_MIN_FEATURES:
        assert torch.equal(h, h.T)
    torch.testing.assert_close(h.double(), reference, rtol=1e-5, atol=1e-5)
    below_panels = stats.xtx[features // 2:, : features // 4]  # below the diagonal blocks
    assert (below_panels == 0).all() == (features >= TRIANGLE_MIN_FEATURES)


def test_tokens_routed_with_weight_0_are_not_calibration_data_of_the_expert():
    """ZAYA's skip class reaches expert 0 with router weight 0: those tokens are not in its Hessian."""
    model, block, units, batches = _setup("zaya", ("gate_proj", "up_proj"))
    model.get_submodule(block.router).balancing_biases.zero_()  # the skip class competes (bias -1 by default)
    experts = model.get_submodule(block.experts_module)
    dispatched = []
    spy = experts.register_forward_pre_hook(lambda m, args: dispatched.append(args[1:]))
    collector = HessianCollector(model, units, input_key, [ExpertsHookTarget(block.experts_module, block.num_experts)],
                                 "routed", stop_early=True)
    try:
        with collector.attached({u.name: block.experts_module for u in units}), torch.no_grad():
            for ids in batches:
                collector.start_batch()
                with pytest.raises(StopForward):
                    model(input_ids=ids)
    finally:
        spy.remove()
    index = torch.cat([i for i, _ in dispatched]).reshape(-1)
    weight = torch.cat([w for _, w in dispatched]).reshape(-1)
    assert (weight == 0).any()  # some tokens took the skip class
    chosen = torch.bincount(index[weight != 0], minlength=block.num_experts)
    for u in units:
        assert collector.hessian(u)[1] == chosen[u.expert], u.name
    assert torch.equal(collector.routed_tokens[block.experts_module], chosen)
