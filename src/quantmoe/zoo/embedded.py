"""The embedded models and text splits that ship with the repository."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

EMBEDDED_ENV = "QUANTMOE_EMBEDDED"
EMBEDDED_MODELS = ("mixtral-s", "deepseek-s")
DEFAULT_MODEL = "mixtral-s"
TEXT_SPLITS = ("calibration", "validation", "test")


def embedded_root() -> Path:
    """The ``embedded/`` folder: $QUANTMOE_EMBEDDED, else the one beside the source tree."""
    env = os.environ.get(EMBEDDED_ENV)
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "embedded"
        if (candidate / "tokenizer").is_dir():
            return candidate
    raise FileNotFoundError(
        f"embedded models not found: run from a clone of the repository or set {EMBEDDED_ENV}"
    )


def resolve_model(name_or_path: str) -> str:
    """An embedded model name becomes its folder; anything else is returned as given."""
    if name_or_path in EMBEDDED_MODELS:
        path = embedded_root() / name_or_path
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no model: rebuild it with `quantmoe zoo train {name_or_path}`")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"{name_or_path}: no such folder. Give an embedded model "
                                f"({', '.join(EMBEDDED_MODELS)}), a local model folder or a hub id")
    return str(Path(name_or_path).expanduser()) if name_or_path.startswith("~") else name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False, quantized_ok: bool = False):
    """Model (eval mode) and tokenizer of an embedded name, a local folder or a hub id.

    A quantized folder (a quantmoe checkpoint or a GPTQ-format folder) is loaded with
    ``quantmoe.load`` when ``quantized_ok`` (evaluation); otherwise it is an error that names
    the full-precision model to give instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    from quantmoe.quant.api import load, quantized_format

    kind = quantized_format(path)
    if kind is not None:
        if not quantized_ok:
            raise ValueError(f"{name_or_path} is a quantized model ({kind} format); this command needs the "
                             "full-precision model: give the model it was quantized from")
        model = load(path, device=device, trust_remote_code=trust_remote_code)
        return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 experts_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def split_path(split: str) -> Path:
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown split {split!r}: choose one of {', '.join(TEXT_SPLITS)}")
    return embedded_root() / "data" / f"{split}.txt"


def split_tokens(split: str, tokenizer) -> np.ndarray:
    """Token ids of an embedded text split (documents joined by end-of-text)."""
    from quantmoe.zoo.train import tokenize_text

    return tokenize_text(tokenizer, split_path(split).read_text(encoding="utf-8"))
