"""Keep the Hugging Face ``datasets`` cache inside the work tree unless told otherwise."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "HF_DATASETS_CACHE"


def ensure_datasets_cache() -> Path | None:
    """Default $HF_DATASETS_CACHE to ``<repo>/.cache/hf_datasets`` (beside ``embedded/``).

    Call before ``datasets`` is imported (lm-eval imports it); if it already is, its
    cache setting is updated too. A set variable is left alone. Returns the cache folder,
    or None outside a clone (``datasets`` then keeps its own default).
    """
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    from quantmoe.models import embedded_root

    try:
        path = embedded_root().parent / ".cache" / "hf_datasets"
    except FileNotFoundError:
        return None
    os.environ[ENV] = str(path)
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_DATASETS_CACHE = path
    log.debug("%s=%s", ENV, path)
    return path
