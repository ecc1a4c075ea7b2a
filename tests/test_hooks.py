import pytest
import torch
from torch import nn

from quantmoe.hooks import removed_after


def test_hooks_run_inside_and_are_removed_after():
    lin = nn.Linear(3, 2)
    calls = []
    with removed_after() as handles:
        handles.append(lin.register_forward_hook(lambda m, i, o: calls.append("post")))
        handles.append(lin.register_forward_pre_hook(lambda m, a: calls.append("pre")))
        lin(torch.zeros(1, 3))
    assert calls == ["pre", "post"]
    lin(torch.zeros(1, 3))
    assert calls == ["pre", "post"]  # nothing ran after the block
    assert not lin._forward_hooks and not lin._forward_pre_hooks


def test_hooks_are_removed_when_the_body_raises():
    lin = nn.Linear(3, 2)
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        with removed_after() as handles:
            handles.append(lin.register_forward_hook(lambda m, i, o: calls.append(1)))
            handles.append(lin.register_forward_pre_hook(lambda m, a: calls.append(0), with_kwargs=False))
            lin(torch.zeros(1, 3))
            raise RuntimeError("boom")
    assert not lin._forward_hooks and not lin._forward_pre_hooks
    lin(torch.zeros(1, 3))
    assert calls == [0, 1]
