"""describe(): block structure, units and parameter roles for every supported family."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from quantmoe.anatomy import (
    FAMILIES,
    ROLES,
    ModelAnatomy,
    UnsupportedModelError,
    describe,
    describe_config,
    family_of,
    format_anatomy,
    inspect_model,
    tiny_config,
    tiny_model,
    unfuse_experts,
)

FAMILY_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _model(model_type: str) -> nn.Module:
    return tiny_model(model_type)


@functools.cache
def _anatomy(model_type: str) -> ModelAnatomy:
    return describe(_model(model_type))


def _expected_moe(config) -> list[bool]:
    """Which blocks are MoE, re-derived from the config fields independently of specs.py."""
    mt, n = config.model_type, config.num_hidden_layers
    if mt in ("qwen2_moe", "qwen3_moe"):
        return [i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0 for i in range(n)]
    if mt == "deepseek_v3":
        return [i >= config.first_k_dense_replace for i in range(n)]
    return [True] * n


def _meta_model(model_type: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))


def test_families_table_keys_are_model_types():
    assert set(FAMILY_TYPES) <= set(FAMILIES)  # the families these tests re-derive by hand
    assert all(spec.model_type == key for key, spec in FAMILIES.items())


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_role_totals_cover_every_parameter(model_type):
    model, anatomy = _model(model_type), _anatomy(model_type)
    total = sum(p.numel() for p in model.parameters())
    assert anatomy.total_params == total
    assert set(anatomy.role_params) == set(ROLES)
    assert sum(anatomy.role_params.values()) == total
    assert anatomy.quantizable_params == sum(
        anatomy.role_params[r] for r in ("attention", "routed_expert", "shared_expert", "dense_mlp")
    )
    # every quantizable role holds exactly its units' weights plus their biases
    for role in ("attention", "routed_expert", "shared_expert", "dense_mlp"):
        units = anatomy.units_by_role(role)
        expected = sum(u.numel + (u.out_features if u.has_bias else 0) for u in units)
        assert anatomy.role_params[role] == expected, role


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_blocks_match_config(model_type):
    config, anatomy = _model(model_type).config, _anatomy(model_type)
    spec = family_of(config)
    expected = _expected_moe(config)
    assert anatomy.num_blocks == config.num_hidden_layers == len(anatomy.blocks)
    assert [b.is_moe for b in anatomy.blocks] == expected
    if model_type in ("qwen2_moe", "qwen3_moe", "deepseek_v3"):  # the tiny configs exercise dense blocks
        assert not all(expected) and any(expected)
    n_experts, top_k = getattr(config, spec.num_experts_key), config.num_experts_per_tok
    for b in anatomy.blocks:
        assert b.module_name == f"model.layers.{b.index}"
        if b.is_moe:
            assert (b.num_experts, b.top_k) == (n_experts, top_k)
            assert len(b.experts) == n_experts and all(len(ex) == 3 for ex in b.experts)
            assert b.experts_module == f"model.layers.{b.index}.mlp.experts"
            assert b.router is not None and b.dense_mlp == ()
        else:
            assert (b.num_experts, b.top_k, b.experts, b.router, b.shared) == (0, 0, (), None, ())
            assert len(b.dense_mlp) == 3
    moe = [b for b in anatomy.blocks if b.is_moe]
    assert all(len(b.shared) == (3 if spec.shared_expert else 0) for b in moe)
    assert all((b.shared_gate is not None) == (spec.shared_expert_gate is not None) for b in moe)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_units_are_linears_in_unfused_model(model_type):
    anatomy = _anatomy(model_type)
    unfused = unfuse_experts(copy.deepcopy(_model(model_type)))
    assert len({u.name for u in anatomy.units}) == len(anatomy.units)
    for u in anatomy.units:
        linear = unfused.get_submodule(u.name)
        assert isinstance(linear, nn.Linear), u.name
        assert tuple(linear.weight.shape) == (u.out_features, u.in_features), u.name
        assert (linear.bias is not None) == u.has_bias, u.name
        assert u.name.endswith("." + u.kind) and u.block == int(u.name.split(".")[2])
        assert (u.expert is not None) == (u.role == "routed_expert")
    for b in anatomy.blocks:
        for e, names in enumerate(b.experts):
            assert [anatomy.unit(n).expert for n in names] == [e, e, e]
        named = b.attention + b.shared + b.dense_mlp + tuple(n for ex in b.experts for n in ex)
        assert sorted(named) == sorted(u.name for u in anatomy.units if u.block == b.index)
        if b.router:
            assert unfused.get_submodule(b.router) is not None
        if b.shared_gate:
            assert isinstance(unfused.get_submodule(b.shared_gate), nn.Linear)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_describe_agrees_on_fused_unfused_and_meta(model_type):
    anatomy = _anatomy(model_type)
    assert describe(unfuse_experts(copy.deepcopy(_model(model_type)))) == anatomy
    meta = _meta_model(model_type)
    assert next(meta.parameters()).is_meta
    assert describe(meta) == anatomy
    assert describe(unfuse_experts(meta)) == anatomy  # the per-expert view also works without weights


def test_deepseek_attention_follows_q_lora_rank():
    with_lora = _anatomy("deepseek_v3").blocks[0].attention
    assert [n.rsplit(".", 1)[1] for n in with_lora] == [
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
    ]  # fmt: skip
    without = describe(_meta_model("deepseek_v3", q_lora_rank=None)).blocks[0].attention
    assert [n.rsplit(".", 1)[1] for n in without] == ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def test_family_specific_roles():
    gpt = _anatomy("gpt_oss")
    cfg = _model("gpt_oss").config
    assert gpt.role_params["other"] == cfg.num_hidden_layers * cfg.num_attention_heads  # attention sinks
    assert all(u.has_bias for u in gpt.units)
    assert gpt.role_params["router"] == cfg.num_hidden_layers * cfg.num_local_experts * (cfg.hidden_size + 1)
    qwen2 = _anatomy("qwen2_moe")
    n_moe = sum(b.is_moe for b in qwen2.blocks)
    assert qwen2.role_params["shared_expert_gate"] == n_moe * _model("qwen2_moe").config.hidden_size
    assert _anatomy("mixtral").role_params["shared_expert"] == 0


def test_unit_lookup_errors():
    anatomy = _anatomy("mixtral")
    assert anatomy.unit("model.layers.1.mlp.experts.3.down_proj").in_features == 48
    with pytest.raises(KeyError, match="did you mean"):
        anatomy.unit("model.layers.1.mlp.experts.3.down_prj")
    with pytest.raises(ValueError, match="roles are"):
        anatomy.units_by_role("experts")


def test_unknown_family_raises_with_the_list():
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128)  # fmt: skip
    with pytest.raises(UnsupportedModelError) as info:
        family_of(config)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'llama'" in message and "docs/adding-a-family.md" in message
    assert all(mt in message for mt in FAMILY_TYPES)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError):
        describe(model)


def test_full_size_configs_on_meta():
    """Published parameter counts, from configs alone (no weights)."""
    mixtral = describe_config(AutoConfig.for_model("mixtral"))  # Mixtral-8x7B defaults
    assert mixtral.total_params == 46_702_792_704
    assert len(mixtral.units) == 32 * (4 + 8 * 3)
    deepseek = describe_config(AutoConfig.for_model("deepseek_v3"))  # DeepSeek-V3 without the MTP layer
    assert deepseek.total_params == 671_026_404_352
    assert [b.is_moe for b in deepseek.blocks[:4]] == [False, False, False, True]


def test_format_anatomy_report():
    anatomy = _anatomy("qwen2_moe")
    text = format_anatomy(anatomy)
    assert "qwen2_moe" in text and "3 (2 MoE, 1 dense [0])" in text and "top-k 2" in text
    assert "shared_expert_gate" in text
    for role in ROLES:
        assert any(line.startswith(role) for line in text.splitlines()), role
    assert text.splitlines()[-1] == f"sum of roles {anatomy.total_params:,} = model parameters {anatomy.total_params:,}"


def test_inspect_model_from_local_dir(tmp_path):
    tiny_config("olmoe").save_pretrained(tmp_path)
    assert inspect_model(str(tmp_path)) == _anatomy("olmoe")


@pytest.mark.parametrize("field", ["full_precision", "outside_full_precision"])
def test_a_full_precision_path_the_model_lacks_is_named(monkeypatch, field):
    from dataclasses import replace

    from quantmoe.anatomy import families

    model = tiny_model("qwen4_exp_text")
    describe(model)  # the declared paths exist
    spec = families.FAMILIES["qwen4_exp_text"]
    monkeypatch.setitem(families.FAMILIES, "qwen4_exp_text", replace(spec, **{field: ("no_such_module",)}))
    with pytest.raises(ValueError, match=f"no `no_such_module`; check `{field}`"):
        describe(model)
