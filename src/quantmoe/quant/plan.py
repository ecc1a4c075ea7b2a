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
per-channel), ``symmetric`` and ``clip`` (``none``, ``mse`` or ``hmse``: the range search of
``quantmoe.quant.grid``). Any level may set any subset of them.

Example plan.yaml::

    default: {bits: 2, group_size: 128, symmetric: true}
    roles: {attention: {bits: 4}, shared_expert: {bits: 4}}
    patterns:
      - {pattern: 'model\\.layers\\.[0-3]\\..*experts\\..*', bits: 4}
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from quantmoe.anatomy import QUANTIZABLE_ROLES, LinearUnit, ModelAnatomy
from quantmoe.quant.grid import SUPPORTED_BITS, QuantSpec
from quantmoe.suggest import did_you_mean
from quantmoe.yamlfile import read_yaml

SETTING_KEYS = ("bits", "group_size", "symmetric", "clip")
PLAN_KEYS = ("default", "roles", "kinds", "patterns", "modules")
SCALE_BITS = 16  # one float16 scale per group and row
PLAN_HEADER = "# quantmoe"  # first line of every plan file quantmoe writes (so --out can tell ours)


def _kind_of(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", float: "a number with a fraction", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_settings(where: str, settings: Any) -> dict[str, Any]:
    """Settings of one plan level, type-checked: ``bits`` an integer, ``group_size`` an integer or null,
    ``symmetric`` true or false (YAML's unquoted booleans; ``"false"`` in quotes is a string)."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"check {where}: expected a mapping of settings like {{bits: 4}}, got {settings!r} "
                         f"({_kind_of(settings)})")
    unknown = set(settings) - set(SETTING_KEYS)
    if unknown:
        hint = did_you_mean(sorted(map(str, unknown))[0], SETTING_KEYS)
        raise ValueError(f"check {where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"{hint + ' ' if hint else ''}allowed: {', '.join(SETTING_KEYS)}")
    allowed = ", ".join(map(str, SUPPORTED_BITS))
    if "bits" in settings and not _is_int(settings["bits"]):
        raise ValueError(f"check `bits` in {where}: expected an integer (one of {allowed}), got "
                         f"{settings['bits']!r} ({_kind_of(settings['bits'])})")
    if "group_size" in settings and settings["group_size"] is not None and not _is_int(settings["group_size"]):
        raise ValueError(f"check `group_size` in {where}: expected an integer power of two or null (per-channel), "
                         f"got {settings['group_size']!r} ({_kind_of(settings['group_size'])})")
    if "symmetric" in settings and not isinstance(settings["symmetric"], bool):
        raise ValueError(f"check `symmetric` in {where}: expected true or false (unquoted), got "
                         f"{settings['symmetric']!r} ({_kind_of(settings['symmetric'])})")
    if "clip" in settings and not isinstance(settings["clip"], str):
        raise ValueError(f"check `clip` in {where}: expected one of none, mse, hmse (a string), got "
                         f"{settings['clip']!r} ({_kind_of(settings['clip'])})")
    out = {k: int(v) if _is_int(v) else v for k, v in settings.items()}
    try:
        QuantSpec(**{**{"bits": 16}, **out})  # validates the values of bits / group_size now
    except ValueError as err:
        raise ValueError(f"{err} (in {where})") from None
    return out


def _mapping(d: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    value = d.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"check `{key}`: expected a mapping (name: {{bits: ...}}), got {value!r} "
                         f"({_kind_of(value)})")
    return dict(value)


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
    def uniform(cls, bits: int, group_size: int | None = 128, symmetric: bool = True, clip: str = "none") -> Plan:
        return cls(default=QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric, clip=clip))

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
        if self.default.clip != "none":
            d["default"]["clip"] = self.default.clip
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
        """A plan from loaded YAML; every value is type-checked and errors name ``source`` and the key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"check {source}: a plan is a mapping with keys {', '.join(PLAN_KEYS)}")
        unknown = set(d) - set(PLAN_KEYS)
        if unknown:
            hint = did_you_mean(sorted(map(str, unknown))[0], PLAN_KEYS)
            raise ValueError(f"check {source}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                             f"{hint + ' ' if hint else ''}allowed: {', '.join(PLAN_KEYS)}")
        prefix = "" if source == "the plan" else f"{source}: "
        try:
            default = _check_settings("`default`", d.get("default") or {})
            levels = {key: _mapping(d, key, source) for key in ("roles", "kinds", "modules")}
            raw_patterns = d.get("patterns") or []
            if not isinstance(raw_patterns, list):
                raise ValueError(f"check `patterns`: expected a list of {{pattern: REGEX, bits: ...}}, "
                                 f"got {raw_patterns!r}")
            patterns = []
            for item in raw_patterns:
                if not isinstance(item, Mapping) or "pattern" not in item:
                    raise ValueError("check `patterns`: each item needs a `pattern` key")
                if not isinstance(item["pattern"], str):
                    raise ValueError(f"check `patterns`: pattern {item['pattern']!r} is not a string")
                rest = {k: v for k, v in item.items() if k != "pattern"}
                patterns.append((item["pattern"], _check_settings(f"pattern {item['pattern']!r}", rest)))
            for key, level in levels.items():
                levels[key] = {name: _check_settings(f"`{key}.{name}`", s) for name, s in level.items()}
            return cls(default=QuantSpec(**{"bits": 4, **default}), patterns=tuple(patterns), **levels)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None

    @classmethod
    def from_yaml(cls, path: Path) -> Plan:
        data = read_yaml(path, "plan file")
        return cls.from_dict({} if data is None else data, source=str(path))

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
