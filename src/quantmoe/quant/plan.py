"""Quantization plans: which settings every quantizable linear gets.

A plan is data. Each unit's settings are resolved by precedence, most specific last:

    default  <  role  <  linear kind  <  name pattern  <  exact module name

* ``default``: settings for every quantizable linear.
* ``roles``: per role (``attention``, ``routed_expert``, ``shared_expert``, ``dense_mlp``).
* ``kinds``: per linear kind (``down_proj``, ``q_proj``, ...).
* ``patterns``: a list of ``{pattern: REGEX, ...settings}`` matched with ``re.fullmatch``
  against module names; the first matching pattern wins.
* ``modules``: exact module names.

Settings are ``bits`` (2, 3, 4, 8, or 16 = keep), ``group_size`` (power of two, or null for
per-channel) and ``symmetric``. Any level may set any subset of them.

Example plan.yaml::

    default: {bits: 2, group_size: 128, symmetric: true}
    roles: {attention: {bits: 4}, shared_expert: {bits: 4}}
    patterns:
      - {pattern: 'model\\.layers\\.[0-3]\\..*experts\\..*', bits: 4}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from quantmoe.anatomy import QUANTIZABLE_ROLES, LinearUnit, ModelAnatomy
from quantmoe.quant.grid import QuantSpec
from quantmoe.suggest import did_you_mean

SETTING_KEYS = ("bits", "group_size", "symmetric")
PLAN_KEYS = ("default", "roles", "kinds", "patterns", "modules")
SCALE_BITS = 16  # one float16 scale per group and row


def _check_settings(where: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(settings) - set(SETTING_KEYS)
    if unknown:
        hint = did_you_mean(sorted(unknown)[0], SETTING_KEYS)
        raise ValueError(f"check {where}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"{hint + ' ' if hint else ''}allowed: {', '.join(SETTING_KEYS)}")
    out = dict(settings)
    QuantSpec(**{**{"bits": 16}, **out})  # validates bits / group_size now, naming the setting
    return out


@dataclass(frozen=True)
class Plan:
    default: QuantSpec = field(default_factory=lambda: QuantSpec(bits=4))
    roles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    kinds: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    patterns: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    modules: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role, s in self.roles.items():
            if role not in QUANTIZABLE_ROLES:
                raise ValueError(f"check `roles` in the plan: {role!r} is not one of {', '.join(QUANTIZABLE_ROLES)}")
            _check_settings(f"`roles.{role}`", s)
        for kind, s in self.kinds.items():
            _check_settings(f"`kinds.{kind}`", s)
        for pattern, s in self.patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"check `patterns` in the plan: {pattern!r} is not a regular expression ({err})") from None
            _check_settings(f"pattern {pattern!r}", s)
        for name, s in self.modules.items():
            _check_settings(f"`modules.{name}`", s)

    @classmethod
    def uniform(cls, bits: int, group_size: int | None = 128, symmetric: bool = True) -> Plan:
        return cls(default=QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric))

    def spec_for(self, unit: LinearUnit) -> QuantSpec:
        spec = self.default
        layers = [self.roles.get(unit.role), self.kinds.get(unit.kind)]
        layers.append(next((s for p, s in self.patterns if re.fullmatch(p, unit.name)), None))
        layers.append(self.modules.get(unit.name))
        for settings in layers:
            if settings:
                spec = replace(spec, **settings)
        return spec

    def resolve(self, anatomy: ModelAnatomy) -> dict[str, QuantSpec]:
        """Settings of every quantizable unit. Names or patterns that match nothing are errors."""
        names = {u.name for u in anatomy.units}
        missing = [n for n in self.modules if n not in names]
        if missing:
            raise ValueError(f"check `modules` in the plan: {missing[0]!r} is not a quantizable linear of this "
                             f"model ({anatomy.family}); see `quantmoe inspect`")
        for pattern, _ in self.patterns:
            if not any(re.fullmatch(pattern, n) for n in names):
                raise ValueError(f"check `patterns` in the plan: {pattern!r} matches no quantizable linear "
                                 f"(names look like {anatomy.units[-1].name!r})")
        kinds = {u.kind for u in anatomy.units}
        for kind in self.kinds:
            if kind not in kinds:
                raise ValueError(f"check `kinds` in the plan: {kind!r} is not a linear kind of this model "
                                 f"({', '.join(sorted(kinds))})")
        return {u.name: self.spec_for(u) for u in anatomy.units}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"default": {"bits": self.default.bits, "group_size": self.default.group_size,
                                         "symmetric": self.default.symmetric}}
        if self.roles:
            d["roles"] = {k: dict(v) for k, v in self.roles.items()}
        if self.kinds:
            d["kinds"] = {k: dict(v) for k, v in self.kinds.items()}
        if self.patterns:
            d["patterns"] = [{"pattern": p, **s} for p, s in self.patterns]
        if self.modules:
            d["modules"] = {k: dict(v) for k, v in self.modules.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "the plan") -> Plan:
        unknown = set(d) - set(PLAN_KEYS)
        if unknown:
            hint = did_you_mean(sorted(unknown)[0], PLAN_KEYS)
            raise ValueError(f"check {source}: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"{hint + ' ' if hint else ''}allowed: {', '.join(PLAN_KEYS)}")
        default = _check_settings("`default`", d.get("default") or {})
        patterns = []
        for item in d.get("patterns") or []:
            if not isinstance(item, Mapping) or "pattern" not in item:
                raise ValueError(f"check `patterns` in {source}: each item needs a `pattern` key")
            rest = {k: v for k, v in item.items() if k != "pattern"}
            patterns.append((str(item["pattern"]), rest))
        return cls(default=QuantSpec(**{"bits": 4, **default}), roles=dict(d.get("roles") or {}),
                   kinds=dict(d.get("kinds") or {}), patterns=tuple(patterns), modules=dict(d.get("modules") or {}))

    @classmethod
    def from_yaml(cls, path: Path) -> Plan:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"check {path}: a plan is a mapping with keys {', '.join(PLAN_KEYS)}")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def effective_bits_of(spec: QuantSpec, unit: LinearUnit) -> float:
    """Bits per weight including the per-group scale (16 bits) and zero point (``bits`` bits)."""
    if spec.keep:
        return float(spec.bits)
    groups = spec.groups(unit.in_features)
    overhead = groups * unit.out_features * (SCALE_BITS + spec.bits)
    return spec.bits + overhead / unit.numel


@dataclass(frozen=True)
class BitStats:
    average_bits: float  # the paper's: sum(bits x params) / sum(params) over quantizable linears
    effective_bits: float  # including scales and zero points
    params: int


def bit_stats(specs: Mapping[str, QuantSpec], units: Iterable[LinearUnit]) -> BitStats:
    total = bits = eff = 0.0
    for unit in units:
        spec = specs[unit.name]
        total += unit.numel
        bits += spec.bits * unit.numel
        eff += effective_bits_of(spec, unit) * unit.numel
    if total == 0:
        raise ValueError("the plan covers no quantizable linear")
    return BitStats(average_bits=bits / total, effective_bits=eff / total, params=int(total))
