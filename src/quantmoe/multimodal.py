"""Multimodal checkpoints around a supported MoE text model: quantmoe works on the text model.

Llama 4 (Scout, Maverick), Qwen3.5-MoE, Gemma 4 and dots.note3 are published as multimodal checkpoints: a
vision (and audio) tower, a projector and the MoE language model in one folder, under one
multimodal config. quantmoe reads the language model out of such a folder: its config is the
multimodal config's `text_config`, and its weights are the checkpoint's language-model keys,
renamed as the text model class (`Llama4ForCausalLM`, ...) names them. transformers' own
conversion mapping does that renaming for Llama 4 and Qwen3.5-MoE; `key_mapping` adds the
renames it lacks (Gemma 4: `model.language_model.` -> `model.`). The towers' keys load into no
module of the text model and are skipped.

What is written is a text-only checkpoint of the text model class: the vision tower is not in
it. `quantmoe quantize` therefore asks for `--text-only` before it writes one (`TEXT_ONLY_HINT`).
Describing and evaluating need no flag: `quantmoe inspect` describes the text model and
`quantmoe eval` measures the text model's perplexity.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Multimodal:
    """A multimodal model type whose checkpoint holds the MoE text model `text_model_type`.

    key_mapping: (regex, replacement) renames of checkpoint keys that transformers does not apply
    when the text model class is loaded from the multimodal checkpoint (it applies its own after).
    """

    model_type: str
    text_model_type: str
    display_name: str
    key_mapping: tuple[tuple[str, str], ...] = ()


MULTIMODAL: dict[str, Multimodal] = {
    m.model_type: m
    for m in (
        Multimodal("llama4", "llama4_text", "Llama 4 (Scout, Maverick)"),
        Multimodal("qwen3_5_moe", "qwen3_5_moe_text", "Qwen3.5-MoE"),
        Multimodal("gemma4", "gemma4_text", "Gemma 4", key_mapping=((r"^model\.language_model\.", "model."),)),
        Multimodal("dots3_note", "dots3_note_text", "dots.note3"),
        Multimodal("qwen4_exp", "qwen4_exp_text", "Qwen4-Exp"),
    )
}

TEXT_ONLY_HINT = ("pass --text-only to quantize its text model ({text}) and write a text-only checkpoint "
                  "({arch}, without the vision tower); a quantized checkpoint that keeps the tower is not supported yet")


def multimodal_of(config: Any) -> Multimodal | None:
    """The `Multimodal` entry of a config's model type, or None for any other config."""
    model_type = getattr(config, "model_type", None)
    return MULTIMODAL.get(model_type) if isinstance(model_type, str) else None


def text_architecture(model_type: str) -> str:
    """The causal-LM class transformers builds for a text model type (`Llama4ForCausalLM`, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


def text_config_of(config: Any) -> Any:
    """The config quantmoe works on: a multimodal config's text config (a copy, with the checkpoint's
    dtype, the outer config's word-embedding tying and the text model class as its architecture),
    any other config as it is."""
    entry = multimodal_of(config)
    if entry is None:
        return config
    text = copy.deepcopy(config.get_text_config())
    if getattr(text, "model_type", None) != entry.text_model_type:
        raise ValueError(f"the {entry.model_type} config's text config has model_type "
                         f"{getattr(text, 'model_type', None)!r}, not {entry.text_model_type!r}: config.json is damaged "
                         "or from another transformers version")
    if getattr(text, "dtype", None) is None and getattr(config, "dtype", None) is not None:
        text.dtype = config.dtype  # the checkpoint's dtype is on the outer config
    if hasattr(config, "tie_word_embeddings"):  # the outer model ties (or not): the checkpoint holds what it saved
        text.tie_word_embeddings = config.tie_word_embeddings
    text.architectures = [text_architecture(entry.text_model_type)]
    return text


def key_mapping_of(config: Any) -> dict[str, str] | None:
    """The extra checkpoint key renames for loading a multimodal config's text model, or None."""
    entry = multimodal_of(config)
    return dict(entry.key_mapping) if entry is not None and entry.key_mapping else None
