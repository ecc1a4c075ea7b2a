import json
import re

import numpy as np
import pytest
import torch

import quantmoe
from quantmoe.alloc.damage import DamageTable
from quantmoe.alloc.solver import SolverConfig, solve
from quantmoe.anatomy import describe, tiny_model, unfuse_experts
from quantmoe.calib.data import CalibrationConfig
from quantmoe.export import engines
from quantmoe.export.dynamic import GPTQFormat, dynamic_map, resolve
from quantmoe.export.names import checkpoint_names
from quantmoe.export.reader import load_gptq
from quantmoe.export.writer import EXPORT_META, INDEX, export_tensors, write_export
from quantmoe.quant.pipeline import quantize_model
from quantmoe.quant.plan import Plan

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]


def _quantized(family, plan_dict=None, **kw):
    model = tiny_model(family, **kw)
    anatomy = describe(model)
    first_expert = next(u.name for u in anatomy.units if u.role == "routed_expert")
    plan_dict = plan_dict or {"default": {"bits": 4, "group_size": 16}, "roles": {"attention": {"bits": 8}},
                              "kinds": {"down_proj": {"bits": 8, "symmetric": False}},
                              "modules": {first_expert: {"bits": 16}}}
    specs = Plan.from_dict(plan_dict).resolve(anatomy)
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), progress=False)
    return model, specs, windows


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_with_identical_logits(tmp_path, family):
    model, specs, windows = _quantized(family)
    with torch.no_grad():
        ref = model(input_ids=windows).logits
    for target in (None, "gptqmodel"):
        out = write_export(model, specs, tmp_path / f"x-{target}", target=target)
        cfg = json.loads((out / "config.json").read_text())
        qc = cfg["quantization_config"]
        assert (qc["quant_method"], qc["checkpoint_format"], qc["desc_act"]) == ("gptq", "gptq", False)
        assert json.loads((out / "quantize_config.json").read_text()) == qc
        assert any(k.startswith("-:") for k in qc["dynamic"])  # the 16-bit expert linear
        loaded = load_gptq(out, attn_implementation="eager")
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=windows).logits, ref), target


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "qwen3_moe"])
def test_checkpoint_names_are_what_save_pretrained_writes(tmp_path, family):
    fused = tiny_model(family)
    fused.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        saved = set(fh.keys())
    view = unfuse_experts(fused)
    names = checkpoint_names(view)
    anatomy = describe(view)
    units = {u.name for u in anatomy.units}
    mapped = {names[u.name] + leaf for u in anatomy.units for leaf in (".weight", ".bias")[:1 + u.has_bias]}
    unit_prefixes = tuple(f"{u}." for u in units)
    mapped |= {names[k] for k in view.state_dict() if not k.startswith(unit_prefixes)}
    assert mapped == saved


def test_hub_names_of_mixtral_deepseek_and_qwen2():
    mixtral = checkpoint_names(unfuse_experts(tiny_model("mixtral")))
    assert mixtral["model.layers.1.mlp.experts.2.up_proj"] == "model.layers.1.block_sparse_moe.experts.2.w3"
    assert mixtral["model.layers.1.mlp.experts.2.down_proj"] == "model.layers.1.block_sparse_moe.experts.2.w2"
    assert mixtral["model.layers.1.mlp.gate.weight"] == "model.layers.1.block_sparse_moe.gate.weight"
    deepseek = checkpoint_names(unfuse_experts(tiny_model("deepseek_v3")))
    assert deepseek["model.layers.1.mlp.shared_experts.up_proj"] == "model.layers.1.mlp.shared_experts.up_proj"
    qwen = checkpoint_names(unfuse_experts(tiny_model("qwen2_moe")))
    assert qwen["model.layers.1.mlp.shared_expert.down_proj"] == "model.layers.1.mlp.shared_expert.down_proj"


def _want(model, plan_dict):
    anatomy = describe(model)
    names = checkpoint_names(model)
    specs = Plan.from_dict(plan_dict).resolve(anatomy)
    return anatomy.units, names, {names[u.name]: GPTQFormat.of(specs[u.name], u.in_features) for u in anatomy.units}


@pytest.mark.parametrize(("plan", "rules"), [
    ({"default": {"bits": 4}}, 0),
    ({"default": {"bits": 2}, "roles": {"attention": {"bits": 4}}}, 1),
    ({"default": {"bits": 2}, "roles": {"attention": {"bits": 4}}, "kinds": {"down_proj": {"bits": 3}}}, 2),
    ({"default": {"bits": 2}, "patterns": [{"pattern": r"model\.layers\.1\.mlp\.experts\.[02]\..*", "bits": 4}]}, 2),
    ({"default": {"bits": 2}, "patterns": [{"pattern": r"model\.layers\.0\..*", "bits": 8}],
      "modules": {"model.layers.1.self_attn.o_proj": {"bits": 16}}}, 3),  # no pattern may match block 0's router
])
def test_dynamic_map_is_small_and_reproduces_the_plan(plan, rules):
    model = unfuse_experts(tiny_model("mixtral", num_hidden_layers=3))
    units, names, want = _want(model, plan)
    base, dynamic = dynamic_map(units, names, want)
    assert len(dynamic) == rules, dynamic
    assert all(resolve(dynamic, base, names[u.name]) == want[names[u.name]] for u in units)


def test_dynamic_map_of_random_per_module_plans():
    model = unfuse_experts(tiny_model("deepseek_v3"))
    anatomy = describe(model)
    rng = np.random.default_rng(0)
    for _ in range(5):
        modules = {u.name: {"bits": int(rng.choice([2, 4, 8, 16])), "symmetric": bool(rng.integers(2))}
                   for u in anatomy.units}
        units, names, want = _want(model, {"default": {"bits": 4}, "modules": modules})
        base, dynamic = dynamic_map(units, names, want)
        for u in units:  # each module with GPTQModel's and vLLM's reading: the first re.match wins
            assert resolve(dynamic, base, names[u.name]) == want[names[u.name]]
        for pattern in dynamic:  # every pattern is a regex (GPTQModel reads literal patterns as exact names)
            assert re.search(r"\$$", pattern)


def test_vllm_refuses_two_widths_in_one_layers_experts_and_gptqmodel_exports(tmp_path):
    plan = {"default": {"bits": 4, "group_size": 16}, "modules": {"model.layers.1.mlp.experts.2.down_proj": {"bits": 8}}}
    model, specs, windows = _quantized("mixtral", plan)
    units = describe(model).units
    with pytest.raises(engines.ServingError, match=r"model\.layers\.1\.mlp\.experts: its routed experts mix formats"):
        engines.check(units, specs, "vllm")
    with pytest.raises(engines.ServingError, match="--granularity block"):
        write_export(model, specs, tmp_path / "v", target="vllm")
    assert not (tmp_path / "v").exists()
    out = write_export(model, specs, tmp_path / "g", target="gptqmodel")
    with torch.no_grad():
        assert torch.equal(load_gptq(out, attn_implementation="eager")(input_ids=windows).logits,
                           model(input_ids=windows).logits)
    assert engines.problems(units, specs, "gptqmodel") == []


def test_vllm_rules_widths_fused_linears_and_group_sizes():
    model = unfuse_experts(tiny_model("deepseek_v3"))
    units = describe(model).units
    ok = Plan.from_dict({"default": {"bits": 4, "group_size": 16}, "roles": {"attention": {"bits": 8}}}).resolve(
        describe(model))
    assert engines.problems(units, ok, "vllm") == []
    two_bit_experts = Plan.from_dict({"default": {"bits": 2, "group_size": 16}}).resolve(describe(model))
    assert any("4 or 8 bits symmetric" in p.reason for p in engines.problems(units, two_bit_experts, "vllm"))
    split_qa = Plan.from_dict({"default": {"bits": 4, "group_size": 16},
                               "kinds": {"q_a_proj": {"bits": 8}}}).resolve(describe(model))
    assert any("q_a_proj/kv_a_proj_with_mqa" in p.reason for p in engines.problems(units, split_qa, "vllm"))
    assert engines.problems(units, split_qa, "gptqmodel") == []


def test_solver_block_granularity_plans_pass_the_vllm_check():
    model = unfuse_experts(tiny_model("deepseek_v3"))
    anatomy = describe(model)
    rng = np.random.default_rng(0)
    names = tuple(u.name for u in anatomy.units)
    table = DamageTable(units=names, widths=(4, 8), damage=np.sort(rng.random((len(names), 2)), axis=1)[:, ::-1].copy(),
                        params=np.array([u.numel for u in anatomy.units], dtype=float), metric="test")
    for target in (5.0, 6.0, 7.0):
        config = SolverConfig(budget="average", target_bits=target, widths=(4, 8), granularity="block", tolerance=0.9)
        sol = solve(anatomy, table, config, group_size=None)
        specs = sol.plan.resolve(anatomy)
        assert engines.problems(anatomy.units, specs, "vllm") == [], target
        linear = solve(anatomy, table, SolverConfig(budget="average", target_bits=target, widths=(4, 8), tolerance=0.9), group_size=None)
        mixed = any(len({linear.bits[n] for e in b.experts for n in e}) > 1 for b in anatomy.blocks if b.experts)
        assert not mixed or engines.problems(anatomy.units, linear.plan.resolve(anatomy), "vllm")


def test_exported_bytes_are_within_3_percent_of_theory(tmp_path):
    from quantmoe.models import load_model

    model, _ = load_model("mixtral-s")
    plan = Plan.from_dict({"default": {"bits": 2, "group_size": 128}, "roles": {"attention": {"bits": 4}},
                           "kinds": {"down_proj": {"bits": 3}},
                           "modules": {"model.layers.0.self_attn.q_proj": {"bits": 16}}})
    anatomy = describe(model)
    specs = plan.resolve(anatomy)
    windows = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    from quantmoe.quant.pipeline import GPTQConfig

    quantize_model(model, specs, windows, CalibrationConfig(min_expert_tokens=1), GPTQConfig(method="rtn"),
                   progress=False)
    out = write_export(model, specs, tmp_path / "x")
    raw = (out / "model.safetensors").read_bytes()
    data = len(raw) - 8 - int.from_bytes(raw[:8], "little")
    theory = 0.0
    unit_prefixes = tuple(f"{u.name}." for u in anatomy.units)
    for u in anatomy.units:
        s = specs[u.name]
        if s.keep:
            theory += u.numel * 2  # bfloat16, the source dtype
            continue
        groups = s.groups(u.in_features)
        bits = u.numel * s.bits + groups * u.out_features * (16 + s.bits)  # codes + fp16 scales + zeros
        theory += bits / 8 + u.in_features * 4  # + g_idx, one int32 per input column
    theory += sum(t.numel() * 2 for k, t in model.state_dict().items() if not k.startswith(unit_prefixes))
    assert abs(data / theory - 1) < 0.03


def test_sharded_export_has_an_index_and_reloads(tmp_path):
    model, specs, windows = _quantized("qwen2_moe")
    out = write_export(model, specs, tmp_path / "x", max_shard_bytes=40_000)
    index = json.loads((out / INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert not (out / "model.safetensors").exists()
    tensors, _ = export_tensors(model, specs)
    assert set(index["weight_map"]) == set(tensors)
    with torch.no_grad():
        assert torch.equal(load_gptq(out, attn_implementation="eager")(input_ids=windows).logits,
                           model(input_ids=windows).logits)


def test_export_never_overwrites_a_foreign_folder(tmp_path):
    model, specs, _ = _quantized("olmoe")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a quantmoe export"):
        write_export(model, specs, foreign)
    assert (foreign / "notes.txt").read_text() == "keep"
    out = write_export(model, specs, tmp_path / "x")
    (out / "stale.txt").write_text("old")
    write_export(model, specs, out)  # an earlier export is replaced as a whole
    assert (out / EXPORT_META).exists() and not (out / "stale.txt").exists()


def test_unstorable_width_is_an_error_naming_the_module(tmp_path):
    model, specs, _ = _quantized("qwen2_moe", {"default": {"bits": 4, "group_size": 16},
                                               "kinds": {"down_proj": {"bits": 3}}})
    with pytest.raises(engines.ServingError, match=r"down_proj: cannot be stored in the GPTQ format"):
        write_export(model, specs, tmp_path / "x")
    assert quantmoe  # the package imports without the export subpackage's optional parts


def test_transformers_target_is_refused_for_moe_models_with_the_reason(tmp_path):
    model, specs, _ = _quantized("olmoe")
    with pytest.raises(engines.ServingError, match="replaces nn.Linear modules only"):
        write_export(model, specs, tmp_path / "x", target="transformers")
    report = engines.format_servable(describe(model).units, specs)
    assert "gptqmodel    yes" in report and "transformers no: routed experts" in report


def test_reader_splits_dense_fused_experts(tmp_path):
    from safetensors.torch import load_file, save_file

    model, specs, windows = _quantized("qwen3_moe", {"default": {"bits": 4, "group_size": 16},
                                                      "roles": {"routed_expert": {"bits": 16}}})
    out = write_export(model, specs, tmp_path / "x")
    tensors = load_file(str(out / "model.safetensors"))
    experts = "model.layers.1.mlp.experts"
    count = model.config.num_experts
    gate_up = [torch.cat([tensors.pop(f"{experts}.{e}.gate_proj.weight"), tensors.pop(f"{experts}.{e}.up_proj.weight")])
               for e in range(count)]
    tensors[f"{experts}.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, H): transformers' own layout
    tensors[f"{experts}.down_proj"] = torch.stack([tensors.pop(f"{experts}.{e}.down_proj.weight") for e in range(count)])
    save_file(tensors, str(out / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(load_gptq(out, attn_implementation="eager")(input_ids=windows).logits,
                           model(input_ids=windows).logits)
