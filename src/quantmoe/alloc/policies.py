"""Bit-allocation policies: rules, applied in order, that give every quantizable linear its bits.

A policy is a sequence of rules. Each rule assigns bits to some linears; a **later rule
overrides** what earlier rules set for the same linears. Every linear must end up covered
(start with ``uniform=B``, or cover each role). The result is a `Plan` (data, YAML).

Policies are written in a compact one-line form (``experts=2,attention=4,shared=8,topk=30:4``)
or as a YAML list (``- topk: {k: 30, bits: 4}``); see `quantmoe.alloc.presets.parse_policy`.

Rules (``[data]`` = needs evidence from the real model, see `Evidence`):

    uniform=BITS                 every linear
    attention=BITS               "other block": attention + dense MLPs (alias: other)
    dense=BITS                   dense MLPs only: those of dense blocks, and one that runs beside
                                 the experts in an MoE block (Gemma 4)
    shared=BITS                  shared experts
    experts=BITS                 routed experts (alias: routed)
    topk=K:BITS                  per MoE block, the K most frequently routed experts   [routing]
    randomk=K:BITS[:SEED]        per MoE block, K experts drawn at random (the control; seeded)
    global=N:BITS[:BY]           the N top experts across all blocks by BY = frequency (default),
                                 weight (mean router weight), wanda, massive            [data]
    first=N:BITS, last=N:BITS    every expert of the first / last N MoE blocks
    kind=KIND:BITS[:ROLE]        every linear of a kind (down_proj, q_proj, ...), optionally one role
    pattern=REGEX:BITS           linears whose name fully matches REGEX (compact form: no commas)
    outlier=P:BITS               the top P% of routed-expert linears by outlier score  [weights]
    importance=N:BITS[:SOURCE]   every expert of the N most important MoE blocks, SOURCE =
                                 predicted (default) or measured                      [predictor]
    preset=NAME                  the rules of a named preset (see `quantmoe.alloc.presets`)

Rankings break ties by block, then expert, then unit order. Bits are one of 2, 3, 4, 8, 16 (keep).
`build_plan` applies the rules and writes the result as a `Plan`.

Example:
    >>> from quantmoe.anatomy import tiny_model, describe
    >>> anatomy = describe(tiny_model("mixtral"))  # 2 MoE blocks of 4 experts
    >>> plan = build_plan((Experts(2), Attention(4), First(1, 4)), anatomy)
    >>> sorted({(u.block, spec.bits) for u in anatomy.units if u.role == "routed_expert"
    ...         for spec in [plan.resolve(anatomy)[u.name]]})
    [(0, 4), (1, 2)]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from quantmoe.alloc.plan_from_bits import plan_from_bits
from quantmoe.alloc.scorers import EXPERT_RANKINGS, Evidence
from quantmoe.anatomy import QUANTIZABLE_ROLES, BlockAnatomy, ModelAnatomy
from quantmoe.quant.grid import SUPPORTED_BITS
from quantmoe.quant.plan import Plan
from quantmoe.suggest import did_you_mean

BLOCK_SOURCES = ("predicted", "measured")
ROLE_ALIASES = {"attention": "attention", "routed_expert": "routed_expert", "experts": "routed_expert",
                "routed": "routed_expert", "shared_expert": "shared_expert", "shared": "shared_expert",
                "dense_mlp": "dense_mlp", "dense": "dense_mlp"}


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    hint = did_you_mean(word, choices, cutoff=0.5)
    return f"{hint} " if hint else ""


def top(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the n highest scores; ties keep index order."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n]]


# --- rules --------------------------------------------------------------------------------------


class Rule:
    """A rule assigns bits to some linears. Subclasses are frozen dataclasses, registered by name."""

    name: ClassVar[str]
    compact_fields: ClassVar[tuple[str, ...]]  # field order of the compact form
    choices: ClassVar[Mapping[str, Sequence[str]]] = {}

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"check `bits` of rule {self.name!r}: {self.bits} is not one of "
                             f"{', '.join(map(str, SUPPORTED_BITS))}")
        for key in ("k", "n"):
            if getattr(self, key, 1) < 1:
                raise ValueError(f"check `{key}` of rule {self.name!r}: it must be a positive integer")
        for key, allowed in self.choices.items():
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ValueError(f"check `{key}` of rule {self.name!r}: {value!r} is not one of "
                                 f"{', '.join(allowed)}; {_did_you_mean(str(value), allowed)}")

    def needs(self) -> str | None:
        """The kind of `Evidence` this rule ranks by, if any."""
        return None

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        raise NotImplementedError

    def compact(self) -> str:
        values = [getattr(self, f) for f in self.compact_fields]
        defaults = {f.name: f.default for f in fields(self)}
        while len(values) > 2 and values[-1] == defaults[self.compact_fields[len(values) - 1]]:
            values.pop()
        return f"{self.name}={':'.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}"

    def _experts(self, picks: Mapping[BlockAnatomy, Sequence[int]]) -> dict[str, int]:
        return {name: self.bits for b, experts in picks.items() for e in experts for name in b.experts[e]}

    def _at_most(self, key: str, limit: int, what: str) -> None:
        if getattr(self, key) > limit:
            raise ValueError(f"check `{key}` of rule {self.name!r}: {getattr(self, key)} is more than the {what}")


def _moe(anatomy: ModelAnatomy) -> list[BlockAnatomy]:
    return [b for b in anatomy.blocks if b.is_moe]


def _role_rule(name: str, roles: tuple[str, ...], doc: str) -> type[Rule]:
    @dataclass(frozen=True)
    class RoleRule(Rule):
        bits: int
        compact_fields: ClassVar[tuple[str, ...]] = ("bits",)

        def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
            return {u.name: self.bits for u in anatomy.units if u.role in roles}

    RoleRule.name, RoleRule.__doc__ = name, doc
    RoleRule.__name__ = RoleRule.__qualname__ = f"{name.title()}Rule"
    return RoleRule


Uniform = _role_rule("uniform", QUANTIZABLE_ROLES, "Every linear.")
Attention = _role_rule("attention", ("attention", "dense_mlp"), "The paper's other_block: attention + dense MLP.")
Dense = _role_rule("dense", ("dense_mlp",), "Dense MLPs (role dense_mlp: of dense blocks, or beside the experts).")
Shared = _role_rule("shared", ("shared_expert",), "Shared experts.")
Experts = _role_rule("experts", ("routed_expert",), "Routed experts.")


@dataclass(frozen=True)
class TopK(Rule):
    """In every MoE block, the k most frequently routed experts (the paper's topK_T)."""

    k: int
    bits: int
    name: ClassVar[str] = "topk"
    compact_fields: ClassVar[tuple[str, ...]] = ("k", "bits")

    def needs(self) -> str:
        return "routing"

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        blocks = _moe(anatomy)
        self._at_most("k", min(b.num_experts for b in blocks), "experts of a block")
        return self._experts({b: top(evidence.expert_scores("frequency", b, self.name), self.k) for b in blocks})


@dataclass(frozen=True)
class RandomK(Rule):
    """In every MoE block, k experts drawn at random: one draw per expert (gate/up/down move together)."""

    k: int
    bits: int
    seed: int = 0
    name: ClassVar[str] = "randomk"
    compact_fields: ClassVar[tuple[str, ...]] = ("k", "bits", "seed")

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        blocks = _moe(anatomy)
        self._at_most("k", min(b.num_experts for b in blocks), "experts of a block")
        return self._experts({b: np.random.default_rng([self.seed, b.index]).choice(b.num_experts, self.k, False)
                              for b in blocks})


@dataclass(frozen=True)
class Global(Rule):
    """The n top experts across all MoE blocks, ranked by `by`."""

    n: int
    bits: int
    by: str = "frequency"
    name: ClassVar[str] = "global"
    compact_fields: ClassVar[tuple[str, ...]] = ("n", "bits", "by")
    choices: ClassVar[Mapping[str, Sequence[str]]] = {"by": tuple(EXPERT_RANKINGS)}

    def needs(self) -> str:
        return EXPERT_RANKINGS[self.by]

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        blocks = _moe(anatomy)
        pairs = [(b, e) for b in blocks for e in range(b.num_experts)]
        self._at_most("n", len(pairs), f"{len(pairs)} routed experts")
        scores = np.concatenate([evidence.expert_scores(self.by, b, self.name) for b in blocks])
        return {name: self.bits for i in top(scores, self.n) for name in pairs[i][0].experts[pairs[i][1]]}


@dataclass(frozen=True)
class First(Rule):
    """Every expert of the first n MoE blocks."""

    n: int
    bits: int
    name: ClassVar[str] = "first"
    compact_fields: ClassVar[tuple[str, ...]] = ("n", "bits")

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        blocks = _moe(anatomy)
        self._at_most("n", len(blocks), f"{len(blocks)} MoE blocks")
        chosen = blocks[: self.n] if self.name == "first" else blocks[len(blocks) - self.n:]
        return self._experts({b: range(b.num_experts) for b in chosen})


@dataclass(frozen=True)
class Last(First):
    """Every expert of the last n MoE blocks."""

    name: ClassVar[str] = "last"


@dataclass(frozen=True)
class Kind(Rule):
    """Every linear of one kind (the paper's keyword rule, e.g. all down_proj), optionally of one role."""

    kind: str
    bits: int
    role: str | None = None
    name: ClassVar[str] = "kind"
    compact_fields: ClassVar[tuple[str, ...]] = ("kind", "bits", "role")
    choices: ClassVar[Mapping[str, Sequence[str]]] = {"role": tuple(ROLE_ALIASES)}

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        role = ROLE_ALIASES.get(self.role or "")
        out = {u.name: self.bits for u in anatomy.units if u.kind == self.kind and role in (None, u.role)}
        if not out:
            kinds = sorted({u.kind for u in anatomy.units if role in (None, u.role)})
            raise ValueError(f"check `kind` of rule 'kind': no {role or ''} linear of kind {self.kind!r} in this "
                             f"{anatomy.family} model; {_did_you_mean(self.kind, kinds)}kinds: {', '.join(kinds)}")
        return out


@dataclass(frozen=True)
class Pattern(Rule):
    """Linears whose name fully matches a regular expression."""

    pattern: str
    bits: int
    name: ClassVar[str] = "pattern"
    compact_fields: ClassVar[tuple[str, ...]] = ("pattern", "bits")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"check rule 'pattern': {self.pattern!r} is not a regular expression ({err})") from None

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        out = {u.name: self.bits for u in anatomy.units if re.fullmatch(self.pattern, u.name)}
        if not out:
            raise ValueError(f"check rule 'pattern': {self.pattern!r} matches no quantizable linear "
                             f"(names look like {anatomy.units[-1].name!r})")
        return out


@dataclass(frozen=True)
class Outlier(Rule):
    """The top `percent`% (rounded, at least one) of routed-expert linears by outlier score, per linear."""

    percent: float
    bits: int
    name: ClassVar[str] = "outlier"
    compact_fields: ClassVar[tuple[str, ...]] = ("percent", "bits")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.percent <= 100:
            raise ValueError(f"check `percent` of rule 'outlier': {self.percent} is not in (0, 100]")

    def needs(self) -> str:
        return "outlier"

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        names = [u.name for u in anatomy.units if u.role == "routed_expert"]
        count = max(1, round(self.percent / 100 * len(names)))
        return {names[i]: self.bits for i in top(evidence.linear_scores(names, self.name), count)}


@dataclass(frozen=True)
class Importance(Rule):
    """Every expert of the n most important MoE blocks (lowest input/output similarity)."""

    n: int
    bits: int
    source: str = "predicted"
    name: ClassVar[str] = "importance"
    compact_fields: ClassVar[tuple[str, ...]] = ("n", "bits", "source")
    choices: ClassVar[Mapping[str, Sequence[str]]] = {"source": BLOCK_SOURCES}

    def needs(self) -> str:
        return "importance"

    def assign(self, anatomy: ModelAnatomy, evidence: Evidence) -> dict[str, int]:
        blocks = _moe(anatomy)
        self._at_most("n", len(blocks), f"{len(blocks)} MoE blocks")
        scores = evidence.block_scores([b.index for b in blocks], self.source, self.name)
        return self._experts({blocks[i]: range(blocks[i].num_experts) for i in top(scores, self.n)})


RULES: dict[str, type[Rule]] = {r.name: r for r in (Uniform, Attention, Dense, Shared, Experts, TopK, RandomK,
                                                    Global, First, Last, Kind, Pattern, Outlier, Importance)}
ALIASES = {"other": "attention", "other_block": "attention", "routed": "experts", "all": "uniform"}


def get_rule(name: str) -> type[Rule]:
    """The rule class registered as `name` (or an alias); unknown names get "did you mean"."""
    key = ALIASES.get(name, name)
    if key not in RULES:
        known = [*RULES, *ALIASES, "preset"]
        raise ValueError(f"unknown policy rule {name!r}; {_did_you_mean(name, known)}rules: {', '.join(RULES)}, preset")
    return RULES[key]


# --- composition --------------------------------------------------------------------------------

ROLE_RULE = {"attention": "attention=B", "dense_mlp": "attention=B or dense=B", "shared_expert": "shared=B",
             "routed_expert": "experts=B"}


def policy_needs(rules: Sequence[Rule]) -> list[str]:
    """The kinds of evidence (see `Evidence`) the rules need, in order, without repeats."""
    return list(dict.fromkeys(n for r in rules if (n := r.needs())))


def assign_bits(rules: Sequence[Rule], anatomy: ModelAnatomy, evidence: Evidence = Evidence()) -> dict[str, int]:
    """Bits of every quantizable linear: the rules in order, a later rule overriding earlier ones."""
    if not rules:
        raise ValueError("the policy is empty: give at least one rule, e.g. uniform=4")
    bits: dict[str, int] = {}
    for rule in rules:
        bits.update(rule.assign(anatomy, evidence))
    missing = [u for u in anatomy.units if u.name not in bits]
    if missing:
        roles = list(dict.fromkeys(u.role for u in missing))
        raise ValueError(f"the policy leaves {len(missing)} linears without bits ({', '.join(roles)}, e.g. "
                         f"{missing[0].name}): start it with uniform=B or add "
                         f"{', '.join(ROLE_RULE[r] for r in roles)}")
    return bits


def build_plan(rules: Sequence[Rule], anatomy: ModelAnatomy, evidence: Evidence = Evidence(),
               group_size: int | None = 128, symmetric: bool = True, clip: str = "none") -> Plan:
    """Apply `rules` in order (later ones override) and write the result as a `Plan`."""
    return plan_from_bits(anatomy, assign_bits(rules, anatomy, evidence), group_size, symmetric, clip)
