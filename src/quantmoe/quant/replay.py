"""Replaying a frozen module's outputs on the later passes over a block's batches.

The driver runs a block over the same calibration batches several times (once per stage,
then once more for its outputs). A module whose weights and inputs no longer change
computes the same output on each of those passes: the block's attention once its linears
are quantized (its input is the normalized block input, fixed while the block is worked
on). `FrozenOutputs` runs such a module the first time it sees a batch, keeps the output,
and returns the kept output on every later pass, so the later passes skip its compute.

The same holds inside a routed expert once its gate/up are quantized: its down input
(`ExpertMLP.hidden`) is computed on the down stage's pass and replayed on the final pass
(each expert gets the same tokens on both: the router's input is fixed). `BlockReplay`
holds what one block replays and from which stage on.

The first time can be cheap too. An attention ends with its output projection (its
"tail", o_proj): the pass that calibrates o_proj sees the tail's input, which the
quantization of o_proj does not change. Kept from that pass, it gives the attention's
output as ``(tail(input), None)`` without recomputing the attention. This is checked on
the first batch against the real forward (bit for bit, and the rest of the output must be
None, as transformers' sdpa/flash attention returns); if the check fails, every batch runs
the real forward. Either way what is returned is what the module computes.

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

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from quantmoe.hooks import removed_after

log = logging.getLogger(__name__)


class FrozenOutputs:
    """Per-batch outputs of ``module`` (its ``method``), computed once and replayed afterwards.

    ``tail``: the name (inside ``module``) of a last linear whose inputs may be recorded
    with ``recording_tail`` to compute the outputs from (see the module docstring). Set
    ``batch`` before each forward of the block; everything is kept until the object is
    dropped (one per block: as much memory as the block's inputs for an attention).
    """

    def __init__(self, module: nn.Module, tail: str | None = None, method: str = "forward") -> None:
        self.module = module
        self.tail = tail
        self.method = method
        self.batch = 0
        self.outputs: dict[int, Any] = {}
        self.tail_inputs: dict[int, torch.Tensor] = {}
        self.tail_exact: bool | None = None  # None until checked on a batch

    @contextmanager
    def recording_tail(self, on: bool = True) -> Iterator[FrozenOutputs]:
        """Keep the tail's input of each batch (its hook runs before any other, e.g. one that stops the pass)."""
        if not on or self.tail is None:
            yield self
            return
        keep = lambda _module, args: self.tail_inputs.__setitem__(self.batch, args[0])  # noqa: E731
        with removed_after() as handles:
            handles.append(self.module.get_submodule(self.tail).register_forward_pre_hook(keep, prepend=True))
            yield self

    @contextmanager
    def active(self, on: bool = True) -> Iterator[FrozenOutputs]:
        """While active, ``module`` computes each batch once; ``on=False`` leaves it alone."""
        if not on:
            yield self
            return
        compute = getattr(self.module, self.method)

        def replayed(*args, **kwargs):
            if self.batch not in self.outputs:
                self.outputs[self.batch] = self._first(compute, args, kwargs)
            return self.outputs[self.batch]

        setattr(self.module, self.method, replayed)  # hooks on the module itself still run
        try:
            yield self
        finally:
            delattr(self.module, self.method)

    def _first(self, compute, args, kwargs) -> Any:
        x = self.tail_inputs.pop(self.batch, None)
        if x is None or self.tail_exact is False:
            return compute(*args, **kwargs)
        out = (self.module.get_submodule(self.tail)(x), None)
        if self.tail_exact is None:
            real = compute(*args, **kwargs)
            self.tail_exact = (isinstance(real, tuple) and len(real) == len(out) and real[1] is None
                               and torch.equal(real[0], out[0]))
            if not self.tail_exact:
                log.debug("%s: output is not (%s(input), None); computing it on every batch",
                          type(self.module).__name__, self.tail)
            return real
        return out


class BlockReplay:
    """What the passes over one block replay: ``(FrozenOutputs, first stage that replays it)``.

    The pass of the stage just before a part's first stage keeps that part's tail inputs.
    """

    def __init__(self, parts: Sequence[tuple[FrozenOutputs, int]] = ()) -> None:
        self.parts = list(parts)

    def at_batch(self, batch: int) -> None:
        for part, _ in self.parts:
            part.batch = batch

    @contextmanager
    def stage(self, stage_index: int) -> Iterator[BlockReplay]:
        """Replay during a pass of ``stage_index`` (one past the last stage: the block's final pass)."""
        with ExitStack() as stack:
            for part, first in self.parts:
                stack.enter_context(part.recording_tail(stage_index == first - 1))
                stack.enter_context(part.active(stage_index >= first))
            yield self
