import doctest

import pytest
import torch

import quantmoe.quant.replay as replay_module
from quantmoe.anatomy import tiny_model
from quantmoe.quant.pipeline import _run_block, capture_block_inputs
from quantmoe.quant.replay import BlockReplay, FrozenOutputs


def test_docstring_example():
    assert doctest.testmod(replay_module).failed == 0


def test_records_per_batch_replays_later_and_restores_forward():
    lin = torch.nn.Linear(4, 3)
    calls = []
    lin.register_forward_pre_hook(lambda m, a: calls.append(1))
    xs = [torch.randn(2, 4), torch.randn(5, 4)]
    replay = FrozenOutputs(lin)
    with torch.no_grad():
        with replay.active(on=False):
            assert "forward" not in vars(lin)
        for _ in range(2):  # the second pass replays
            with replay.active():
                outs = []
                for i, x in enumerate(xs):
                    replay.batch = i
                    outs.append(lin(x))
            assert all(torch.equal(o, lin(x)) for o, x in zip(outs, xs))
    assert "forward" not in vars(lin)  # the class's forward again
    assert len(replay.outputs) == 2 and len(calls) == 2 * 2 + 2 * 2  # hooks on the module still run


@pytest.mark.parametrize(("impl", "exact"), [("sdpa", True), ("eager", False)])
def test_attention_output_from_its_tail_input(impl, exact):
    model = tiny_model("mixtral")
    model.set_attn_implementation(impl)
    block = model.model.layers[0]
    windows = torch.randint(0, model.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inputs = capture_block_inputs(model, block, windows, 2, torch.device("cpu"))  # 3 batches
        replay = FrozenOutputs(block.self_attn, tail="o_proj")
        passes = BlockReplay([(replay, 1)])  # replayed from stage 1 on
        with passes.stage(0):  # the o_proj stage's pass keeps its inputs
            _run_block(block, inputs, passes)
        block.self_attn.o_proj.weight.mul_(0.5)  # o_proj quantized: the attention output changes, its input not
        expected = _run_block(block, inputs)
        with passes.stage(1):
            got = _run_block(block, inputs, passes)
        with passes.stage(2):
            again = _run_block(block, inputs, passes)
    assert replay.tail_exact is exact  # eager attention also returns its weights: no shortcut
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert all(torch.equal(a, b) for a, b in zip(expected, again))
