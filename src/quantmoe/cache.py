"""Where computed statistics are cached, and the content keys that name them.

Every cache entry is keyed by a SHA-256 over what it was computed from: the model's weight
hash, the exact token windows (so the text's content, the tokenizer, the window count,
length and seed), and every setting of the computation. Renaming a text file keeps its
entries; editing it, or changing any setting, makes new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

KEY_FORMAT = 1  # bump when a cached computation changes its result for the same inputs


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $QUANTMOE_CACHE, else ~/.cache/quantmoe."""
    return Path(cache_dir or os.environ.get("QUANTMOE_CACHE") or Path.home() / ".cache" / "quantmoe")


def array_sha256(values: torch.Tensor | np.ndarray) -> str:
    """SHA-256 over an array's dtype, shape and bytes (e.g. a (windows, seq_len) token tensor)."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    h = hashlib.sha256(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def content_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 of ``parts`` as canonical JSON (sorted keys), with the key format version."""
    text = json.dumps({"key_format": KEY_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
