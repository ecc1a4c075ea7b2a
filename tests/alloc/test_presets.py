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


# uniform=b gives b bits whatever the weighting: it proves nothing about the paper's figures
@pytest.mark.parametrize("name", [n for n, p in PRESETS.items()
                                  if p.paper_bits is not None and not p.policy.startswith("uniform=")])
def test_preset_reproduces_paper_average_bits(name):
    preset = PRESETS[name]
    assert average_bits(preset.policy, preset.model, preset.group_size) == pytest.approx(preset.paper_bits,
                                                                                          abs=TOLERANCE)


# Parameter counts written out from the published architectures, not read from the code:
# DeepSeek-MoE-16B: hidden 2048, 28 blocks, attention 4 h^2 each, block 0 a dense MLP of 10944,
# blocks 1-27 64 routed experts of 1408 and 2 shared experts (one MLP of 2816).
_H = 2048
DS = {"attention": 28 * 4 * _H * _H, "dense": 3 * _H * 10944, "routed": 27 * 64 * 3 * _H * 1408,
      "shared": 27 * 3 * _H * 2816}
# Mixtral-8x7B: hidden 4096, 32 blocks, q/o 4096x4096, k/v 1024x4096 (8 KV heads of 128), 8 experts of 14336.
_M = 4096
MX = {"attention": 32 * (2 * _M * _M + 2 * 1024 * _M), "expert_block": 8 * 3 * _M * 14336}


def _weighted(pairs: list[tuple[int, int]]) -> float:
    """sum(bits x params) / sum(params) of (bits, params) pairs."""
    return sum(b * n for b, n in pairs) / sum(n for _, n in pairs)


@pytest.mark.parametrize(("policy", "expected"), [
    ("experts=2,shared=2,attention=4",
     _weighted([(4, DS["attention"] + DS["dense"]), (2, DS["routed"]), (2, DS["shared"])])),
    ("experts=2,shared=4,attention=4",
     _weighted([(4, DS["attention"] + DS["dense"]), (2, DS["routed"]), (4, DS["shared"])])),
    ("experts=2,shared=8,attention=4",
     _weighted([(4, DS["attention"] + DS["dense"]), (2, DS["routed"]), (8, DS["shared"])])),
    ("experts=3,attention=4,shared=16", _weighted([(4, DS["attention"] + DS["dense"]), (3, DS["routed"]),
                                                  (16, DS["shared"])])),
])
def test_deepseek_average_bits_equal_the_parameter_weighted_mean(policy, expected):
    assert average_bits(policy, "deepseek-moe-16b", 64) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("first", [0, 4, 8])
def test_mixtral_average_bits_equal_the_parameter_weighted_mean(first):
    policy = "experts=2,attention=4" + (f",first={first}:4" if first else "")
    expected = _weighted([(4, MX["attention"]), (4, first * MX["expert_block"]),
                          (2, (32 - first) * MX["expert_block"])])
    assert average_bits(policy, "mixtral-8x7b") == pytest.approx(expected, rel=1e-12)


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
