import doctest

import torch

import quantmoe.quant.replay as replay_module
from quantmoe.quant.replay import FrozenOutputs


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
