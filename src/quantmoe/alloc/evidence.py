"""The statistics data-driven rules need, computed once on the full-precision model and cached.

Routing counts, WANDA-like and massive-activation expert scores, weight-outlier scores and the
block-importance predictor (see ``scorers.py`` and ``predictor.py``). Each cached file is named
by a content key (``quantmoe.cache``): the model's weight hash, the SHA-256 of the exact token
windows it was computed on (text content, tokenizer, count, length, seed) and every setting of
the computation (the massive-activation threshold, the predictor's settings and ranking text).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantmoe.alloc.predictor import PredictorConfig
from quantmoe.alloc.scorers import Evidence
from quantmoe.cache import array_sha256, cache_root, content_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatisticsConfig:
    """Which text and how much of it the statistics are computed on."""

    split: str = "calibration"  # embedded split, hub corpus or text file: routing, scorers, predictor training
    rank_split: str = "validation"  # the block-importance predictor ranks blocks on this text
    windows: int = 64
    seq_len: int = 256
    seed: int = 0
    massive_threshold: float = 1000.0  # |h| at or above which a token is a massive-activation token
    predictor: PredictorConfig = field(default_factory=PredictorConfig)  # its seed is replaced by `seed`

    def __post_init__(self) -> None:
        if self.windows < 1 or self.seq_len < 2:
            raise ValueError("check the statistics settings: `windows` >= 1 and `seq_len` >= 2")
        if self.massive_threshold <= 0:
            raise ValueError(f"check `massive_threshold`: {self.massive_threshold} must be positive")


def _cached(path: Path, load: Callable[[str], Any], compute: Callable[[], Any]) -> Any:
    if path.is_file():
        log.info("reusing %s", path)
        return load(path.read_text(encoding="utf-8"))
    value = compute()
    value.save(path)
    log.info("saved %s", path)
    return value


def model_cache_dir(model_name: str, fingerprint: str, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of one model: its name (a label) and weight hash."""
    return cache_root(cache_dir) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(model_name).name)}-{fingerprint[:12]}"


def gather_evidence(needs: Sequence[str], model, tokenizer, anatomy, config: StatisticsConfig = StatisticsConfig(),
                    model_name: str = "model", cache_dir: str | Path | None = None,
                    routing: Any = None, fingerprint: str | None = None) -> Evidence:
    """Compute (or reuse from the cache) the statistics in ``needs`` on the full-precision ``model``.

    ``routing``: routing statistics given by the user (used instead of computing them);
    ``fingerprint``: the model's weight hash when the caller has it (else computed).
    """
    from quantmoe.alloc import predictor, scorers
    from quantmoe.calib.data import calibration_windows
    from quantmoe.calib.routing import RoutingStats, collect_routing
    from quantmoe.data import calibration_tokens
    from quantmoe.models import model_fingerprint

    found: dict[str, Any] = {} if routing is None else {"routing": routing}
    todo = [n for n in needs if n not in found]
    if not todo or model is None:
        return Evidence(**found)
    fingerprint = fingerprint or model_fingerprint(model)
    folder = model_cache_dir(model_name, fingerprint, cache_dir)
    windows_of: dict[str, torch.Tensor] = {}

    def windows(split: str) -> torch.Tensor:
        if split not in windows_of:
            windows_of[split] = calibration_windows(calibration_tokens(split, tokenizer), config.windows,
                                                    config.seq_len, config.seed)
        return windows_of[split]

    def path(kind: str, **settings: Any) -> Path:
        key = content_key({"kind": kind, "model": fingerprint, "windows": array_sha256(windows(config.split)),
                           **settings})
        return folder / f"{kind}-{key[:24]}.json"

    pconfig = PredictorConfig(**{**asdict(config.predictor), "seed": config.seed})
    for need in todo:
        if need == "routing":
            found[need] = _cached(path("routing"), RoutingStats.from_json,
                                  lambda: collect_routing(model, anatomy, windows(config.split)))
        elif need == "wanda":
            found[need] = _cached(path("wanda"), scorers.ExpertScores.from_json,
                                  lambda: scorers.wanda_expert_scores(model, anatomy, windows(config.split)))
        elif need == "massive":
            found[need] = _cached(path("massive", threshold=config.massive_threshold), scorers.ExpertScores.from_json,
                                  lambda: scorers.massive_routing(model, anatomy, windows(config.split),
                                                                  config.massive_threshold))
        elif need == "outlier":  # weights only: cheap, not cached
            found[need] = scorers.outlier_scores(model, anatomy)
        elif need == "importance":
            found[need] = _cached(path("importance", predictor=asdict(pconfig),
                                       rank_windows=array_sha256(windows(config.rank_split))),
                                  predictor.BlockImportance.from_json,
                                  lambda: predictor.block_importance(model, anatomy, windows(config.split),
                                                                     windows(config.rank_split), pconfig))
    return Evidence(**found)


def load_routing(path: Path, anatomy) -> Any:
    """Routing statistics saved as JSON, checked against the model's MoE blocks."""
    from quantmoe.calib.routing import RoutingStats

    stats = RoutingStats.from_json(Path(path).read_text(encoding="utf-8"))
    expected = {b.index: b.num_experts for b in anatomy.blocks if b.is_moe}
    if {b: len(c) for b, c in stats.counts.items()} != expected:
        raise ValueError(f"check --routing: {path} counts experts of other blocks than this model's "
                         f"MoE blocks ({len(expected)} blocks of {max(expected.values(), default=0)} experts)")
    return stats
