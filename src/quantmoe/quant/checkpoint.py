"""Quantized checkpoints: save atomically, verify, reload.

A checkpoint folder holds ``config.json`` (the model's), the tokenizer, ``model.safetensors``
(packed integer weights, scales, zeros, group indices, and every other tensor of the model
in the per-expert layout), ``quantization_config.json`` (per-module settings, calibration
and GPTQ settings, library versions, and the SHA-256 of ``model.safetensors``) and
``quant_report.json``.

Atomicity: everything is written to a temporary sibling folder ``.OUT.PID-XXXX.partial``,
fsynced, and moved into place with two renames (an earlier checkpoint at OUT first goes
aside to ``.OUT.old-PID``, then the new folder takes its name, then the old one is removed).
A save killed at any point leaves at OUT nothing, the previous checkpoint or the complete new
one. The next save to OUT recovers what a killed save left: it puts a stranded previous
checkpoint back when OUT is absent, and removes leftover ``.partial`` and ``.old-PID`` folders
of saves that are no longer running, logging each step.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantmoe.anatomy import describe, unfuse_experts
from quantmoe.atomic import current_umask
from quantmoe.quant.grid import QuantSpec
from quantmoe.quant.qlinear import QuantLinear
from quantmoe.safeout import (
    check_folder_output,
    is_our_folder,
    pause_for_test,
    process_alive,
)

log = logging.getLogger(__name__)

FORMAT = "quantmoe"
FORMAT_VERSION = 1
CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"
REPORT_NAME = "quant_report.json"


class CorruptCheckpointError(ValueError):
    pass


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    from quantmoe.version import __version__

    return {"quantmoe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


def _sha256(path: Path) -> str:
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


def _state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without shared storage duplicates (tied embeddings are re-tied on load)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen and t.numel():
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def recover_interrupted_save(out_dir: Path) -> None:
    """Undo what a killed save to ``out_dir`` left behind (see the module docstring); log each step."""
    out_dir = Path(out_dir)
    parent, name = out_dir.parent, out_dir.name
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:old-(\d+)|(?:(\d+)-)?[a-z0-9_]{{8}}\.partial)")
    leftovers = sorted(p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir())
    for path in leftovers:  # the order does not matter: each kind is handled on its own
        match = pattern.fullmatch(path.name)
        pid = match.group(1) or match.group(2)
        if pid is not None and process_alive(int(pid)):
            log.warning("%s belongs to a save that is still running (process %s): left alone", path, pid)
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
                   protect: tuple[Path | str, ...] = ()) -> Path:
    """Write a quantized (per-expert view, QuantLinear) model to ``out_dir`` atomically.

    ``out_dir`` must be new, an empty folder, or (with ``overwrite``) an earlier quantmoe
    checkpoint; ``protect``: folders that must survive (the source model).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_checkpoint_output(out_dir, overwrite=overwrite, protect=protect)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}-", suffix=".partial", dir=out_dir.parent))
    old = None
    try:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_state_dict_for_save(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        pause_for_test("save-after-weights")
        qconfig = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "modules": {name: {"bits": s.bits, "group_size": s.group_size, "symmetric": s.symmetric}
                        for name, s in specs.items()},
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "versions": library_versions(),
            "weights_sha256": _sha256(tmp / WEIGHTS_NAME),
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
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
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
        try:
            fresh = type(module)(config=config)
        except TypeError as err:
            raise RuntimeError(f"cannot rebuild the non-saved buffers of {name} ({type(module).__name__}): "
                               "its constructor does not take the model config") from err
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, fresh)


def load_quantized(path: Path, device: str | torch.device = "cpu", verify: bool = True,
                   trust_remote_code: bool = False, attn_implementation: str | None = None) -> nn.Module:
    """Rebuild a quantized model saved by ``save_quantized``: same logits as when it was saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qcfg = read_quantization_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise CorruptCheckpointError(f"{weights} is missing: the checkpoint is incomplete; quantize again")
    if verify and _sha256(weights) != qcfg["weights_sha256"]:
        raise CorruptCheckpointError(f"{weights} does not match its recorded SHA-256: the file is corrupt; "
                                     "copy it again or quantize again")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
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
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, shell)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CorruptCheckpointError(f"{weights} does not fit the model: missing {missing[:3]}, "
                                     f"unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    _materialize_meta_buffers(model, config)
    return model.to(device).eval()
