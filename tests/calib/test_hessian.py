"""Hessians recorded at the experts' dispatch are exactly those of hooks on each expert's linears."""

import pytest
import torch

from quantmoe.anatomy import describe, tiny_model, unfuse_experts
from quantmoe.calib.hessian import ExpertsHookTarget, HessianCollector, InputStats, StopForward
from quantmoe.quant.pipeline import _input_key


def _setup(family="qwen2_moe"):
    model = unfuse_experts(tiny_model(family))
    anatomy = describe(model)
    block = next(b for b in anatomy.blocks if b.is_moe)
    units = [u for u in anatomy.units if u.block == block.index and u.kind in ("gate_proj", "up_proj")]
    batches = [torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(s))
               for s in (0, 1)]
    return model, block, units, batches


def _reference(model, block, batches, mode):
    """Per expert: the inputs its gate_proj sees in plain forwards, accumulated in call order."""
    experts = model.get_submodule(block.experts_module)
    stats = {e: InputStats(model.config.hidden_size, torch.device("cpu")) for e in range(block.num_experts)}
    dispatched = []
    hook = experts.register_forward_pre_hook(lambda m, args: dispatched.append(args))
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        hook.remove()
    for hidden, top_k_index, top_k_weights in dispatched:
        for e in range(block.num_experts):
            pos, tok = torch.where((top_k_index == e).T)  # transformers' eager order
            if mode == "all":
                stats[e].add(hidden)
            elif len(tok):
                stats[e].add(hidden[tok], top_k_weights[tok, pos] if mode == "weighted" else None)
    return stats


@pytest.mark.parametrize("mode", ["routed", "weighted", "all"])
def test_dispatch_hessians_equal_per_expert_hooks(mode):
    model, block, units, batches = _setup()
    ref = _reference(model, block, batches, mode)
    collector = HessianCollector(model, units, _input_key, [ExpertsHookTarget(block.experts_module, block.num_experts)],
                                 mode)
    with collector.attached({u.name: block.experts_module if u.expert is not None else None for u in units}):
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    for u in units:
        if u.expert is None:
            continue
        H, tokens = collector.hessian(u)
        assert tokens == ref[u.expert].tokens
        assert torch.equal(H, ref[u.expert].hessian() if tokens else torch.zeros_like(H)), u.name


def test_routed_gate_up_stage_stops_at_the_dispatch():
    model, block, units, batches = _setup("mixtral")  # no shared expert: nothing else to wait for
    ran = []
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda m, a: ran.append(1))
             for expert in block.experts for name in expert]
    collector = HessianCollector(model, units, _input_key, [ExpertsHookTarget(block.experts_module, block.num_experts)],
                                 "routed", stop_early=True)
    try:
        with collector.attached({u.name: block.experts_module for u in units}), torch.no_grad():
            collector.start_batch()
            with pytest.raises(StopForward):
                model(input_ids=batches[0])
    finally:
        for h in hooks:
            h.remove()
    assert ran == []  # no expert ran
    assert sum(collector.hessian(u)[1] for u in units if u.kind == "gate_proj") == batches[0].numel() * block.top_k
