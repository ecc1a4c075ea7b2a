"""Text and token loading shared by every command: the embedded text splits, local files and hub corpora."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantmoe.models import embedded_root

TEXT_SPLITS = ("calibration", "validation", "test")
DOC_SEPARATOR = "\n\n\n"


def split_path(split: str) -> Path:
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(TEXT_SPLITS)}")
    return embedded_root() / "data" / f"{split}.txt"


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """Token ids of a split file; documents are joined by the end-of-text token."""
    docs = [d for d in text.split(DOC_SEPARATOR) if d.strip()]
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def split_tokens(split: str, tokenizer) -> np.ndarray:
    """Token ids of an embedded text split (documents joined by end-of-text)."""
    return tokenize_text(tokenizer, split_path(split).read_text(encoding="utf-8"))


def calibration_tokens(source: str, tokenizer) -> np.ndarray:
    """Token ids of an embedded split, a hub corpus (wikitext2, c4) or a local UTF-8 text file."""
    from quantmoe.data.corpora import load_tokens

    return load_tokens(source, tokenizer)
