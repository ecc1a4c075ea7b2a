import pytest

from quantmoe.anatomy import describe, tiny_model
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.plan import Plan, bit_stats, effective_bits_of


@pytest.fixture(scope="module")
def anatomy():
    return describe(tiny_model("deepseek_v3"))


def test_precedence_default_role_kind_pattern_name(anatomy):
    expert_down = next(u for u in anatomy.units if u.expert == 1 and u.kind == "down_proj")
    expert_up = next(u for u in anatomy.units if u.expert == 1 and u.kind == "up_proj")
    attn = anatomy.units_by_role("attention")[0]
    plan = Plan.from_dict({
        "default": {"bits": 2, "group_size": None},
        "roles": {"attention": {"bits": 8}, "routed_expert": {"bits": 3}},
        "kinds": {"down_proj": {"bits": 4}},
        "patterns": [{"pattern": r".*experts\.1\.(up|down)_proj", "bits": 8, "symmetric": False}],
        "modules": {expert_down.name: {"bits": 16}},
    })
    specs = plan.resolve(anatomy)
    assert specs[attn.name] == QuantSpec(bits=8, group_size=None)
    assert specs[expert_up.name] == QuantSpec(bits=8, group_size=None, symmetric=False)
    assert specs[expert_down.name].bits == 16
    other_down = next(u for u in anatomy.units if u.expert == 0 and u.kind == "down_proj")
    assert specs[other_down.name].bits == 4
    other_gate = next(u for u in anatomy.units if u.expert == 0 and u.kind == "gate_proj")
    assert specs[other_gate.name].bits == 3


def test_yaml_round_trip(tmp_path, anatomy):
    plan = Plan.from_dict({"default": {"bits": 3}, "roles": {"attention": {"bits": 4}},
                           "patterns": [{"pattern": r"model\.layers\.1\..*", "bits": 8}]})
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    assert Plan.from_yaml(path).resolve(anatomy) == plan.resolve(anatomy)


@pytest.mark.parametrize("data, fragment", [
    ({"defaults": {"bits": 4}}, "unknown key"),
    ({"default": {"bits": 5}}, "`bits`"),
    ({"default": {"bitz": 4}}, "unknown key"),
    ({"roles": {"experts": {"bits": 4}}}, "`roles`"),
    ({"patterns": [{"bits": 4}]}, "`pattern` key"),
    ({"patterns": [{"pattern": "(", "bits": 4}]}, "regular expression"),
])
def test_bad_plans_name_the_setting(data, fragment):
    with pytest.raises(ValueError, match=fragment):
        Plan.from_dict(data)


def test_pattern_or_name_matching_nothing_is_an_error(anatomy):
    with pytest.raises(ValueError, match="matches no quantizable linear"):
        Plan.from_dict({"patterns": [{"pattern": r".*w1", "bits": 4}]}).resolve(anatomy)
    with pytest.raises(ValueError, match="not a quantizable linear"):
        Plan.from_dict({"modules": {"model.layers.0.mlp.gate": {"bits": 4}}}).resolve(anatomy)


def test_average_and_effective_bits(anatomy):
    specs = Plan.uniform(4, group_size=None).resolve(anatomy)
    stats = bit_stats(specs, anatomy.units)
    assert stats.average_bits == pytest.approx(4.0)
    # per-channel: one fp16 scale + one 4-bit zero per row
    expected = sum((4 + (16 + 4) / u.in_features) * u.numel for u in anatomy.units) / stats.params
    assert stats.effective_bits == pytest.approx(expected)
    mixed = Plan.from_dict({"default": {"bits": 2}, "roles": {"attention": {"bits": 8}}}).resolve(anatomy)
    attn = sum(u.numel for u in anatomy.units_by_role("attention"))
    assert bit_stats(mixed, anatomy.units).average_bits == pytest.approx(
        2 + 6 * attn / stats.params)
    unit = anatomy.units[0]
    assert effective_bits_of(QuantSpec(bits=16), unit) == 16.0
