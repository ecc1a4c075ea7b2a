"""Reading policies (compact and YAML forms) and the named presets of the paper.

`parse_policy` accepts:

* the compact form ``"experts=2,attention=4,shared=8,topk=30:4"`` (items ``name=value``, a
  value's fields separated by ``:``; a pattern's regex may contain ``:`` but no ``,``);
* a preset name alone (``"deepseek-shared8-top30"``) or as an item (``preset=NAME``);
* a YAML file (``*.yaml`` / ``*.yml``) or an already-loaded list of one-key mappings::

      - experts: 2
      - shared: 8
      - topk: {k: 30, bits: 4}   # or "30:4"

Rules apply in order; later rules override earlier ones (see `quantmoe.alloc.policies`).

Paper shapes: `paper_config("mixtral-8x7b")` is transformers' MixtralConfig defaults (its
shapes). `paper_config("deepseek-moe-16b")` is a ``deepseek_v3`` config with DeepSeek-MoE-16B's
shapes: 28 blocks of hidden 2048, block 0 a dense MLP of 10944, 64 routed experts of 1408 (top-6)
and 2 shared experts of 1408 (2816 in total). DeepSeek-MoE-16B uses 16-head multi-head attention
(4 x 2048 x 2048 weights per block) but deepseek_v3 only has MLA; with q_lora_rank=None,
qk_nope_head_dim=96, qk_rope_head_dim=64, v_head_dim=128 and kv_lora_rank=1280 its four MLA
linears hold exactly 4 x 2048^2 weights (2048*2560 + 2048*1344 + 1280*3584 + 2048*2048), so every
average-bit figure is that of the real model. ``"deepseek-moe-16b-qwen2"`` is the same shapes as a
qwen2_moe config (true MHA, one shared expert of 2816); both give identical figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from quantmoe.alloc.policies import Pattern, Rule, get_rule
from quantmoe.suggest import did_you_mean
from quantmoe.yamlfile import read_yaml


@dataclass(frozen=True)
class Preset:
    """A configuration of the paper: its policy, group size, and the paper's figures (None: not given)."""

    name: str
    model: str  # a key of PAPER_MODELS
    policy: str  # compact form
    group_size: int
    paper_bits: float | None = None  # the paper's average bits, as rounded there
    paper_score: float | None = None  # six-task mean accuracy (%), DeepSeek-MoE-16B
    note: str = ""


_DS_TOPK_SCORES = {1: 60.97, 5: 62.01, 10: 62.99, 20: 64.01, 25: 64.66, 30: 65.34, 45: 66.74}
_DS_TOPK_BITS = {1: 2.27, 30: 3.12}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("mixtral-experts2-attn4", "mixtral-8x7b", "experts=2,attention=4", 128, 2.06),
    *(Preset(f"mixtral-experts2-attn4-first{n}", "mixtral-8x7b", f"experts=2,attention=4,first={n}:4", 128, bits)
      for n, bits in ((4, 2.30), (8, 2.54))),
    Preset("mixtral-experts2-attn4-top4", "mixtral-8x7b", "experts=2,attention=4,topk=4:4", 128, 3.03),
    *(Preset(f"deepseek-uniform{b}", "deepseek-moe-16b", f"uniform={b}", 64, float(b), score)
      for b, score in ((2, 49.44), (3, 65.14), (4, 66.78), (8, 67.81))),
    Preset("deepseek-shared2-experts2-other4", "deepseek-moe-16b", "experts=2,shared=2,attention=4", 64, 2.067,
           57.32),
    Preset("deepseek-shared4-experts2-other4", "deepseek-moe-16b", "experts=2,shared=4,attention=4", 64, 2.126,
           61.14),
    *(Preset(f"deepseek-shared8-top{k}", "deepseek-moe-16b", f"experts=2,shared=8,attention=4,topk={k}:4", 64,
             _DS_TOPK_BITS.get(k), score) for k, score in _DS_TOPK_SCORES.items()),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        hint = did_you_mean(name, PRESETS, cutoff=0.5)
        raise ValueError(f"unknown preset {name!r}; {hint + ' ' if hint else ''}presets: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- paper model shapes -------------------------------------------------------------------------

_DEEPSEEK_16B = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                     intermediate_size=10944, moe_intermediate_size=1408, num_experts_per_tok=6, vocab_size=102400)
PAPER_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-8x7b": ("mixtral", {}),
    "deepseek-moe-16b": ("deepseek_v3", dict(
        _DEEPSEEK_16B, n_routed_experts=64, n_shared_experts=2, first_k_dense_replace=1, n_group=1, topk_group=1,
        q_lora_rank=None, kv_lora_rank=1280, qk_nope_head_dim=96, qk_rope_head_dim=64, v_head_dim=128)),
    "deepseek-moe-16b-qwen2": ("qwen2_moe", dict(
        _DEEPSEEK_16B, num_experts=64, shared_expert_intermediate_size=2816, mlp_only_layers=[0],
        decoder_sparse_step=1)),
}


def paper_config(name: str):
    """A transformers config with the shapes of a model of the paper (see the module docstring)."""
    from transformers import AutoConfig

    if name not in PAPER_MODELS:
        raise ValueError(f"unknown paper model {name!r}; choose one of {', '.join(PAPER_MODELS)}")
    model_type, kwargs = PAPER_MODELS[name]
    return AutoConfig.for_model(model_type, **kwargs)


# --- parsing ------------------------------------------------------------------------------------

_CONVERT = {"int": int, "float": float}


def _usage(cls: type[Rule]) -> str:
    defaults = {f.name: f.default for f in fields(cls)}
    parts = [f.upper() if defaults[f] is MISSING else f"[{f.upper()}]" for f in cls.compact_fields]
    return f"{cls.name}={':'.join(parts)}"


def _convert(cls: type[Rule], key: str, value: Any) -> Any:
    kind = next(f.type for f in fields(cls) if f.name == key)
    convert = _CONVERT.get(str(kind).replace(" | None", ""), str)
    try:
        return convert(value) if not isinstance(value, bool) else value
    except (TypeError, ValueError):
        what = "an integer" if convert is int else "a number"
        raise ValueError(f"check `{key}` of rule {cls.name!r}: {value!r} is not {what}") from None


def _rule_from_item(name: str, value: Any) -> list[Rule]:
    if name == "preset":
        return list(parse_policy(get_preset(str(value)).policy))
    cls = get_rule(name)
    allowed = [f.name for f in fields(cls)]
    if isinstance(value, Mapping):
        kwargs = dict(value)
        for key in kwargs:
            if key not in allowed:
                hint = did_you_mean(str(key), allowed, n=1)
                hint = f"{hint} " if hint else ""
                raise ValueError(f"check rule {cls.name!r}: unknown field {key!r}; {hint}fields: {', '.join(allowed)}")
    else:
        text = str(value).strip()
        parts = text.rsplit(":", 1) if cls is Pattern else text.split(":")
        if len(parts) > len(cls.compact_fields) or not text:
            raise ValueError(f"check rule {cls.name!r}: {text!r} does not fit {_usage(cls)}")
        kwargs = dict(zip(cls.compact_fields, parts, strict=False))
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in kwargs]
    if missing:
        raise ValueError(f"check rule {cls.name!r}: `{missing[0]}` is missing; write it as {_usage(cls)}")
    return [cls(**{k: _convert(cls, k, v) for k, v in kwargs.items()})]


def _parse_items(items: Sequence[Any], source: str) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for item in items:
        if not isinstance(item, Mapping) or len(item) != 1:
            raise ValueError(f"check {source}: each policy item is a one-key mapping like `experts: 2` or "
                             f"`topk: {{k: 30, bits: 4}}`, not {item!r}")
        (name, value), = item.items()
        rules += _rule_from_item(str(name), value)
    return tuple(rules)


def parse_policy(spec: str | Path | Sequence[Any]) -> tuple[Rule, ...]:
    """Rules of a compact string, a preset name, a YAML file, or a loaded YAML list (see the module doc)."""
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return _parse_items(spec, "the policy")
    text = str(spec).strip()
    if text.endswith((".yaml", ".yml")) and "=" not in text:
        data = read_yaml(Path(text), "policy file")
        if not isinstance(data, list):
            raise ValueError(f"check {text}: a policy file is a list of rules like `- experts: 2`")
        return _parse_items(data, text)
    if "=" not in text and text in PRESETS:
        return parse_policy(PRESETS[text].policy)
    rules: list[Rule] = []
    for item in (i.strip() for i in text.split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            hint = " (or a preset name)" if "," not in text else ""
            raise ValueError(f"policy item {item!r} should look like name=value, e.g. experts=2{hint}; "
                             f"{'see --help for rules' if not item else _maybe_preset(item)}")
        rules += _rule_from_item(name.strip(), value)
    return tuple(rules)


def _maybe_preset(word: str) -> str:
    hint = did_you_mean(word, [*PRESETS, "uniform", "experts", "attention", "shared"], cutoff=0.5)
    return hint or "see --help for rules and presets"


def format_policy(rules: Sequence[Rule]) -> str:
    """The compact form of `rules` (parse_policy reads it back)."""
    return ",".join(r.compact() for r in rules)
