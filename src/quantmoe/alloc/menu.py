"""Solver menus: the quantization settings a unit may get, written compactly.

A choice is a full ``QuantSpec`` written as ``BITS[/gSIZE|/gc][/sym|/asym][/none|/mse|/hmse]``:
``3/g64/asym/hmse`` is 3 bits, groups of 64, asymmetric, Hessian-weighted clipping; ``gc`` is
per-channel. Parts left out take the base settings (``--group-size``, ``--asym``, ``--clip``).
A menu is a comma-separated list of choices, or the product of widths, group sizes, grids and
clip modes (``menu_product``).

Example:
    >>> from quantmoe.quant.grid import QuantSpec
    >>> label(parse_choice("3/g64/asym/hmse", QuantSpec(4)))
    '3/g64/asym/hmse'
    >>> [label(s) for s in parse_menu("2/g64,4", QuantSpec(4, 128, True, "mse"))]
    ['2/g64/sym/mse', '4/g128/sym/mse']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import product

from quantmoe.quant.grid import CLIP_MODES, QuantSpec


def label(spec: QuantSpec) -> str:
    group = "gc" if spec.group_size is None else f"g{spec.group_size}"
    return f"{spec.bits}/{group}/{'sym' if spec.symmetric else 'asym'}/{spec.clip}"


def parse_choice(text: str, base: QuantSpec) -> QuantSpec:
    """One choice; errors name the part to fix."""
    parts = [p.strip() for p in str(text).strip().split("/")]
    if not parts or not parts[0].isdigit():
        raise ValueError(f"check menu choice {text!r}: it starts with the bit width, e.g. 3/g64/asym/hmse")
    settings: dict = {"bits": int(parts[0])}
    for part in parts[1:]:
        if part in ("sym", "asym"):
            settings["symmetric"] = part == "sym"
        elif part in CLIP_MODES:
            settings["clip"] = part
        elif part == "gc":
            settings["group_size"] = None
        elif part.startswith("g") and part[1:].isdigit():
            settings["group_size"] = int(part[1:])
        else:
            raise ValueError(f"check menu choice {text!r}: {part!r} is not gSIZE, gc (per-channel), sym, asym, "
                             f"or a clip mode ({', '.join(CLIP_MODES)})")
    try:
        return replace(base, **settings)
    except ValueError as err:
        raise ValueError(f"check menu choice {text!r}: {err}") from None


def parse_menu(text: str, base: QuantSpec) -> tuple[QuantSpec, ...]:
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("check the menu: give at least one choice, e.g. 2/g64,3,4")
    return unique(parse_choice(t, base) for t in items)


def menu_product(widths: Sequence[int], group_sizes: Sequence[int | None], symmetric: Sequence[bool],
                 clips: Sequence[str]) -> tuple[QuantSpec, ...]:
    """Every combination, in that order (widths vary slowest)."""
    return unique(QuantSpec(b, g, s, c) for b, g, s, c in product(widths, group_sizes, symmetric, clips))


def unique(specs: Iterable[QuantSpec]) -> tuple[QuantSpec, ...]:
    return tuple(dict.fromkeys(specs))
