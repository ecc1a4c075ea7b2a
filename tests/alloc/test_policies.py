"""Policy rules, their composition into plans, parsing, and the `quantmoe plan` command."""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest

from quantmoe.alloc.cli import add_plan_parser
from quantmoe.alloc.plan_from_bits import plan_from_bits
from quantmoe.alloc.policies import assign_bits, build_plan, policy_needs
from quantmoe.alloc.predictor import BlockImportance
from quantmoe.alloc.presets import format_policy, parse_policy
from quantmoe.alloc.scorers import Evidence, ExpertScores
from quantmoe.anatomy import describe_config, tiny_config
from quantmoe.calib.routing import RoutingStats
from quantmoe.quant.plan import Plan

PLACEHOLDER = Evidence(placeholder=True)


@pytest.fixture(scope="module")
def mixtral():  # 2 MoE blocks of 4 experts
    return describe_config(tiny_config("mixtral"))


@pytest.fixture(scope="module")
def deepseek():  # block 0 dense; blocks 1, 2 MoE with 8 experts and a shared expert
    return describe_config(tiny_config("deepseek_v3"))


def bits_of(policy: str, anatomy, evidence: Evidence = PLACEHOLDER) -> dict[str, int]:
    return assign_bits(parse_policy(policy), anatomy, evidence)


def expert_bits(bits, block) -> list[int]:
    """Per expert of a block, its bits (asserting gate/up/down agree)."""
    out = []
    for names in block.experts:
        values = {bits[n] for n in names}
        assert len(values) == 1
        out.append(values.pop())
    return out


def routing(anatomy, counts: dict[int, list[int]]) -> RoutingStats:
    return RoutingStats(tokens=100, top_k={b: 2 for b in counts},
                        counts={b: np.array(c) for b, c in counts.items()},
                        weight_sums={b: np.array(c, dtype=float) * 0.5 for b, c in counts.items()})


def test_roles_and_later_rules_override_earlier_ones(deepseek):
    bits = bits_of("uniform=2,attention=4,shared=8", deepseek)
    by_role = {u.role: bits[u.name] for u in deepseek.units}
    assert by_role == {"attention": 4, "dense_mlp": 4, "shared_expert": 8, "routed_expert": 2}
    assert set(bits_of("experts=4,uniform=2", deepseek).values()) == {2}
    assert {bits_of("uniform=4,experts=2", deepseek)[u.name] for u in deepseek.units_by_role("routed_expert")} == {2}
    assert {bits_of("uniform=2,dense=8", deepseek)[u.name] for u in deepseek.units_by_role("dense_mlp")} == {8}


def test_uncovered_linears_are_an_error_naming_the_rule_to_add(deepseek):
    with pytest.raises(ValueError, match="shared_expert.*shared=B"):
        bits_of("experts=2,attention=4", deepseek)


def test_topk_picks_the_most_frequent_experts_per_block(mixtral):
    stats = routing(mixtral, {0: [5, 9, 1, 7], 1: [3, 3, 8, 0]})
    bits = bits_of("experts=2,attention=4,topk=2:8", mixtral, Evidence(routing=stats))
    assert expert_bits(bits, mixtral.blocks[0]) == [2, 8, 2, 8]
    assert expert_bits(bits, mixtral.blocks[1]) == [8, 2, 8, 2]  # a tie keeps expert order


def test_global_ranks_experts_across_blocks(mixtral):
    stats = routing(mixtral, {0: [10, 0, 0, 0], 1: [4, 3, 2, 1]})
    bits = bits_of("uniform=2,global=2:4", mixtral, Evidence(routing=stats))
    assert expert_bits(bits, mixtral.blocks[0]) == [4, 2, 2, 2]
    assert expert_bits(bits, mixtral.blocks[1]) == [4, 2, 2, 2]
    wanda = ExpertScores("wanda", {0: np.array([0.0, 1, 2, 3]), 1: np.array([9.0, 0, 0, 0])})
    bits = bits_of("uniform=2,global=2:8:wanda", mixtral, Evidence(wanda=wanda))
    assert expert_bits(bits, mixtral.blocks[0]) == [2, 2, 2, 8] and expert_bits(bits, mixtral.blocks[1])[0] == 8


def test_randomk_is_seeded_and_moves_whole_experts(deepseek):
    moe = [b for b in deepseek.blocks if b.is_moe]
    a = bits_of("uniform=2,randomk=3:4:7", deepseek)
    assert a == bits_of("uniform=2,randomk=3:4:7", deepseek)
    assert all(expert_bits(a, b).count(4) == 3 for b in moe)
    draws = {tuple(expert_bits(bits_of(f"uniform=2,randomk=3:4:{s}", deepseek), moe[0])) for s in range(6)}
    assert len(draws) > 1


def test_first_and_last_count_moe_blocks_only(deepseek):
    b1, b2 = deepseek.blocks[1], deepseek.blocks[2]
    first = bits_of("uniform=2,first=1:4", deepseek)
    assert set(expert_bits(first, b1)) == {4} and set(expert_bits(first, b2)) == {2}
    last = bits_of("uniform=2,last=1:4", deepseek)
    assert set(expert_bits(last, b1)) == {2} and set(expert_bits(last, b2)) == {4}


def test_kind_rule_with_and_without_role(deepseek):
    bits = bits_of("uniform=2,kind=down_proj:8", deepseek)
    assert {u.role for u in deepseek.units if bits[u.name] == 8} == {"routed_expert", "shared_expert", "dense_mlp"}
    bits = bits_of("uniform=2,kind=down_proj:8:experts", deepseek)
    assert {u.role for u in deepseek.units if bits[u.name] == 8} == {"routed_expert"}
    with pytest.raises(ValueError, match="did you mean 'down_proj'"):
        bits_of("uniform=2,kind=dwn_proj:8", deepseek)


def test_outlier_and_importance_rank_by_their_evidence(deepseek):
    names = [u.name for u in deepseek.units if u.role == "routed_expert"]
    scores = {n: float(i == 5) for i, n in enumerate(names)}
    bits = bits_of("uniform=2,outlier=1:8", deepseek, Evidence(outlier=scores))  # 1% of 48 linears -> 1
    assert [n for n in names if bits[n] == 8] == [names[5]]
    result = BlockImportance(predicted={1: 0.9, 2: 0.5}, measured={1: 0.4, 2: 0.8}, spearman=-1.0,
                             val_mse={1: 0.0, 2: 0.0}, epochs={1: 1, 2: 1})
    for source, block in (("predicted", 2), ("measured", 1)):
        bits = bits_of(f"uniform=2,importance=1:4:{source}", deepseek, Evidence(importance=result))
        assert set(expert_bits(bits, deepseek.blocks[block])) == {4}
        assert set(expert_bits(bits, deepseek.blocks[3 - block])) == {2}


def test_missing_evidence_is_a_clear_error(mixtral):
    with pytest.raises(ValueError, match="needs routing statistics.*--bits-only"):
        bits_of("uniform=2,topk=1:4", mixtral, Evidence())
    assert policy_needs(parse_policy("uniform=2,topk=1:4,global=3:4:wanda,outlier=5:4,topk=2:8")) == [
        "routing", "wanda", "outlier"]


@pytest.mark.parametrize("policy, message", [
    ("uniform=2,topkk=1:4", "unknown policy rule 'topkk'; did you mean 'topk'"),
    ("experts=5", "check `bits` of rule 'experts': 5 is not one of 2, 3, 4, 8, 16"),
    ("uniform=2,topk=3", "`bits` is missing; write it as topk=K:BITS"),
    ("uniform=2,topk=1:4:9", "does not fit topk=K:BITS"),
    ("uniform=2,topk=x:4", "`k` of rule 'topk': 'x' is not an integer"),
    ("uniform=2,global=2:4:wandaa", "did you mean 'wanda'"),
    ("uniform=2,outlier=0:4", r"not in \(0, 100\]"),
    ("experts 2", "should look like name=value"),
    ("uniform=2,pattern=(:4", "not a regular expression"),
])
def test_bad_policies_get_clear_errors(policy, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(policy)


@pytest.mark.parametrize("policy, message", [
    ("uniform=2,topk=5:4", "`k` of rule 'topk': 5 is more than the experts of a block"),
    ("uniform=2,randomk=5:4", "5 is more than"),
    ("uniform=2,first=3:4", "3 is more than the 2 MoE blocks"),
    ("uniform=2,global=9:4", "9 is more than the 8 routed experts"),
    (r"uniform=2,pattern=.*\.w1:4", "matches no quantizable linear"),
])
def test_rules_that_do_not_fit_the_model_are_errors(policy, message, mixtral):
    with pytest.raises(ValueError, match=message):
        bits_of(policy, mixtral)


def test_compact_and_yaml_forms_agree(tmp_path, deepseek):
    compact = r"experts=2,shared=8,attention=4,topk=3:4,randomk=1:8:3,kind=down_proj:3:shared,pattern=.*\.o_proj:16"
    assert format_policy(parse_policy(compact)) == compact
    path = tmp_path / "policy.yaml"
    path.write_text("- experts: 2\n- shared: 8\n- attention: 4\n- topk: {k: 3, bits: 4}\n- randomk: '1:8:3'\n"
                    "- kind: {kind: down_proj, bits: 3, role: shared}\n- pattern: {pattern: '.*\\.o_proj', bits: 16}\n")
    assert parse_policy(str(path)) == parse_policy(compact)
    with pytest.raises(ValueError, match="unknown field 'bit'; did you mean 'bits'"):
        parse_policy([{"topk": {"k": 3, "bit": 4}}])


def test_plan_is_exact_compact_and_survives_yaml(tmp_path, deepseek):
    stats = routing(deepseek, {1: [1, 2, 3, 4, 5, 6, 7, 8], 2: [8, 7, 6, 5, 4, 3, 2, 1]})
    rules = parse_policy("experts=2,shared=8,attention=4,topk=3:4,first=1:3,kind=up_proj:8:experts")
    bits = assign_bits(rules, deepseek, Evidence(routing=stats))
    plan = build_plan(rules, deepseek, Evidence(routing=stats), group_size=64)
    assert {n: s.bits for n, s in plan.resolve(deepseek).items()} == bits
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    assert Plan.from_yaml(path).resolve(deepseek) == plan.resolve(deepseek)
    up = plan_from_bits(deepseek, bits_of("experts=2,shared=8,attention=4,kind=up_proj:8:experts", deepseek))
    assert up.kinds == {"up_proj": {"bits": 8}} and up.modules == {"model.layers.0.mlp.up_proj": {"bits": 4}}
    base = bits_of("experts=2,shared=8,attention=4", deepseek)
    single = dict(base, **{deepseek.blocks[2].experts[0][2]: 16})  # one linear alone -> a module entry
    assert plan_from_bits(deepseek, single).modules == {deepseek.blocks[2].experts[0][2]: {"bits": 16}}
    top = plan_from_bits(deepseek, bits_of("uniform=2,randomk=2:4", deepseek))
    assert len(top.patterns) == 2 and not top.modules  # whole experts -> a pattern per block


def run_plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_plan_command_on_paper_shapes(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert run_plan(["deepseek-moe-16b", "--policy", "deepseek-shared8-top30", "--bits-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "average bits 3.1215" in text and "effective bits" in text
    assert "\n      1  4     -     8      " + "4" * 30 + "2" * 34 in text
    assert Plan.from_yaml(out).default.group_size == 64
    with pytest.raises(ValueError, match="needs routing statistics"):
        run_plan(["deepseek-moe-16b", "--policy", "deepseek-shared8-top30"])


def test_plan_command_computes_routing_once_and_reuses_it(tmp_path, capsys, caplog):
    from transformers import AutoTokenizer

    from quantmoe.anatomy import tiny_model
    from quantmoe.models import embedded_root

    folder = tmp_path / "tiny"
    tiny_model("mixtral", vocab_size=8192).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_root() / "tokenizer").save_pretrained(folder)
    argv = [str(folder), "--policy", "experts=2,attention=4,topk=1:8", "--windows", "2", "--seq-len", "16",
            "--cache-dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.INFO, logger="quantmoe.alloc.evidence"):
        assert run_plan(argv) == 0
        first = capsys.readouterr().out
        assert run_plan(argv) == 0
    assert len(list((tmp_path / "cache").rglob("routing-*.json"))) == 1
    assert "reusing" in caplog.text and capsys.readouterr().out == first
