"""Compatibility names: model loading moved to ``quantmoe.models``, text splits to ``quantmoe.data``."""

from quantmoe.data import TEXT_SPLITS, split_path, split_tokens  # noqa: F401
from quantmoe.models import (  # noqa: F401
    DEFAULT_MODEL,
    EMBEDDED_ENV,
    EMBEDDED_MODELS,
    TOKENIZER_FILES,
    embedded_root,
    load_model,
    local_model_folder,
    resolve_model,
)
