"""Quantized checkpoints: save atomically, verify, reload.

A checkpoint folder holds ``config.json`` (the model's), the tokenizer, ``model.safetensors``
(packed integer weights, scales, zeros, and every other tensor of the model in the
per-expert layout; unquantized tensors in the source checkpoint's dtype, see
``_state_dict_for_save``), ``quantization_config.json`` (per-module settings, calibration
and GPTQ settings, library versions, and the SHA-256 of ``model.safetensors``) and
``quant_report.json``.

``config.json`` says the folder is quantmoe's: its ``model_type`` is ``quantmoe`` (the model's
own is kept as ``quantmoe_model_type``), so transformers, vLLM and other readers refuse it
instead of building the model with random weights, and ``quantization_config`` names
``quantmoe.load`` and ``quantmoe export`` (the GPTQ format that engines read).

Atomicity: everything is written to a temporary sibling folder ``.OUT.PID@HOST-XXXX.partial``,
fsynced, and moved into place with two renames (an earlier checkpoint at OUT first goes
aside to ``.OUT.old-PID@HOST``, then the new folder takes its name, then the old one is removed).
A save killed at any point leaves at OUT nothing, the previous checkpoint or the complete new
one. The next save to OUT recovers what a killed save left: it puts a stranded previous
checkpoint back when OUT is absent, and removes leftover ``.partial`` and ``.old-PID@HOST`` folders
of saves that are no longer running (judged by pid only when HOST is this machine), logging each step.

Safety: ``save_quantized`` writes only where ``quantmoe.safeout`` allows: a new path, an empty
folder, or (with ``overwrite=True``) an earlier quantmoe checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantmoe.anatomy import describe, unfuse_experts
from quantmoe.atomic import current_umask
from quantmoe.models import MARKED_MODEL_TYPE, MODEL_TYPE_KEY, read_model_config  # noqa: F401
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.lazy import rebuild_module
from quantmoe.quant.qlinear import QuantLinear
from quantmoe.safeout import (
    HOST_TAG,
    OWNER_PATTERN,
    check_folder_output,
    is_our_folder,
    owner_alive,
    owner_tag,
    pause_for_test,
)

log = logging.getLogger(__name__)

FORMAT = "quantmoe"
FORMAT_VERSION = 1
CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"
REPORT_NAME = "quant_report.json"


class CorruptCheckpointError(ValueError):
    pass


def mark_config(path: Path) -> None:
    """Make ``config.json`` refuse loaders other than quantmoe (see the module docstring)."""
    cfg = json.loads(path.read_text())
    cfg[MODEL_TYPE_KEY] = cfg["model_type"]
    cfg["model_type"] = MARKED_MODEL_TYPE
    cfg["quantization_config"] = {
        "quant_method": MARKED_MODEL_TYPE, "format": FORMAT, "format_version": FORMAT_VERSION,
        "load_with": "quantmoe.load(PATH)",
        "serve": "quantmoe export PATH --format gptq --out DIR (a GPTQ folder that vLLM, SGLang, GPTQModel and "
                 "transformers load)"}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import safetensors
    import transformers

    from quantmoe.version import __version__

    try:
        lm_eval = version("lm_eval")
    except PackageNotFoundError:
        lm_eval = "-"
    # what else changes the numbers: CPU kernels (ISA) and the thread count give different float sums
    return {"quantmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "lm_eval": lm_eval, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": str(torch.get_num_threads()),
            "machine": platform.machine()}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                 "float64": torch.float64}


def source_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of the checkpoint ``model`` was loaded from (``dtype`` / ``torch_dtype``
    of its ``config.json``, in its folder or the hub cache); None when unknown (built from a
    config, or a folder that says none)."""
    where = str(getattr(model.config, "name_or_path", "") or "")
    config_file: Path | str | None = Path(where) / "config.json" if where else None
    if config_file is not None and not config_file.is_file():
        config_file = None
        if where.count("/") == 1 and not where.startswith((".", "/", "~")):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(where, "config.json")
            config_file = cached if isinstance(cached, str) else None
    if config_file is None:
        return None
    cfg = json.loads(Path(config_file).read_text())
    return _FLOAT_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or ""))


def _state_dict_for_save(model: nn.Module, storage: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """State dict without shared storage duplicates (tied embeddings are re-tied on load).

    ``storage``: the dtype for every unquantized floating tensor (embeddings, norms, LM head,
    routers, biases, 16-bit linears) narrower than the model's; a tensor it cannot hold
    exactly keeps its own dtype (with a warning), so a reload is always exact. Packed codes,
    zero points and scales are stored as they are.
    """
    scales = {f"{name}.scales" for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    inexact: list[str] = []
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen and t.numel():
            continue
        seen[key] = name
        t = t.detach().to("cpu").contiguous()
        if (storage is not None and t.is_floating_point() and name not in scales
                and t.element_size() > storage.itemsize):
            narrow = t.to(storage)
            if torch.equal(narrow.to(t.dtype), t):
                t = narrow
            else:
                inexact.append(name)
        out[name] = t
    if inexact:
        log.warning("%d unquantized tensors are not exactly %s values (e.g. %s) and are stored in their own dtype; "
                    "the checkpoint is larger than the source's dtype promises", len(inexact),
                    str(storage).removeprefix("torch."), ", ".join(inexact[:3]))
    return out


def recover_interrupted_save(out_dir: Path) -> None:
    """Undo what a killed save to ``out_dir`` left behind (see the module docstring); log each step."""
    out_dir = Path(out_dir)
    parent, name = out_dir.parent, out_dir.name
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:old-{OWNER_PATTERN}|(?:{OWNER_PATTERN}-)?[a-z0-9_]{{8}}\.partial)")
    leftovers = sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())
    for path in leftovers:  # the order does not matter: each kind is handled on its own
        match = pattern.fullmatch(path.name)
        pid, host = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        if pid is not None and owner_alive(pid, host):
            log.warning("%s belongs to a save that may still run (process %s%s): left alone", path, pid,
                        "" if host in (None, HOST_TAG) else " on another host")
            continue
        if match.group(1) is not None:  # a previous checkpoint moved aside
            if not out_dir.exists() and is_our_folder(path):
                os.replace(path, out_dir)
                _fsync_dir(parent)
                log.warning("an interrupted save had moved the previous checkpoint aside: restored %s from %s",
                            out_dir, path.name)
            elif is_our_folder(path):
                shutil.rmtree(path)
                log.warning("removed %s, the previous checkpoint left by an interrupted save (%s is complete)",
                            path, out_dir)
            else:
                log.warning("%s was left by an interrupted save but is not a quantmoe checkpoint: left alone, "
                            "check it and remove it yourself", path)
        else:
            shutil.rmtree(path)
            log.warning("removed %s, the unfinished folder of an interrupted save", path)


def check_checkpoint_output(out_dir: Path, overwrite: bool = False, protect: tuple[Path | str, ...] = ()) -> Path:
    """Recover what a killed save to ``out_dir`` left, then check that a save may write there (call it
    before hours of work: ``save_quantized`` checks again)."""
    out_dir = Path(out_dir).expanduser().resolve()
    recover_interrupted_save(out_dir)
    return check_folder_output(out_dir, overwrite=overwrite, protect=protect)


def save_quantized(model: nn.Module, out_dir: Path, specs: Mapping[str, QuantSpec], metadata: Mapping[str, Any],
                   report: Mapping[str, Any] | None = None, tokenizer=None, overwrite: bool = False,
                   protect: tuple[Path | str, ...] = (), storage_dtype: torch.dtype | None = None) -> Path:
    """Write a quantized (per-expert view, QuantLinear) model to ``out_dir`` atomically.

    ``out_dir`` must be new, an empty folder, or (with ``overwrite``) an earlier quantmoe
    checkpoint; ``protect``: folders that must survive (the source model).

    Unquantized tensors are stored in ``storage_dtype`` (default: the source checkpoint's,
    ``source_dtype``) where it holds them exactly; ``load_quantized`` casts them back to the
    model's dtype, so the reloaded model equals ``model`` bit for bit.
    """
    storage = storage_dtype or source_dtype(model)
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_checkpoint_output(out_dir, overwrite=overwrite, protect=protect)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{owner_tag()}-", suffix=".partial", dir=out_dir.parent))
    old = None
    try:
        model.config.save_pretrained(tmp)
        mark_config(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_state_dict_for_save(model, storage), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        pause_for_test("save-after-weights")
        qconfig = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "modules": {name: {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}
                        for name, s in specs.items()},
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "storage_dtype": None if storage is None else str(storage).removeprefix("torch."),
            "versions": library_versions(),
            "weights_sha256": file_sha256(tmp / WEIGHTS_NAME),
            **metadata,
        }
        if report is not None:
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1))
        # the config is written last: a folder without it is never a checkpoint
        (tmp / CONFIG_NAME).write_text(json.dumps(qconfig, indent=1))
        umask = current_umask()
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~umask)
        _fsync_dir(tmp)
        old = None
        if out_dir.exists():  # an earlier checkpoint (check_folder_output allowed it) or an empty folder
            old = out_dir.with_name(f".{out_dir.name}.old-{owner_tag()}")
            os.replace(out_dir, old)
            _fsync_dir(out_dir.parent)
            pause_for_test("save-between-renames")
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if old is not None:
            pause_for_test("save-before-cleanup")
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # the new one never arrived: the previous checkpoint goes back
        raise
    return out_dir


def read_quantization_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder; give the --out folder of `quantmoe quantize`")
    if not path.is_dir():
        raise CorruptCheckpointError(f"{path} is a file, not a checkpoint folder; give the --out folder of "
                                     "`quantmoe quantize`")
    if not cfg_path.exists():
        raise CorruptCheckpointError(f"{path} is not a quantmoe checkpoint (no {CONFIG_NAME}); an interrupted "
                                     "save leaves no loadable folder: quantize again")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{cfg_path} is not valid JSON ({err}): the file is truncated or damaged; "
                                     "quantize again or copy the checkpoint again") from None
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(f"{cfg_path} is not a quantmoe quantization config (not a JSON object)")
    if cfg.get("format") != FORMAT or cfg.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{cfg_path}: unsupported format {cfg.get('format')!r} "
                                     f"v{cfg.get('format_version')}; this quantmoe reads {FORMAT} v{FORMAT_VERSION}")
    return cfg


def _materialize_meta_buffers(model: nn.Module, config) -> None:
    """Non-persistent buffers (group indices, rotary inverse frequencies) are rebuilt on the CPU."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if isinstance(module, QuantLinear):
            module.reset_g_idx()
            continue
        rebuild_module(model, name, module, config)


def weight_files(qcfg: Mapping[str, Any]) -> dict[str, str]:
    """File name -> recorded SHA-256: ``model.safetensors``, or the shards of a streamed checkpoint
    (``weights_sha256`` then maps each shard to its SHA-256)."""
    recorded = qcfg["weights_sha256"]
    return dict(recorded) if isinstance(recorded, dict) else {WEIGHTS_NAME: recorded}


def verify_weights(path: Path, qcfg: Mapping[str, Any]) -> None:
    """Every weight file present and equal to its recorded SHA-256, or a CorruptCheckpointError."""
    for name, sha in sorted(weight_files(qcfg).items()):
        weights = path / name
        if not weights.exists():
            raise CorruptCheckpointError(f"{weights} is missing: the checkpoint is incomplete; quantize again")
        if file_sha256(weights) != sha:
            raise CorruptCheckpointError(f"{weights} does not match its recorded SHA-256: the file is corrupt; "
                                         "copy it again or quantize again")


def _read_weights(path: Path, qcfg: Mapping[str, Any], verify: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of ``model.safetensors`` or of the shards a streamed checkpoint's index lists."""
    names = sorted(weight_files(qcfg))
    if verify:
        verify_weights(path, qcfg)
    state: dict[str, torch.Tensor] = {}
    for name in names:
        weights = path / name
        if not weights.exists():
            raise CorruptCheckpointError(f"{weights} is missing: the checkpoint is incomplete; quantize again")
        state.update(load_file(str(weights)))
    return state, path / (WEIGHTS_NAME if len(names) == 1 else "model.safetensors.index.json")


def quantized_skeleton(config, qcfg: Mapping[str, Any], trust_remote_code: bool = False,
                       attn_implementation: str | None = None) -> nn.Module:
    """The quantized model of a checkpoint on ``meta``: per-expert view, a ``QuantLinear`` shell for
    every quantized linear (what ``load_quantized`` assigns the weights to, all at once, and
    ``LazyQuantized`` block by block)."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, qcfg["dtype"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 experts_implementation="eager",
                                                 attn_implementation=attn_implementation)
    unfuse_experts(model)
    anatomy = describe(model)
    for name, settings in qcfg["modules"].items():
        spec = QuantSpec(**settings)
        if spec.keep:
            continue
        unit = anatomy.unit(name)
        shell = QuantLinear(unit.in_features, unit.out_features, spec.bits, spec.group_size or unit.in_features,
                            bias=unit.has_bias, dtype=dtype, device="meta")
        model.set_submodule(name, shell)
    return model


def load_quantized(path: Path, device: str | torch.device = "cpu", verify: bool = True,
                   trust_remote_code: bool = False, attn_implementation: str | None = None) -> nn.Module:
    """Rebuild a quantized model saved by ``save_quantized``: same logits as when it was saved."""
    path = Path(path)
    qcfg = read_quantization_config(path)
    state, weights = _read_weights(path, qcfg, verify)
    config = read_model_config(path, trust_remote_code=trust_remote_code)
    model = quantized_skeleton(config, qcfg, trust_remote_code, attn_implementation)
    expected = {k: t.dtype for k, t in model.state_dict().items()}
    state = {k: t.to(expected[k]) if k in expected and t.is_floating_point() else t  # stored narrower: cast back
             for k, t in state.items()}
    assign_state(model, state, config, f"{weights} does not fit the model")
    return model.to(device).eval()


def assign_state(model: nn.Module, state: Mapping[str, torch.Tensor], config, misfit: str,
                 present: Collection[str] = ()) -> None:
    """Put ``state`` into the meta-device ``model`` (by assignment), re-tie a tied LM head and rebuild
    the non-saved buffers. A key the model lacks, or one of its tensors ``state`` does not give (but
    those in ``present``, already in place), is a CorruptCheckpointError that starts with ``misfit``."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied and k not in present]
    if missing or unexpected:
        raise CorruptCheckpointError(f"{misfit}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    _materialize_meta_buffers(model, config)
