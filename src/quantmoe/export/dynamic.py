"""The smallest ``dynamic`` map that reproduces a plan in the GPTQ format's config.

GPTQModel, vLLM and SGLang read per-module settings from ``quantization_config.dynamic``: an
ordered map from regex to overrides of the base ``bits``/``group_size``/``sym``/``desc_act``;
a ``-:`` prefix means "not quantized", ``+:`` (or none) an override. The first pattern that
``re.match``es a module name wins; keys a matching rule does not set take the base value.

`dynamic_map` picks the base format and the rules. Rules are built on scopes that say what
plans say: a role across all blocks (``.*self_attn``), a role and linear kind (all routed
``down_proj``), a role in one block, one routed expert, one module. Going from the widest
scope to the narrowest, a scope gets a rule when its most common format differs from what
the wider rules already give most of its modules; more specific rules come first in the map.
Several orders of scopes and every format as the base are tried; the smallest map wins, and
``resolve`` checks that it gives every module its plan's format.

Patterns are matched against checkpoint names and end in ``(\\..*)?$`` (a prefix that also
matches the engines' fused names, ``...self_attn.qkv_proj`` and vLLM's fused-MoE
``...experts``) or ``$`` (one module); a pattern is only used when it matches exactly its
scope's modules among all linears of the model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from quantmoe.anatomy import LinearUnit
from quantmoe.quant.grid import QuantSpec


@dataclass(frozen=True)
class GPTQFormat:
    """One module's settings in the format: ``group_size`` -1 = one group per output channel."""

    bits: int
    group_size: int
    sym: bool

    @classmethod
    def of(cls, spec: QuantSpec, in_features: int) -> GPTQFormat | None:
        """None for a module kept at 16 bits; a group wider than the input is per-channel (-1)
        (a group exactly as wide stays: the same tensors, and one setting with its neighbours)."""
        if spec.keep:
            return None
        size = spec.group_size if spec.group_size is not None and spec.group_size <= in_features else -1
        return cls(bits=spec.bits, group_size=size, sym=spec.symmetric)

    def overrides(self, base: GPTQFormat) -> dict[str, int | bool]:
        """The keys a dynamic rule needs to turn ``base`` into this format."""
        return {k: v for k, v in (("bits", self.bits), ("group_size", self.group_size), ("sym", self.sym))
                if getattr(base, k) != v}


Formats = Mapping[str, GPTQFormat | None]  # checkpoint module name -> format (None = 16 bits)

_LEVELS: dict[str, Callable[[LinearUnit], tuple | None]] = {
    "role": lambda u: (u.role,),
    "role_kind": lambda u: (u.role, u.kind),
    "block_role": lambda u: (u.block, u.role),
    "block_role_kind": lambda u: (u.block, u.role, u.kind),
    "expert": lambda u: (u.block, u.expert) if u.expert is not None else None,
}
_CHAINS: tuple[tuple[str, ...], ...] = (
    ("role", "block_role", "expert"),
    ("role", "role_kind", "block_role_kind", "expert"),
    ("role", "block_role", "block_role_kind", "expert"),
    ("role", "role_kind", "block_role", "block_role_kind", "expert"),
)


def resolve(dynamic: Mapping[str, Mapping], base: GPTQFormat, name: str) -> GPTQFormat | None:
    """The format a reader gives module ``name``: the first matching rule, else the base."""
    for pattern, over in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return GPTQFormat(bits=over.get("bits", base.bits), group_size=over.get("group_size", base.group_size),
                              sym=over.get("sym", base.sym))
    return base


def _token_pattern(values: Sequence[str], digits_wild: bool) -> str:
    distinct = sorted(set(values), key=lambda v: (len(v), v))
    if len(distinct) == 1:
        return re.escape(distinct[0])
    if digits_wild and all(v.isdigit() for v in distinct):
        return r"\d+"
    return "(?:" + "|".join(re.escape(v) for v in distinct) + ")"


def scope_pattern(scope: Iterable[str], others: Iterable[str]) -> str:
    """The shortest regex that ``re.match``es every name of ``scope`` and none of ``others``."""
    scope = sorted(set(scope))
    others = [n for n in others if n not in set(scope)]
    candidates: list[str] = []
    split = [n.split(".") for n in scope]
    if len({len(t) for t in split}) == 1:
        width = len(split[0])
        for digits_wild in (True, False):
            tokens = [_token_pattern([t[i] for t in split], digits_wild) for i in range(width)]
            candidates += [r"\.".join(tokens[:k]) + r"(\..*)?$" for k in range(1, width)]
            candidates.append(r"\.".join(tokens) + "$")
    candidates.append("(?:" + "|".join(re.escape(n) for n in scope) + ")$")
    for pattern in candidates:
        rx = re.compile(pattern)
        if all(rx.match(n) for n in scope) and not any(rx.match(n) for n in others):
            return pattern
    raise AssertionError("unreachable: the alternation of the names always fits")


def _rules(units: Sequence[LinearUnit], names: Mapping[str, str], want: Formats, base: GPTQFormat,
           chain: Sequence[str], others: Sequence[str]) -> dict[str, dict]:
    current: dict[str, GPTQFormat | None] = {u.name: base for u in units}
    levels: list[dict[str, dict]] = []
    all_names = [names[u.name] for u in units] + list(others)
    for level in (*chain, "module"):
        scopes: dict[tuple, list[LinearUnit]] = {}
        for u in units:
            key = (u.name,) if level == "module" else _LEVELS[level](u)
            if key is not None:
                scopes.setdefault(key, []).append(u)
        rules: dict[str, dict] = {}
        for members in scopes.values():
            wanted = Counter(want[names[u.name]] for u in members)
            fmt, hits = max(wanted.items(), key=lambda kv: (kv[1], kv[0] == current[members[0].name]))
            already = sum(1 for u in members if want[names[u.name]] == current[u.name])
            if hits <= already:
                continue
            pattern = scope_pattern([names[u.name] for u in members], all_names)
            if fmt is None:
                rules["-:" + pattern] = {}
            else:
                rules["+:" + pattern] = fmt.overrides(base)
            for u in members:
                current[u.name] = fmt
        levels.append(rules)
    dynamic: dict[str, dict] = {}
    for rules in reversed(levels):  # the most specific first: the first match wins
        dynamic.update(rules)
    return dynamic


def dynamic_map(units: Sequence[LinearUnit], names: Mapping[str, str], want: Formats,
                others: Sequence[str] = (), base: GPTQFormat | None = None) -> tuple[GPTQFormat, dict[str, dict]]:
    """(base format, dynamic map) reproducing ``want`` (checkpoint name -> format) for ``units``.

    ``names`` maps unit names to checkpoint names; ``others`` are checkpoint names of linears
    that no pattern may match (routers, the LM head); ``base`` forces the base format.
    """
    quantized = Counter(f for f in want.values() if f is not None)
    if not quantized:
        raise ValueError("the plan keeps every linear at 16 bits: there is nothing to export in the GPTQ format")
    bases = [(base, quantized[base])] if base is not None else quantized.most_common()
    best: tuple[int, int, GPTQFormat, dict[str, dict]] | None = None
    for base, count in bases:
        for chain in _CHAINS:
            dynamic = _rules(units, names, want, base, chain, others)
            key = (len(dynamic), -count)
            if best is None or key < best[:2]:
                best = (*key, base, dynamic)
    _, _, base, dynamic = best
    wrong = [u.name for u in units if resolve(dynamic, base, names[u.name]) != want[names[u.name]]]
    if wrong:
        raise AssertionError(f"dynamic map does not reproduce the plan for {wrong[:3]}")
    return base, dynamic
