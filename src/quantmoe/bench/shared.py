"""What every run of one model shares, computed once and cached on disk.

The full-precision weights (and their hash), the evaluation windows and the reference
log-probabilities for KL, the statistics of data-driven policies and the solver's damage
table. Reference log-probabilities are kept in float32 (see ``reference_logprobs``) in a
safetensors file keyed by the weight hash, split and window settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantmoe.anatomy import ModelAnatomy, describe
from quantmoe.bench.sweep import ModelSpec, SweepConfig
from quantmoe.quant.plan import Plan

log = logging.getLogger(__name__)

COPY_LIMIT_BYTES = 4 * 2**30  # larger models are reloaded for each run instead of deep-copied

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name) or "model"


@dataclass
class ModelContext:
    spec: ModelSpec
    sweep: SweepConfig
    cache_dir: Path
    model: nn.Module
    tokenizer: Any
    anatomy: ModelAnatomy
    sha256: str
    _windows: torch.Tensor | None = None
    _reference: list[torch.Tensor] | None = None
    _damage: Any = None
    _evidence: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, spec: ModelSpec, sweep: SweepConfig, cache_dir: Path) -> ModelContext:
        from quantmoe.models import model_fingerprint

        model, tokenizer = _load(spec)
        sha = model_fingerprint(model)
        return cls(spec=spec, sweep=sweep, cache_dir=Path(cache_dir) / f"{_slug(spec.name)}-{sha[:12]}",
                   model=model, tokenizer=tokenizer, anatomy=describe(model), sha256=sha)

    # --- models ------------------------------------------------------------------------------

    def fresh_model(self) -> nn.Module:
        """A full-precision model to quantize in place: a copy, or a reload when the model is large."""
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if size <= COPY_LIMIT_BYTES:
            return copy.deepcopy(self.model)
        return _load(self.spec)[0]

    # --- evaluation ----------------------------------------------------------------------------

    @property
    def windows(self) -> torch.Tensor:
        if self._windows is None:
            from quantmoe.data import calibration_tokens
            from quantmoe.eval.metrics import make_windows

            ppl = self.sweep.eval.perplexity
            self._windows = make_windows(calibration_tokens(ppl.split, self.tokenizer), ppl.seq_len, ppl.max_windows)
        return self._windows

    @property
    def reference(self) -> list[torch.Tensor]:
        """The full-precision log-probabilities on the evaluation windows (cached on disk)."""
        if self._reference is None:
            from safetensors.torch import load_file, save_file

            from quantmoe.atomic import atomic_write
            from quantmoe.eval.metrics import reference_logprobs

            ppl = self.sweep.eval.perplexity
            ids = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()[:12]
            path = self.cache_dir / f"reference-{_slug(ppl.split)}-{ppl.seq_len}x{len(self.windows)}-{ids}.safetensors"
            if path.is_file():
                data = load_file(str(path))
                self._reference = [data[f"batch{i}"] for i in range(len(data))]
                log.info("reference log-probabilities from %s", path)
            else:
                self._reference = reference_logprobs(self.model, self.windows, batch_size=ppl.batch_size)
                tensors = {f"batch{i}": t.contiguous() for i, t in enumerate(self._reference)}
                atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
                log.info("saved reference log-probabilities to %s", path)
        return self._reference

    # --- allocation evidence -----------------------------------------------------------------

    def statistics_config(self):
        from quantmoe.alloc.evidence import StatisticsConfig

        s = self.sweep.statistics
        return StatisticsConfig(split=s.split, rank_split=s.rank_split, windows=s.windows, seq_len=s.seq_len,
                                seed=s.seed, massive_threshold=s.massive_threshold)

    def evidence(self, needs: list[str]):
        from quantmoe.alloc.evidence import gather_evidence
        from quantmoe.alloc.scorers import Evidence

        missing = [n for n in needs if n not in self._evidence]
        if missing:
            found = gather_evidence(missing, self.model, self.tokenizer, self.anatomy, self.statistics_config(),
                                    model_name=self.spec.name, cache_dir=self.cache_dir.parent,
                                    fingerprint=self.sha256)
            self._evidence.update({n: getattr(found, n) for n in missing})
        return Evidence(**{n: self._evidence[n] for n in needs})

    def routing_summary(self) -> dict[str, Any]:
        """Routing frequency and mean router weight per MoE block (for reports)."""
        routing = self.evidence(["routing"]).routing
        return {"tokens": routing.tokens, "split": self.sweep.statistics.split,
                "frequency": {str(b): routing.frequency(b).tolist() for b in routing.counts},
                "mean_weight": {str(b): routing.mean_weight(b).tolist() for b in routing.counts}}

    def damage_config(self):
        from quantmoe.alloc.damage import DamageConfig

        s, q = self.sweep.statistics, self.sweep.quantizer
        return DamageConfig(split=s.split, windows=s.damage_windows, seq_len=s.seq_len, seed=s.seed,
                            group_size=q.group_size, symmetric=q.symmetric, clip=q.clip,
                            metric=s.damage_metric, act_order=q.gptq().act_order, refine=q.refine)

    def damage(self, widths: tuple[int, ...] = ()):
        """The solver's measured damage table (one per model, with a column for every choice of every solver
        run of the sweep; cached as npz, keyed by content)."""
        from quantmoe.quant.grid import QuantSpec

        q = self.sweep.quantizer
        base = QuantSpec(4, q.group_size, q.symmetric, q.clip)
        choices: dict = {}
        for r in self.sweep.runs:
            if r.solver:
                choices.update(dict.fromkeys(r.solver.menu_specs() or [replace(base, bits=w) for w in r.solver.widths]))
        choices.update(dict.fromkeys(replace(base, bits=w) for w in widths))
        menu = tuple(sorted(choices, key=lambda s: (s.bits, s.group_size or 1 << 30, s.symmetric, s.clip)))
        if self._damage is None or not set(menu) <= set(self._damage.columns(base)):
            from quantmoe.alloc.damage import load_or_measure_damage
            from quantmoe.cache import content_key

            config = self.damage_config()
            path = self.cache_dir / f"damage-{content_key(config.identity())[:16]}.npz"
            self._damage = load_or_measure_damage(copy.deepcopy(self.model), self.tokenizer, self.anatomy,
                                                  tuple(s.bits for s in menu), config, path, fingerprint=self.sha256,
                                                  menu=menu)
        return self._damage

    def plan_for(self, run) -> Plan:
        q = self.sweep.quantizer
        if run.full_precision:
            return Plan.uniform(16)
        if run.plan is not None:
            return Plan.from_yaml(Path(run.plan))
        if run.solver is not None:
            from quantmoe.alloc.solver import solve

            return solve(self.anatomy, self.damage(), run.solver.config(),
                         group_size=q.group_size, symmetric=q.symmetric, clip=q.clip).plan
        from quantmoe.alloc.policies import build_plan, policy_needs
        from quantmoe.alloc.presets import parse_policy

        rules = parse_policy(run.policy)
        return build_plan(rules, self.anatomy, self.evidence(policy_needs(rules)), group_size=q.group_size,
                          symmetric=q.symmetric, clip=q.clip)

    def statistics_matter(self, run) -> bool:
        """Whether the run's plan depends on the statistics settings (data-driven rules, solver)."""
        if run.solver is not None:
            return True
        if run.policy is None:
            return False
        from quantmoe.alloc.policies import policy_needs
        from quantmoe.alloc.presets import parse_policy

        return bool(policy_needs(parse_policy(run.policy)))


def _load(spec: ModelSpec):
    from quantmoe.models import load_model

    if spec.dtype not in DTYPES:
        raise ValueError(f"check `dtype` of model {spec.name}: {spec.dtype!r} is not one of {', '.join(DTYPES)}")
    return load_model(spec.name, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code)


def bitmap(anatomy: ModelAnatomy, plan_bits: dict[str, int]) -> dict[str, Any]:
    """Mean bits (weighted by parameters) per block of attention, dense MLP, shared experts, each routed expert."""
    numel = {u.name: u.numel for u in anatomy.units}

    def mean(names) -> float | None:
        total = sum(numel[n] for n in names)
        return None if not total else sum(plan_bits[n] * numel[n] for n in names) / total

    return {"blocks": [{"index": b.index, "is_moe": b.is_moe, "attention": mean(b.attention),
                        "dense": mean(b.dense_mlp), "shared": mean(b.shared),
                        "experts": [mean(names) for names in b.experts]} for b in anatomy.blocks]}


def run_key(ctx_sha: str, identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"model": ctx_sha, **identity}, sort_keys=True, default=str).encode()).hexdigest()
