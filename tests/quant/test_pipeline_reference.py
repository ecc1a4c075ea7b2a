"""`quantize_model` against a naive sequential GPTQ loop written here from the paper's recipe.

The reference takes no shortcut: no block-input capture, no replay, no recording at the
experts' dispatch, no early stop. For every block and every stage (in the paper's order:
attention inputs -> MLA q_b/kv_b -> o_proj -> gate/up of routed, shared and dense MLPs ->
down) it runs the WHOLE model over the calibration batches with forward pre-hooks on the
stage's own linears, builds H = 2/n sum_t w_t x_t x_t^T from what the hooks saw, quantizes
the stage with the project's `gptq_quantize` (the per-linear math, tested in test_gptq.py)
and writes the quantized weight back into the model. So a stage sees the already quantized
earlier stages, and block k+1 sees the outputs of the quantized block k, by construction.

MoE modes, from the docs (quantization.md step 4): `routed`: an expert's rows are the tokens
routed to it (what its own linears see in the routed forward); `all`: every expert runs on
every token that reaches the experts module (here: after the forward, on the recorded
experts input) and the routed forward is not recorded; `weighted`: a routed row counts with
its router weight w_t (the row is scaled by sqrt(w_t), so X^T diag(w) X) and n = sum of w_t.

Comparison: bit for bit on every quantized weight. The reference accumulates x^T x per hook
call (one call per batch and linear) with `addmm_` in float32, and n as a Python float, as
any per-batch accumulation does; the pipeline is run with `batch_experts=False` so both
quantize each linear with `gptq_quantize` (batched GPTQ differs from looped in rare
rounding ties, see test_gptq.py::test_batched_equals_looped).
"""

from __future__ import annotations

import copy

import pytest
import torch

from quantmoe.anatomy import describe, tiny_model, unfuse_experts
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant.gptq import gptq_quantize
from quantmoe.quant.grid import rtn
from quantmoe.quant.pipeline import GPTQConfig, quantize_model
from quantmoe.quant.plan import Plan

# The paper's order inside a block, written out here (not read from the pipeline).
ORDER: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa"}),
    frozenset({"q_b_proj", "kv_b_proj"}),
    frozenset({"o_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"down_proj"}),
)
BATCH = 4
MIN_EXPERT_TOKENS = 1


class _Stats:
    def __init__(self, n_in: int) -> None:
        self.xtx = torch.zeros(n_in, n_in)
        self.n = 0.0  # sum of token weights (tokens when unweighted)
        self.rows = 0

    def add(self, x: torch.Tensor, w: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (rows, in)
        if w is not None:
            self.n += float(w.sum())
            x = x * w.float().sqrt()[:, None]
        else:
            self.n += x.shape[0]
        self.rows += x.shape[0]
        self.xtx.addmm_(x.T, x)


def _record_stage(model, block, stage, windows, mode):
    """Run the whole model over every batch; return unit name -> _Stats of its linear's input."""
    stats = {u.name: _Stats(u.in_features) for u in stage}
    experts = model.get_submodule(block.experts_module) if block.is_moe else None
    routing = {}  # the experts module's arguments of the current forward
    seen_by_experts = []  # (hidden, ) reaching the experts module, for the `all` mode
    all_pass = [False]

    def linear_hook(unit):
        def hook(_module, args):
            x = args[0]
            if unit.expert is None:
                stats[unit.name].add(x, None)
                return
            if mode == "all":
                if all_pass[0]:
                    stats[unit.name].add(x, None)
                return  # the routed forward is not recorded
            hidden, index, weights = routing["args"]
            pos, tok = torch.where((index == unit.expert).T)  # rows of this expert, as transformers orders them
            if unit.kind in ("gate_proj", "up_proj"):
                assert torch.equal(x, hidden[tok])  # the reference's own bookkeeping is right
            stats[unit.name].add(x, weights[tok, pos] if mode == "weighted" else None)
        return hook

    def experts_hook(_module, args):
        routing["args"] = args
        seen_by_experts.append(args[0])

    handles = [model.get_submodule(u.name).register_forward_pre_hook(linear_hook(u)) for u in stage]
    if experts is not None:
        handles.append(experts.register_forward_pre_hook(experts_hook))
    try:
        with torch.no_grad():
            for i in range(0, len(windows), BATCH):
                seen_by_experts.clear()
                model(input_ids=windows[i:i + BATCH], use_cache=False)
                if mode == "all" and seen_by_experts:
                    all_pass[0] = True
                    try:
                        for e in range(block.num_experts):
                            experts[e](seen_by_experts[0])  # every expert on every token
                    finally:
                        all_pass[0] = False
    finally:
        for h in handles:
            h.remove()
    return stats


def reference_quantize(model, specs, windows, mode, damp=0.01):
    """Quantize ``model`` (per-expert view) in place, stage by stage; return name -> Q."""
    unfuse_experts(model)
    anatomy = describe(model)
    out = {}
    for block in anatomy.blocks:
        units = [u for u in anatomy.units if u.block == block.index]
        for kinds in ORDER:
            stage = [u for u in units if u.kind in kinds and not specs[u.name].keep]
            if not stage:
                continue
            stats = _record_stage(model, block, stage, windows, mode)
            for u in stage:  # every linear of the stage was recorded before any of them is quantized
                linear = model.get_submodule(u.name)
                s = stats[u.name]
                if u.expert is not None and s.rows < MIN_EXPERT_TOKENS:
                    Q = rtn(linear.weight, specs[u.name])
                else:
                    Q = gptq_quantize(linear.weight, s.xtx * (2.0 / s.n), specs[u.name], damp=damp,
                                      block_size=128, name=u.name).Q
                with torch.no_grad():
                    linear.weight.copy_(Q)
                out[u.name] = Q
    return out


def _windows(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0))


# mixtral: 2 MoE blocks, no shared expert; qwen2_moe: dense block 0, shared expert + its gate;
# deepseek_v3: MLA attention (three attention stages), dense block 0, shared expert after the routed ones;
# all three MoE modes on those, the routed one on the other families (gpt_oss: sliding-window and full
# attention blocks alternate, each with its own mask; biases; attention sinks)
@pytest.mark.parametrize(("family", "mode"), [
    *((family, mode) for family in ("mixtral", "qwen2_moe", "deepseek_v3") for mode in ("routed", "all", "weighted")),
    ("qwen3_moe", "routed"), ("olmoe", "routed"), ("gpt_oss", "routed"), ("gpt_oss", "weighted")])
def test_quantize_model_equals_the_naive_sequential_loop(family, mode):
    model = tiny_model(family)
    windows = _windows(model.config.vocab_size)
    plan = Plan.from_dict({"default": {"bits": 3, "group_size": 16},
                           "kinds": {"down_proj": {"bits": 2, "symmetric": False}}})
    ref_model = copy.deepcopy(model)
    specs = plan.resolve(describe(model))
    calib = CalibrationConfig(min_expert_tokens=MIN_EXPERT_TOKENS, moe_mode=mode, batch_size=BATCH)
    report = quantize_model(model, specs, windows, calib, GPTQConfig(batch_experts=False), progress=False)
    expected = reference_quantize(ref_model, specs, windows, mode)
    assert expected.keys() == specs.keys()
    assert all(report.units[name].method == "gptq" for name in specs)  # nothing fell back: all GPTQ math
    different = [name for name in specs if not torch.equal(model.get_submodule(name).dequantize_weight(),
                                                           expected[name])]
    assert not different, f"{len(different)} of {len(specs)} linears differ, first: {different[:3]}"
    with torch.no_grad():  # and so the models agree
        assert torch.equal(model(input_ids=windows).logits, ref_model(input_ids=windows).logits)


def test_the_reference_is_sensitive_to_the_order():
    """The comparison above can fail: a reference that calibrates every stage of a block on the
    full-precision block (all stages recorded before any is quantized) gives other weights."""
    model = tiny_model("mixtral")
    windows = _windows(model.config.vocab_size)
    specs = Plan.uniform(3, group_size=16).resolve(describe(model))
    sequential = reference_quantize(copy.deepcopy(model), specs, windows, "routed")
    unfuse_experts(model)
    anatomy = describe(model)
    block = anatomy.blocks[0]
    units = [u for u in anatomy.units if u.block == 0]
    stats = _record_stage(model, block, units, windows, "routed")  # one pass, nothing quantized yet
    down = next(u for u in units if u.kind == "down_proj" and u.expert == 0)
    s = stats[down.name]
    flat = gptq_quantize(model.get_submodule(down.name).weight, s.xtx * (2.0 / s.n), specs[down.name]).Q
    assert not torch.equal(flat, sequential[down.name])


def test_keep_bits_stay_full_precision_in_both():
    model = tiny_model("mixtral")
    plan = Plan.from_dict({"default": {"bits": 4, "group_size": 16}, "roles": {"attention": {"bits": 16}}})
    specs = plan.resolve(describe(model))
    assert any(s.keep for s in specs.values())
    ref_model = copy.deepcopy(model)
    windows = _windows(model.config.vocab_size)
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1, batch_size=BATCH),
                   GPTQConfig(batch_experts=False), progress=False)
    expected = reference_quantize(ref_model, specs, windows, "routed")
    for name, spec in specs.items():
        if spec.keep:
            assert torch.equal(model.get_submodule(name).weight, ref_model.get_submodule(name).weight)
        else:
            assert torch.equal(model.get_submodule(name).dequantize_weight(), expected[name]), name

