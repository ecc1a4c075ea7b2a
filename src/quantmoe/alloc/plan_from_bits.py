"""From bits per linear to the smallest readable `Plan` (roles, kinds, expert patterns, modules)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from quantmoe.anatomy import QUANTIZABLE_ROLES, BlockAnatomy, LinearUnit, ModelAnatomy
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.plan import Plan


def _majority(units: Sequence[LinearUnit], bits: Mapping[str, int]) -> int:
    """The bits that cover most parameters; ties go to the lower bits."""
    weight: Counter[int] = Counter()
    for u in units:
        weight[bits[u.name]] += u.numel
    return max(sorted(weight), key=weight.__getitem__)


def _alternation(items: Sequence[int]) -> str:
    return str(items[0]) if len(items) == 1 else f"({'|'.join(map(str, items))})"


def _experts_pattern(blocks: Sequence[BlockAnatomy], experts: tuple[int, ...]) -> str:
    """A regex matching every linear of `experts` (all when empty) in each of `blocks`."""
    first = blocks[0]
    layers = first.module_name.rpartition(".")[0]
    suffix = first.experts_module[len(first.module_name):]
    expert = _alternation(experts) if experts else r"\d+"
    return rf"{re.escape(layers)}\.{_alternation([b.index for b in blocks])}{re.escape(suffix)}\.{expert}\.[^.]+"


def plan_from_bits(anatomy: ModelAnatomy, bits: Mapping[str, int], group_size: int | None = 128,
                   symmetric: bool = True, clip: str = "none") -> Plan:
    """The smallest readable `Plan` giving each linear exactly `bits[name]`.

    default = the bits of most parameters; `roles` where a role's majority differs; `kinds`
    where that fixes more linears than it breaks; one pattern per group of blocks whose same experts
    differ (whole experts); `modules` for single linears left over. Checked by resolving.
    """
    units = anatomy.units
    missing = [u.name for u in units if u.name not in bits]
    if missing:
        raise ValueError(f"no bits for {missing[0]} ({len(missing)} linears without bits)")
    default = _majority(units, bits)
    roles = {}
    for role in QUANTIZABLE_ROLES:
        of_role = [u for u in units if u.role == role]
        if of_role and (b := _majority(of_role, bits)) != default:
            roles[role] = {"bits": b}
    implied = {u.name: roles.get(u.role, {}).get("bits", default) for u in units}
    kinds = {}
    for kind in dict.fromkeys(u.kind for u in units):
        of_kind = [u for u in units if u.kind == kind]
        wrong = Counter(bits[u.name] for u in of_kind if implied[u.name] != bits[u.name])
        if wrong:  # a kind entry where it fixes more linears than it breaks
            value = _majority([u for u in of_kind if implied[u.name] != bits[u.name]], bits)
            breaks = sum(implied[u.name] == bits[u.name] != value for u in of_kind)
            if wrong[value] > breaks:
                kinds[kind] = {"bits": value}
                implied.update((u.name, value) for u in of_kind)
    groups: dict[tuple[int, tuple[int, ...]], list[BlockAnatomy]] = defaultdict(list)
    for block in anatomy.blocks:
        by_bits: dict[int, list[int]] = defaultdict(list)
        for e, names in enumerate(block.experts):
            values = {bits[n] for n in names}
            if len(values) == 1 and any(implied[n] != bits[n] for n in names):
                by_bits[values.pop()].append(e)
        for value, experts in by_bits.items():
            groups[value, () if len(experts) == block.num_experts else tuple(experts)].append(block)
    patterns, covered = [], set()
    for (value, experts), blocks in groups.items():
        patterns.append((_experts_pattern(blocks, experts), {"bits": value}))
        covered.update(n for b in blocks for e in (experts or range(b.num_experts)) for n in b.experts[e])
    modules = {u.name: {"bits": bits[u.name]} for u in units
               if u.name not in covered and implied[u.name] != bits[u.name]}
    plan = Plan(default=QuantSpec(default, group_size, symmetric, clip), roles=roles, kinds=kinds,
                patterns=tuple(patterns), modules=modules)
    wrong = [n for n, spec in plan.resolve(anatomy).items() if spec.bits != bits[n]]
    if wrong:
        raise RuntimeError(f"plan_from_bits gives {wrong[0]} the wrong bits; this is a bug")
    return plan
