"""Replaying a frozen module's outputs on the later passes over a block's batches.

The driver runs a block over the same calibration batches several times (once per stage,
then once more for its outputs). A module whose weights and inputs no longer change
computes the same output on each of those passes: the block's attention once its linears
are quantized (its input is the normalized block input, fixed while the block is worked
on). `FrozenOutputs` runs such a module for real the first time it sees a batch, keeps the
output, and returns the kept output on every later pass, so the later passes skip its
compute. Exact by construction: what is returned is what the module computed.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(4, 4)
    >>> replay = FrozenOutputs(lin)
    >>> x = torch.randn(2, 4)
    >>> with replay.active():
    ...     replay.batch = 0
    ...     first = lin(x)
    ...     again = lin(torch.zeros(2, 4))  # the same batch again: the kept output, not recomputed
    >>> again is first
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


class FrozenOutputs:
    """Per-batch outputs of ``module``, recorded on first sight and replayed afterwards.

    Set ``batch`` before each forward of the block; outputs are kept until the object is
    dropped (one per block, as much memory as the block's inputs for an attention).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.batch = 0
        self.outputs: dict[int, Any] = {}

    @contextmanager
    def active(self, on: bool = True) -> Iterator[FrozenOutputs]:
        """While active, ``module`` computes each batch once; ``on=False`` leaves it alone."""
        if not on:
            yield self
            return
        compute = self.module.forward

        def forward(*args, **kwargs):
            if self.batch not in self.outputs:
                self.outputs[self.batch] = compute(*args, **kwargs)
            return self.outputs[self.batch]

        self.module.forward = forward  # hooks on the module itself still run
        try:
            yield self
        finally:
            del self.module.forward
