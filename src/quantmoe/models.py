"""Model and tokenizer resolution and loading: embedded names, local folders, hub ids."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from quantmoe.multimodal import key_mapping_of, multimodal_of, text_config_of

log = logging.getLogger(__name__)

EMBEDDED_ENV = "QUANTMOE_EMBEDDED"
EMBEDDED_MODELS = ("mixtral-s", "deepseek-s")
DEFAULT_MODEL = "mixtral-s"


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tiktoken.model", "vocab.txt")
_TRUE = ("1", "true", "yes", "on")


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()


def local_model_folder(name_or_path: str) -> Path | None:
    """The folder of an embedded name or a local path; None for a hub id. Never touches the network."""
    if name_or_path in EMBEDDED_MODELS:
        return embedded_root() / name_or_path
    if _is_local(name_or_path):
        return Path(name_or_path).expanduser()
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub ($HF_ENDPOINT): no retries, no waiting on a dead network."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or
                                       (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (ImportError, ValueError):  # ValueError: not a valid repo id
        return False


def _check_hub_id(name: str) -> None:
    """Fail at once, in one line, for a hub id that cannot be fetched: a misspelled embedded name
    ("did you mean"), or the hub offline ($HF_HUB_OFFLINE) or unreachable with no cached copy."""
    import difflib

    normalized = name.lower().replace("_", "-").replace(" ", "-")
    close = difflib.get_close_matches(normalized, EMBEDDED_MODELS, n=1, cutoff=0.75)
    choices = (f"give an embedded model ({', '.join(EMBEDDED_MODELS)}), a local model folder or a hub id "
               "(organization/name)")
    if close and "/" not in name:
        raise ValueError(f"unknown model {name!r}: did you mean {close[0]}? ({choices})")
    if _hub_cached(name):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise ValueError(f"model {name!r} is not an embedded model or a local folder, and the hub is off "
                         f"(HF_HUB_OFFLINE is set) with no cached copy: {choices}, or unset HF_HUB_OFFLINE")
    if not _hub_reachable():
        raise ValueError(f"model {name!r} is not an embedded model or a local folder, and the hub "
                         f"({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) cannot be reached: {choices}")


def resolve_model(name_or_path: str) -> str:
    """An embedded model name becomes its folder; a local path is checked; a hub id is returned as given
    once it can be fetched (see ``_check_hub_id``)."""
    if name_or_path in EMBEDDED_MODELS:
        path = embedded_root() / name_or_path
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no model: rebuild it with `quantmoe zoo train {name_or_path}`")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"{name_or_path}: no such folder. Give an embedded model "
                                f"({', '.join(EMBEDDED_MODELS)}), a local model folder or a hub id")
    if _is_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ValueError(f"{name_or_path} is a file: give a model folder (with config.json)")
        return str(path)
    _check_hub_id(name_or_path)
    return name_or_path


def _check_tokenizer_files(path: str, tokenizer: str | None) -> None:
    folder = Path(tokenizer or path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"no tokenizer files in {folder} (none of {', '.join(TOKENIZER_FILES[:3])}, ...): "
                         "pass --tokenizer FOLDER_OR_HUB_ID, or copy the model's tokenizer files into the folder")


def _check_vocab(model, tokenizer, where: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer of {where} has {len(tokenizer):,} tokens but the model's embedding has "
                         f"{rows:,} rows: ids past {rows - 1} would crash the forward; use the model's own "
                         "tokenizer (--tokenizer)")


MARKED_MODEL_TYPE = "quantmoe"
MODEL_TYPE_KEY = "quantmoe_model_type"


def read_model_config(path: Path, trust_remote_code: bool = False):
    """The model's config of a quantmoe checkpoint folder (marked or not), or of any model folder."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # transformers' reader: it decodes the floats JSON cannot hold (Granite-4.0-H's time_step_limit (0, inf))
    cfg = PretrainedConfig._dict_from_json_file(Path(path) / "config.json")
    if cfg.get("model_type") != MARKED_MODEL_TYPE:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cfg["model_type"] = cfg.pop(MODEL_TYPE_KEY)
    cfg.pop("quantization_config", None)
    return CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)


def source_config(name_or_path: str, trust_remote_code: bool = False):
    """The config.json of a local folder (a quantized one included) or a hub id, as the folder holds it
    (a multimodal config stays multimodal: ``quantmoe.multimodal.text_config_of`` gives its text model's)."""
    if Path(name_or_path, "config.json").is_file():
        return read_model_config(Path(name_or_path), trust_remote_code=trust_remote_code)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


QUANTMOE_CONFIG_NAME = "quantization_config.json"  # beside config.json in a quantmoe checkpoint


def quantized_format(path: str | Path) -> str | None:
    """``quantmoe`` or ``gptq`` if ``path`` is a quantized model folder, else None (files only:
    a quantmoe checkpoint's ``quantization_config.json``, or ``config.json`` whose
    ``quantization_config`` has ``quant_method: gptq``)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / QUANTMOE_CONFIG_NAME).exists():
        return "quantmoe"
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None
    return "gptq" if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "gptq" else None


def stored_quantization(config) -> dict | None:
    """The ``quantization_config`` of a model's config as a dict (None for a float checkpoint)."""
    qc = getattr(config, "quantization_config", None)
    return qc if qc is None or isinstance(qc, dict) else qc.to_dict()


def is_mxfp4(config) -> bool:
    """Whether ``config`` describes a checkpoint stored with MXFP4 experts (GPT-OSS; quant/mxfp4.py)."""
    qc = stored_quantization(config)
    return qc is not None and qc.get("quant_method") == "mxfp4"


def _check_fp8_tiles(path: Path) -> None:
    """Refuse a block-scaled FP8 folder with a weight that its tiles do not divide: transformers'
    dequantization derives the tile from the scale grid and misreads (or refuses) such a weight;
    the streamed reader (quant/fp8.py) reads it right."""
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return
    block = qc.get("weight_block_size") if isinstance(qc, dict) and qc.get("quant_method") == "fp8" else None
    if not isinstance(block, (list, tuple)) or len(block) != 2:
        return
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            names = set(fh.keys())
            for key in sorted(names):
                shape = fh.get_slice(key).get_shape()
                if key + "_scale_inv" in names and (shape[-2] % block[0] or shape[-1] % block[1]):
                    raise ValueError(
                        f"{path} is stored in FP8 with {block[0]} x {block[1]} tiles that do not divide {key} "
                        f"{tuple(shape)}, which transformers' dequantization misreads: use --stream (its reader "
                        "dequantizes partial tiles), or a bf16 copy of the model")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False, tokenizer: str | None = None):
    """Model (eval mode) and tokenizer of an embedded name, a local folder or a hub id.

    ``tokenizer``: another folder or hub id to take the tokenizer from (default: the model's).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tok_path = resolve_model(tokenizer) if tokenizer else path
    _check_tokenizer_files(path, tok_path if tokenizer else None)
    kind = quantized_format(path)
    if kind is not None:
        raise ValueError(f"{name_or_path} is a quantized model ({kind} format); this command needs the "
                         "full-precision model: give the model it was quantized from")
    if Path(path).is_dir():
        _check_fp8_tiles(Path(path))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    multimodal = multimodal_of(config) is not None  # its text model is read (quantmoe/multimodal.py)
    extra: dict = {"config": text_config_of(config), "key_mapping": key_mapping_of(config)} if multimodal else {}
    if is_mxfp4(config):
        from transformers import Mxfp4Config

        # always as floats: on a GPU with MXFP4 kernels transformers would keep the experts packed
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if multimodal:  # transformers would list every tower tensor as unexpected
        hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                           experts_implementation="eager", output_loading_info=True,
                                                           **extra)
    finally:
        hf_logging.set_verbosity(level)
    if multimodal:
        if info["missing_keys"]:
            raise ValueError(f"{path} holds no tensor for {len(info['missing_keys'])} weights of its text model "
                             f"(e.g. {sorted(info['missing_keys'])[0]}): the checkpoint is incomplete")
        log.info("read the text model of a multimodal checkpoint; %d tensors of its towers skipped",
                 len(info["unexpected_keys"]))
        # the renames that read the text model out of the multimodal checkpoint would be reversed by
        # every save (save_pretrained, the GPTQ export): without them it saves under its own names
        model.__dict__.pop("_weight_conversions", None)
    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
    _check_vocab(model, tok, tok_path)
    return model.to(device).eval(), tok


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's tensors (names, shapes, bytes): which weights were quantized."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
