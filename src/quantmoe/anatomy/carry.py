"""Tensors a block hands to the next block beside its hidden states (`FamilySpec.carries`).

Most decoder loops pass only the hidden states from block to block. Some pass more: GLM-5's
sparse-attention blocks return `(hidden_states, topk_indices)` and the next block reads the
indices as `prev_topk_indices` (its "shared" indexer layers reuse them); ZAYA's blocks return
`(hidden_states, router_states)` and the next block's router reads them as its second positional
argument. Whatever runs blocks one at a time (the quantization driver, streamed evaluation)
must hand these on too, or the next block computes something else (or refuses to run).

A `Carry` says where one such tensor leaves a block (its position in the output tuple) and
where it enters the next one (a positional index or a keyword). The helpers below are the
only place the driver and the streamed evaluation read them.

Example:
    >>> carries = (Carry(output=1, argument="prev_topk_indices"),)
    >>> stand_in_output(carries, "h")
    ('h', None)
    >>> split_output(carries, ("h2", "idx"))
    ('h2', ('idx',))
    >>> with_carried(carries, ("h", None), {"prev_topk_indices": None}, "h2", ("idx",))
    (('h2', None), {'prev_topk_indices': 'idx'})
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Carry:
    """One tensor a block hands to the next.

    output:   its position in the block's output tuple (0 is the hidden states, so >= 1).
    argument: where the next block reads it: a positional index (>= 1; 0 is the hidden states)
              or a keyword name.
    """

    output: int
    argument: int | str

    def __post_init__(self) -> None:
        if self.output < 1 or (isinstance(self.argument, int) and self.argument < 1):
            raise ValueError("check `carries` in the FamilySpec: position 0 is the hidden states, which every "
                             "block hands on already; a carried tensor has output and argument >= 1")


def stand_in_output(carries: Sequence[Carry], hidden: Any) -> Any:
    """What a stand-in for a block returns so that the decoder loop unpacks it as a block's output:
    the hidden states, with None in every carried position (None is what the first block gets)."""
    if not carries:
        return hidden
    out: list[Any] = [None] * (1 + max(c.output for c in carries))
    out[0] = hidden
    return tuple(out)


def split_output(carries: Sequence[Carry], out: Any) -> tuple[Any, tuple[Any, ...]]:
    """A block's output as (hidden states, the carried tensors in `carries` order)."""
    hidden = out[0] if isinstance(out, tuple) else out
    return hidden, tuple(out[c.output] for c in carries)


def with_carried(carries: Sequence[Carry], args: tuple, kwargs: dict[str, Any], hidden: Any,
                 carried: Sequence[Any]) -> tuple[tuple, dict[str, Any]]:
    """A block's inputs (`args`, `kwargs`, as the model's forward gave them) with `hidden` as its hidden
    states and `carried` (the previous block's, in `carries` order) put where the block reads them."""
    args, kwargs = (hidden, *args[1:]), dict(kwargs)
    for carry, value in zip(carries, carried, strict=True):
        if isinstance(carry.argument, str):
            kwargs[carry.argument] = value
        else:
            args = args + (None,) * (carry.argument + 1 - len(args))
            args = args[:carry.argument] + (value,) + args[carry.argument + 1:]
    return args, kwargs
