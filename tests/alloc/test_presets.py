"""The paper's configurations reproduce its average bits on meta-device configs of its models."""

from __future__ import annotations

import functools

import pytest

from quantmoe.alloc.policies import build_plan
from quantmoe.alloc.presets import PRESETS, format_policy, paper_config, parse_policy
from quantmoe.alloc.scorers import Evidence
from quantmoe.anatomy import describe_config
from quantmoe.quant.plan import bit_stats

TOLERANCE = 0.005  # the paper's figures are rounded to 2-3 decimals


@functools.cache
def anatomy_of(model: str):
    return describe_config(paper_config(model))


def average_bits(policy: str, model: str, group_size: int = 128) -> float:
    anatomy = anatomy_of(model)
    plan = build_plan(parse_policy(policy), anatomy, Evidence(placeholder=True), group_size=group_size)
    return bit_stats(plan.resolve(anatomy), anatomy.units).average_bits


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.paper_bits is not None])
def test_preset_reproduces_paper_average_bits(name):
    preset = PRESETS[name]
    assert average_bits(preset.policy, preset.model, preset.group_size) == pytest.approx(preset.paper_bits,
                                                                                          abs=TOLERANCE)


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.model == "deepseek-moe-16b"])
def test_deepseek_figures_do_not_depend_on_the_family_used_for_its_shapes(name):
    policy = PRESETS[name].policy
    assert average_bits(policy, "deepseek-moe-16b") == pytest.approx(average_bits(policy, "deepseek-moe-16b-qwen2"),
                                                                     abs=1e-12)


def test_deepseek_shapes_are_those_of_deepseek_moe_16b():
    anatomy = anatomy_of("deepseek-moe-16b")
    h = 2048
    per_role = {r: sum(u.numel for u in anatomy.units if u.role == r and u.block == 1)
                for r in ("attention", "routed_expert", "shared_expert")}
    assert per_role == {"attention": 4 * h * h, "routed_expert": 64 * 3 * h * 1408, "shared_expert": 3 * h * 2816}
    assert anatomy.num_blocks == 28 and not anatomy.blocks[0].is_moe
    assert sum(u.numel for u in anatomy.units if u.role == "dense_mlp") == 3 * h * 10944
    assert all(b.num_experts == 64 and b.top_k == 6 for b in anatomy.blocks[1:])


def test_mixtral_shapes_are_mixtral_8x7b():
    anatomy = anatomy_of("mixtral-8x7b")
    assert anatomy.num_blocks == 32 and all(b.num_experts == 8 and b.top_k == 2 for b in anatomy.blocks)
    assert sum(u.numel for u in anatomy.units) == pytest.approx(46.44e9, rel=1e-3)


def test_more_experts_at_4_bits_cost_more_bits():
    bits = [average_bits(PRESETS[f"deepseek-shared8-top{k}"].policy, "deepseek-moe-16b", 64)
            for k in (1, 5, 10, 20, 25, 30, 45)]
    assert bits == sorted(bits)


def test_preset_by_name_and_as_item():
    name = "deepseek-shared8-top30"
    assert parse_policy(name) == parse_policy(PRESETS[name].policy)
    assert format_policy(parse_policy(f"preset={name},outlier=10:8")) == PRESETS[name].policy + ",outlier=10:8"


def test_unknown_preset_says_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'deepseek-shared8-top30'"):
        parse_policy("preset=deepseek-shared8-top03")
    with pytest.raises(ValueError, match="did you mean 'mixtral-experts2-attn4'"):
        parse_policy("mixtral-experts2-attn")
