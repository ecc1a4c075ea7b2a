import contextlib
import copy

import pytest
import torch

from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.calib.hessian import ExpertsHookTarget, HessianCollector
from quantmoe.quant.fake import rtn_model
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.pipeline import GPTQConfig, _run_block, capture_block_inputs, quantize_model
from quantmoe.quant.plan import Plan
from quantmoe.quant.qlinear import QuantLinear
from quantmoe.quant.stages import expert_stats_bytes, input_key, stage_of, stage_of_kind, stat_groups
from quantmoe.quant.working_set import gptq_working_set

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]


def _windows(model, n=8, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, t), generator=g)


def _kl(ref, model, windows):
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=windows).logits, -1)
        q = torch.log_softmax(model(input_ids=windows).logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_quantized_and_every_expert_calibrated_or_listed(family):
    model = tiny_model(family)
    specs = Plan.uniform(4, group_size=None).resolve(describe(model))
    report = quantize_model(model, specs, _windows(model), CalibrationConfig(min_expert_tokens=1, batch_size=4),
                            progress=False)
    assert set(report.units) == set(specs)
    for name in specs:
        assert isinstance(model.get_submodule(name), QuantLinear), name
        u = report.units[name]
        assert (u.method == "gptq" and u.tokens > 0) or (u.method == "rtn-fallback" and name in report.fallbacks)
    anatomy = describe(model)
    for block in anatomy.blocks:
        if block.is_moe:
            assert len(report.expert_tokens[block.index]) == block.num_experts
            assert sum(report.expert_tokens[block.index]) == 8 * 32 * block.top_k


def test_gptq_beats_rtn_on_the_model_output():
    model = tiny_model("mixtral")
    windows = _windows(model, n=16)
    specs = Plan.uniform(3, group_size=None).resolve(describe(model))
    gptq = copy.deepcopy(model)
    quantize_model(gptq, specs, windows, CalibrationConfig(min_expert_tokens=1), progress=False)
    rtn = rtn_model(model, lambda u: specs[u.name])
    held_out = _windows(model, seed=1)
    assert _kl(model, gptq, held_out) < _kl(model, rtn, held_out)


def test_expert_without_tokens_falls_back_to_rtn_and_is_not_zeroed():
    model = tiny_model("mixtral")
    router = model.get_submodule("model.layers.1.mlp.gate")

    def never_expert_0(_m, _inp, out):
        logits, weights, idx = out
        return logits, weights, torch.where(idx == 0, torch.ones_like(idx), idx)

    router.register_forward_hook(never_expert_0)
    specs = Plan.uniform(4, group_size=None).resolve(describe(model))
    ref = copy.deepcopy(model)
    report = quantize_model(model, specs, _windows(model), CalibrationConfig(min_expert_tokens=0), progress=False)
    assert report.expert_tokens[1][0] == 0
    name = "model.layers.1.mlp.experts.0.down_proj"
    assert report.units[name].method == "rtn-fallback" and name in report.fallbacks
    q = model.get_submodule(name).dequantize_weight()
    with torch.no_grad():
        from quantmoe.anatomy import per_expert_view
        with per_expert_view(ref):
            w = ref.get_submodule(name).weight
            from quantmoe.quant.grid import rtn
            expected = rtn(w, QuantSpec(bits=4, group_size=None))
    assert q.abs().sum() > 0
    assert torch.equal(q, expected)


@pytest.mark.parametrize("mode", ["all", "weighted", "routed"])
def test_calibration_does_not_change_block_outputs(mode):
    model = tiny_model("qwen2_moe")
    from quantmoe.anatomy import unfuse_experts
    unfuse_experts(model)
    anatomy = describe(model)
    block_info = next(b for b in anatomy.blocks if b.is_moe)
    block = model.get_submodule(block_info.module_name)
    first = model.get_submodule(anatomy.blocks[0].module_name)
    inputs = capture_block_inputs(model, first, _windows(model), 4, torch.device("cpu"))
    if block_info.index > 0:
        for i in range(block_info.index):
            outs = _run_block(model.get_submodule(anatomy.blocks[i].module_name), inputs)
            inputs = [((o,) + a[1:], k) for o, (a, k) in zip(outs, inputs)]
    plain = _run_block(block, inputs)
    units = [u for u in anatomy.units if u.block == block_info.index and u.kind in ("gate_proj", "up_proj")]
    collector = HessianCollector(model, units, input_key,
                                 [ExpertsHookTarget(block_info.experts_module, block_info.num_experts)], mode)
    with collector.attached({u.name: block_info.experts_module if u.expert is not None else None for u in units}):
        hooked = _run_block(block, inputs)
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    routed = collector.routed_tokens[block_info.experts_module]
    for u in units:
        H, tokens = collector.hessian(u)
        if u.expert is not None:
            assert tokens == (4 * 32 * 2 if mode == "all" else routed[u.expert].item())
        assert torch.allclose(H, H.T)
    # gate and up of one expert share one Hessian
    gate = next(u for u in units if u.expert == 0 and u.kind == "gate_proj")
    up = next(u for u in units if u.expert == 0 and u.kind == "up_proj")
    assert torch.equal(collector.hessian(gate)[0], collector.hessian(up)[0])


def test_reruns_are_identical():
    outs = []
    for _ in range(2):
        model = tiny_model("deepseek_v3")
        specs = Plan.uniform(2, group_size=16).resolve(describe(model))
        quantize_model(model, specs, _windows(model), CalibrationConfig(min_expert_tokens=1), progress=False)
        outs.append(model.state_dict())
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_nan_weights_are_a_clear_error():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    specs = Plan.uniform(4).resolve(describe(model))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight has 1 NaN"):
        quantize_model(model, specs, _windows(model), progress=False)


def test_nan_in_a_router_weight_is_named_before_quantizing():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[2, 5] = float("nan")
    specs = Plan.uniform(4).resolve(describe(model))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate\.weight has 1 NaN") as err:
        quantize_model(model, specs, _windows(model), progress=False)
    assert "after quantization" not in str(err.value)


def test_rtn_method_and_keep_bits():
    model = tiny_model("olmoe")
    plan = Plan.from_dict({"default": {"bits": 4, "group_size": 16}, "roles": {"attention": {"bits": 16}}})
    specs = plan.resolve(describe(model))
    ref = copy.deepcopy(model)
    report = quantize_model(model, specs, _windows(model), gptq=GPTQConfig(method="rtn"), progress=False)
    attn = [n for n, s in specs.items() if s.bits == 16]
    assert attn and all(report.units[n].method == "keep" for n in attn)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in attn)
    expected = rtn_model(ref, lambda u: specs[u.name])
    w = _windows(model)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=w).logits, expected(input_ids=w).logits, atol=1e-5)


def test_nan_activations_name_the_module():
    model = tiny_model("mixtral")
    # finite weights, NaN activations (as from an overflow): the norm's output is poisoned by a hook
    model.model.layers[1].input_layernorm.register_forward_hook(lambda _m, _i, out: out * float("nan"))
    specs = Plan.uniform(4).resolve(describe(model))
    with pytest.raises(ValueError, match=r"NaN/Inf calibration activations reach model\.layers\.1\.self_attn"):
        quantize_model(model, specs, _windows(model), progress=False)


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_cutting_attention_passes_short_changes_nothing(family, monkeypatch):
    import quantmoe.quant.pipeline as pipeline

    results = []
    real = pipeline.HessianCollector
    for stop in (True, False):
        model = tiny_model(family)
        specs = Plan.uniform(3, group_size=16).resolve(describe(model))
        monkeypatch.setattr(pipeline, "HessianCollector",
                            lambda *a, stop_early=False, **k: real(*a, stop_early=stop, **k))  # noqa: B023
        quantize_model(model, specs, _windows(model), CalibrationConfig(min_expert_tokens=1), progress=False)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize(("family", "mode", "attention"), [
    ("mixtral", "routed", "sdpa"), ("deepseek_v3", "routed", "sdpa"), ("qwen2_moe", "weighted", "sdpa"),
    ("olmoe", "all", "sdpa"), ("gpt_oss", "all", "eager"), ("qwen3_moe", "routed", "eager")])
def test_later_pass_shortcuts_change_nothing(family, mode, attention, monkeypatch):
    """The shortcuts of the later passes (dequantized weights kept dense; attention outputs
    replayed, from o_proj's input with sdpa; experts' down inputs replayed in the final pass)
    against the plain path: a QuantLinear dequantizing on every call, everything recomputed."""
    import quantmoe.quant.pipeline as pipeline

    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(QuantLinear, "dense", lambda self, weight=None: self)
            monkeypatch.setattr(pipeline.FrozenOutputs, "active", lambda self, on=True: contextlib.nullcontext(self))
        model = tiny_model(family)
        model.set_attn_implementation(attention)
        specs = Plan.uniform(3, group_size=16).resolve(describe(model))
        calib = CalibrationConfig(min_expert_tokens=1, moe_mode=mode, batch_size=3)  # 3 batches, the last short
        report = quantize_model(model, specs, _windows(model), calib, progress=False)
        results.append((model.state_dict(), report.expert_tokens))
    (fast_state, fast_tokens), (slow_state, slow_tokens) = results
    assert fast_tokens == slow_tokens
    assert fast_state.keys() == slow_state.keys()
    assert all(torch.equal(fast_state[k], slow_state[k]) for k in fast_state)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_recomputing_the_attention_instead_of_keeping_o_proj_inputs_gives_the_same_model(family, monkeypatch):
    import quantmoe.quant.pipeline as pipeline

    tails, real = [], pipeline.FrozenOutputs

    def frozen(module, *a, **k):
        tails.append(k.get("tail"))
        return real(module, *a, **k)

    monkeypatch.setattr(pipeline, "FrozenOutputs", frozen)
    states, computed = {}, {}
    calls = []  # the attention's real compute (sdpa), replays not counted
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for keep, replay in ((True, True), (False, True), (True, False)):  # --recompute-attention, --no-attention-replay
        model = tiny_model(family)
        model.set_attn_implementation("sdpa")
        specs = Plan.uniform(4, group_size=16).resolve(describe(model))
        tails.clear()
        calls.clear()
        quantize_model(model, specs, _windows(model), CalibrationConfig(min_expert_tokens=1, batch_size=3),
                       GPTQConfig(attention_tail=keep, attention_replay=replay), progress=False)
        states[keep, replay] = model.state_dict()
        computed[keep, replay] = len(calls)
        if replay:
            assert (tails.count("o_proj") == len(describe(model).blocks)) if keep else not any(tails)
        else:  # no attention output kept at all: only the experts' down inputs are replayed
            assert len(tails) == sum(b.num_experts for b in describe(model).blocks if b.is_moe) and not any(tails)
    assert computed[True, False] > computed[False, True] > computed[True, True]  # computed on every pass
    assert all(torch.equal(states[True, True][k], states[mode][k]) for mode in states for k in states[True, True])


def test_expert_cache_off_or_partial_gives_the_same_model_and_negative_is_an_error(monkeypatch):
    import quantmoe.quant.pipeline as pipeline

    cached, real = [], pipeline.FrozenOutputs

    def frozen(module, *a, **k):
        cached.append(k.get("method") == "hidden")
        return real(module, *a, **k)

    monkeypatch.setattr(pipeline, "FrozenOutputs", frozen)
    states, counts = [], []
    for cache_mb in (2048, 0.05, 0):  # tiny mixtral (0.09 MB of down inputs per block): all, half, none
        model = tiny_model("mixtral")
        specs = Plan.uniform(4, group_size=16).resolve(describe(model))
        cached.clear()
        quantize_model(model, specs, _windows(model), CalibrationConfig(min_expert_tokens=1, batch_size=3),
                       GPTQConfig(expert_cache_mb=cache_mb), progress=False)
        states.append(model.state_dict())
        counts.append(sum(cached))
    assert counts[0] > counts[1] > counts[2] == 0
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    with pytest.raises(ValueError, match="expert_cache_mb"):
        GPTQConfig(expert_cache_mb=-1)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_every_block_gets_its_own_mask_and_positions(family):
    """GPT-OSS alternates sliding-window and full attention: each block's keyword inputs are what
    the model's own forward passes that block, not block 0's."""
    from quantmoe.quant.pipeline import capture_layer_inputs

    model = tiny_model(family)
    blocks = model.model.layers
    windows = _windows(model, n=4, t=16)  # longer than GPT-OSS's tiny window of 8
    seen = [[] for _ in blocks]
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: seen[i].append((a, k)), with_kwargs=True)
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        for i in range(0, 4, 2):
            model(input_ids=windows[i:i + 2], use_cache=False)
    for h in hooks:
        h.remove()
    captured = capture_layer_inputs(model, blocks, windows, 2, torch.device("cpu"))
    assert len(captured) == len(blocks) and all(len(c) == 2 for c in captured)
    for i in range(len(blocks)):
        for (args, kwargs), (ref_args, ref_kwargs) in zip(captured[i], seen[i]):
            assert kwargs.keys() == ref_kwargs.keys()
            for key, value in kwargs.items():
                ref = ref_kwargs[key]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, ref), (i, key)
                elif isinstance(value, tuple):
                    assert all(torch.equal(a, b) for a, b in zip(value, ref)), (i, key)
            assert torch.equal(args[0], ref_args[0]) if i == 0 else args[0] is None
    assert all(not b._forward_pre_hooks and "forward" not in vars(b) for b in blocks)
    masks = [c[0][1]["attention_mask"] for c in captured]
    if family == "gpt_oss":  # sliding then full attention: the masks differ
        assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
        assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("family,mode", [("qwen2_moe", "routed"), ("deepseek_v3", "weighted"), ("olmoe", "routed")])
def test_experts_calibrated_in_groups_give_the_same_model(family, mode, monkeypatch):
    import quantmoe.calib.hessian as hessian

    collectors, real_init = [], hessian.HessianCollector.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        collectors.append(self)

    monkeypatch.setattr(hessian.HessianCollector, "__init__", init)
    base = tiny_model(family)
    anatomy = describe(base)
    specs = Plan.uniform(4, group_size=16).resolve(anatomy)
    gate_up = [u for u in anatomy.units if u.block == anatomy.blocks[-1].index and u.expert is not None
               and stage_of(u) == stage_of_kind("gate_proj")]
    per_expert = expert_stats_bytes(gate_up)
    gate_kinds = {u.kind for u in gate_up}
    two = 2.5 * max(per_expert.values()) / 2**20  # two experts' gate/up statistics per group
    calib = CalibrationConfig(min_expert_tokens=1, moe_mode=mode, batch_size=3)
    runs = {}
    for label, stats_mb in (("one pass", 0), ("groups", two), ("one expert", 1e-6)):
        model = copy.deepcopy(base)
        collectors.clear()
        report = quantize_model(model, specs, _windows(model), calib, GPTQConfig(expert_stats_mb=stats_mb),
                                progress=False)
        experts = [expert_stats_bytes(c.units) for c in collectors]
        assert all(len(e) <= 1 or sum(e.values()) <= stats_mb * 2**20 for e in experts if stats_mb)  # within budget
        gate_up_passes = [len(e) for c, e in zip(collectors, experts) if any(u.kind in gate_kinds for u in c.units)]
        runs[label] = model.state_dict(), report, gate_up_passes, len(collectors)
        assert all(not c.stats for c in collectors)  # every statistic freed once used
    state, report, experts, passes = runs["one pass"]
    assert max(experts) == len(per_expert)
    assert max(runs["groups"][2]) == 2 and max(runs["one expert"][2]) == 1
    assert passes < runs["groups"][3] < runs["one expert"][3]
    for label in ("groups", "one expert"):
        other_state, other_report = runs[label][:2]
        assert other_report.expert_tokens == report.expert_tokens and other_report.units == report.units
        assert other_state.keys() == state.keys()
        assert all(torch.equal(state[k], other_state[k]) for k in state), label
    groups = stat_groups(gate_up, CalibrationConfig(moe_mode="all"), GPTQConfig(expert_stats_mb=two))
    assert len(groups) == 1  # every expert shares one statistic there
    with pytest.raises(ValueError, match="expert_stats_mb"):
        GPTQConfig(expert_stats_mb=-1)


def test_experts_in_chunks_give_the_same_model(monkeypatch):
    import quantmoe.calib.hessian as hessian
    import quantmoe.quant.pipeline as pipeline

    calls, collectors = [], []
    real, real_init = pipeline.gptq_quantize_batched, hessian.HessianCollector.__init__

    def spy(W, *a, **k):
        calls.append(W.shape[0])
        return real(W, *a, **k)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        collectors.append(self)

    monkeypatch.setattr(pipeline, "gptq_quantize_batched", spy)
    monkeypatch.setattr(hessian.HessianCollector, "__init__", init)
    base = tiny_model("olmoe")  # 8 experts per block
    specs = Plan.uniform(4, group_size=16).resolve(describe(base))
    expert = next(u for u in describe(base).units if u.expert is not None and u.kind == "down_proj")
    two = 2.5 * gptq_working_set((expert.out_features, expert.in_features)) / 2**20  # 2 down_proj
    settings = {"all": GPTQConfig(expert_batch_mb=0), "count": GPTQConfig(expert_chunk=3, expert_batch_mb=0),
                "budget": GPTQConfig(expert_batch_mb=two), "one": GPTQConfig(expert_batch_mb=1e-6)}
    models, batches = {}, {}
    for label, gptq in settings.items():
        model = copy.deepcopy(base)
        calls.clear()
        collectors.clear()
        quantize_model(model, specs, _windows(model), CalibrationConfig(min_expert_tokens=1), gptq, progress=False)
        models[label], batches[label] = model.state_dict(), list(calls)
        assert collectors and all(not c.stats for c in collectors)  # every statistic freed once used
    assert max(batches["all"]) == 8 and max(batches["count"]) == 3 and 2 in batches["count"]
    assert 2 in batches["budget"] and max(batches["budget"]) <= 4 and not batches["one"]
    for label in ("count", "budget", "one"):
        assert models[label].keys() == models["all"].keys()
        assert all(torch.equal(models["all"][k], models[label][k]) for k in models["all"]), label
    with pytest.raises(ValueError, match="expert_chunk"):
        GPTQConfig(expert_chunk=-1)
    with pytest.raises(ValueError, match="expert_batch_mb"):
        GPTQConfig(expert_batch_mb=-1)
