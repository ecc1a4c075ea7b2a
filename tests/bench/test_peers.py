"""Pure helpers of benches/bench_peers.py and benches/_hqq_runner.py (no peer venv needed)."""

import sys
from pathlib import Path

import pytest
import torch

from quantmoe.anatomy import LinearUnit
from quantmoe.quant.plan import Plan, bit_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))

from _hqq_runner import hqq_dequantized  # noqa: E402
from bench_peers import effective_bits  # noqa: E402

UNITS = [LinearUnit("a", "attention", 0, None, "q_proj", 128, 128, False),
         LinearUnit("b", "routed_expert", 0, 0, "down_proj", 96, 128, False),  # in=96: ragged at g64, one group at g128
         LinearUnit("c", "routed_expert", 0, 0, "gate_proj", 384, 64, False)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128, None])
def test_gptq_zero_points_count_as_quantmoe_does(bits, group):
    plan = Plan.uniform(bits, group_size=group)
    want = bit_stats({u.name: plan.spec_for(u) for u in UNITS}, UNITS).effective_bits
    assert effective_bits(UNITS, {u.name: bits for u in UNITS}, group) == pytest.approx(want)


def test_hqq_float16_zero_points():
    # 128x128 at g64: 2 groups per row; a float16 scale and a float16 zero each: 4 + 32/64
    assert effective_bits(UNITS[:1], {"a": 4}, 64, zero_bits=16) == pytest.approx(4.5)
    # in=96 at g64: 2 groups per row (the last one 32 wide), counted whole as quantmoe does
    assert effective_bits(UNITS[1:2], {"b": 2}, 64, zero_bits=16) == pytest.approx(2 + 2 * 32 / 96)
    assert effective_bits(UNITS[1:2], {"b": 2}, 128, zero_bits=16) == pytest.approx(2 + 32 / 96)


def test_kept_linears_count_sixteen_bits_without_overhead():
    numel = sum(u.numel for u in UNITS)
    mixed = effective_bits(UNITS, {"a": 16, "b": 4, "c": 4}, 128, zero_bits=16)
    rest = effective_bits(UNITS[1:], {"b": 4, "c": 4}, 128, zero_bits=16)
    assert mixed == pytest.approx((16 * UNITS[0].numel + rest * (numel - UNITS[0].numel)) / numel)


class _RecordingQuantizer:
    """Stands in for hqq's Quantizer: round-to-nearest on a 0.5 grid; records each call's shape and group."""

    calls: list = []

    @classmethod
    def quantize(cls, W, nbits, channel_wise, group_size, optimize, round_zero, axis, bitpack, compute_dtype, device):
        cls.calls.append((tuple(W.shape), group_size))
        assert W.numel() % group_size == 0 and axis == 1
        return (W * 2).round(), {"scale": torch.tensor(0.5), "zero": torch.tensor(0.0), "shape": W.shape}

    @classmethod
    def dequantize(cls, W_q, meta):
        return (W_q - meta["zero"]) * meta["scale"]


@pytest.mark.parametrize(("in_f", "group", "calls"), [(128, 64, [((8, 128), 64)]),
                                                      (96, 64, [((8, 64), 64), ((8, 32), 32)]),
                                                      (32, 128, [((8, 32), 32)])])
def test_hqq_groups_follow_quantmoe_layout(in_f, group, calls):
    _RecordingQuantizer.calls = []
    W = torch.randn(8, in_f)
    out = hqq_dequantized(W, 2, group, _RecordingQuantizer)
    assert _RecordingQuantizer.calls == calls
    assert out.shape == W.shape
    torch.testing.assert_close(out, (W * 2).round() / 2)


def test_quantmoe_options_become_runner_flags_and_keep_the_effective_bits(tmp_path):
    from bench_peers import Job, _bits_of, _jobs, _parse, _quantmoe_flags

    args = _parse(["--tools", "quantmoe", "--bits", "3", "--quantmoe-options", "plain", "hmse/desc/4"])
    args.tools = args.tools.split(",")
    jobs = _jobs(args, "mixtral-s", tmp_path / "w.npy", tmp_path / "fp", tmp_path, {})
    assert [j.setting for j in jobs] == ["w3 g128", "w3 g128 hmse/desc/4"]
    assert "--refine" not in jobs[0].cmd
    flags = jobs[1].cmd[jobs[1].cmd.index("--clip"):]
    assert flags == ["--clip", "hmse", "--act-order", "desc", "--refine", "4"]
    assert jobs[0].out != jobs[1].out
    assert _bits_of(jobs[1], {}, UNITS, set()) == _bits_of(Job("quantmoe", "w3 g128", [], tmp_path), {}, UNITS, set())
    with pytest.raises(SystemExit, match="check --quantmoe-options"):
        _quantmoe_flags("hmse/desc")
