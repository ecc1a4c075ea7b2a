import numpy as np
import pytest
import torch

from quantmoe.alloc.damage import DamageTable, measure_damage
from quantmoe.alloc.menu import label, menu_product, parse_choice, parse_menu
from quantmoe.alloc.solver import SolverConfig, solve
from quantmoe.anatomy import describe, tiny_model, unfuse_experts
from quantmoe.export import engines
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.plan import bit_stats, effective_bits_of

BASE = QuantSpec(4, 128, True, "none")


@pytest.mark.parametrize("text", ["2/g64/asym/hmse", "3/gc/sym/mse", "8/g32/sym/none", "4/g128/asym/none"])
def test_labels_round_trip(text):
    assert label(parse_choice(text, BASE)) == text


def test_parts_left_out_take_the_base_settings():
    base = QuantSpec(4, 64, False, "mse")
    assert parse_choice("3", base) == QuantSpec(3, 64, False, "mse")
    assert parse_choice("2/gc", base) == QuantSpec(2, None, False, "mse")
    assert parse_menu("3, 3/g64/asym/mse ,4", base) == (QuantSpec(3, 64, False, "mse"), QuantSpec(4, 64, False, "mse"))


@pytest.mark.parametrize("text,match", [("g64/3", "starts with the bit width"), ("3/g6x", "is not gSIZE"),
                                        ("3/fast", "is not gSIZE"), ("5/g64", "check menu choice"),
                                        ("3/g0", "check menu choice")])
def test_bad_choices_name_the_part_to_fix(text, match):
    with pytest.raises(ValueError, match=match):
        parse_choice(text, BASE)


def test_empty_menu_is_an_error():
    with pytest.raises(ValueError, match="at least one choice"):
        parse_menu(" , ", BASE)


def test_menu_product_order_and_duplicates():
    menu = menu_product((2, 3), (64, None), (True,), ("none", "none"))
    assert [label(s) for s in menu] == ["2/g64/sym/none", "2/gc/sym/none", "3/g64/sym/none", "3/gc/sym/none"]


MENU = (QuantSpec(2, 16), QuantSpec(2, 16, False), QuantSpec(3, 16), QuantSpec(3, None), QuantSpec(4, None),
        QuantSpec(4, 16, clip="mse"), QuantSpec(8, None))


@pytest.fixture(scope="module")
def menu_table():
    model = tiny_model("qwen2_moe")
    anatomy = describe(model)
    windows = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    return anatomy, measure_damage(model, anatomy, windows, (), metric="output", menu=MENU)


def test_menu_table_has_one_column_per_choice(menu_table):
    anatomy, table = menu_table
    assert table.specs == MENU and table.widths == tuple(s.bits for s in MENU)
    assert table.damage.shape == (len(anatomy.units), len(MENU)) and (table.damage >= 0).all()
    # finer groups cost less damage at the same width on every unit (group 16 vs per-channel at 3 bits)
    assert (table.damage[:, 2] <= table.damage[:, 3]).mean() > 0.8


@pytest.mark.parametrize("target", [3.4, 4.0, 5.0])  # tiny shapes: 2/g16 is 3.2 effective bits
@pytest.mark.parametrize("granularity", ["linear", "block"])
def test_effective_budget_is_met_on_the_written_plan(menu_table, target, granularity):
    anatomy, table = menu_table
    config = SolverConfig(target_bits=target, menu=MENU, granularity=granularity, tolerance=0.05)
    assert config.budget == "effective"
    sol = solve(anatomy, table, config)
    specs = sol.plan.resolve(anatomy)
    assert {n: specs[n] for n in sol.specs} == sol.specs  # the written plan is the solution
    stats = bit_stats(specs, anatomy.units)
    assert target - 0.05 <= stats.effective_bits <= target + 1e-9
    assert stats.effective_bits == pytest.approx(sol.effective_bits)
    assert stats.average_bits == pytest.approx(sol.average_bits) and stats.average_bits < stats.effective_bits
    if granularity == "block":
        for block in anatomy.blocks:
            assert len({sol.specs[n] for expert in block.experts for n in expert}) <= 1


def test_average_budget_still_counts_codes_only(menu_table):
    anatomy, table = menu_table
    sol = solve(anatomy, table, SolverConfig(budget="average", target_bits=3.0, menu=MENU, tolerance=0.05))
    stats = bit_stats(sol.plan.resolve(anatomy), anatomy.units)
    assert 2.95 <= stats.average_bits <= 3.0 + 1e-9 and stats.effective_bits > 3.0


def test_effective_budget_below_every_choice_is_impossible(menu_table):
    anatomy, table = menu_table
    lowest = min(effective_bits_of(QuantSpec(2, 16), u) for u in anatomy.units)
    with pytest.raises(ValueError, match="impossible budget"):
        solve(anatomy, table, SolverConfig(target_bits=lowest - 0.01, menu=MENU))
    with pytest.raises(ValueError, match="impossible budget"):
        SolverConfig(target_bits=1.9, menu=MENU)


def test_unmeasured_choice_is_named(menu_table):
    anatomy, table = menu_table
    with pytest.raises(ValueError, match="no column for 3/g32/sym/none"):
        solve(anatomy, table, SolverConfig(target_bits=3.5, menu=(QuantSpec(3, 32), QuantSpec(4, None))))


def test_serving_menu_plans_pass_the_vllm_check():
    model = unfuse_experts(tiny_model("deepseek_v3"))
    anatomy = describe(model)
    # tiny shapes (inputs of 16, 32, 64): per-channel is the only group Marlin takes on every linear
    menu = (QuantSpec(4, None), QuantSpec(4, None, clip="hmse"), QuantSpec(8, None), QuantSpec(8, None, clip="mse"))
    names = tuple(u.name for u in anatomy.units)
    rng = np.random.default_rng(1)
    damage = rng.random((len(names), len(menu))) * np.array([4.0, 6.0, 1.0, 1.5])
    table = DamageTable(names, tuple(s.bits for s in menu), damage,
                        np.array([u.numel for u in anatomy.units], dtype=float), "test", specs=menu)
    for target in (5.0, 6.5):
        sol = solve(anatomy, table, SolverConfig(target_bits=target, menu=menu, granularity="block", tolerance=0.9))
        specs = sol.plan.resolve(anatomy)
        assert len(set(specs.values())) > 1, target  # a mixed plan, not one setting
        assert engines.problems(anatomy.units, specs, "vllm") == [], target


def test_default_tolerance_is_a_hundredth_of_a_bit(menu_table):
    anatomy, table = menu_table
    config = SolverConfig(target_bits=4.0, menu=MENU)
    assert config.tolerance == 0.01
    stats = bit_stats(solve(anatomy, table, config).plan.resolve(anatomy), anatomy.units)
    assert 3.99 <= stats.effective_bits <= 4.0 + 1e-9
