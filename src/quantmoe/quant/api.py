"""High-level entry points: quantize a model with a plan, save it, load it back."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantmoe.anatomy import describe
from quantmoe.calib.data import CalibrationConfig, calibration_windows
from quantmoe.quant.checkpoint import load_quantized, save_quantized
from quantmoe.quant.pipeline import GPTQConfig, QuantReport, quantize_model
from quantmoe.quant.plan import BitStats, Plan, bit_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeResult:
    model: nn.Module
    report: QuantReport
    bits: BitStats
    specs: dict


def calibration_tokens(source: str, tokenizer) -> np.ndarray:
    """Token ids of an embedded split, a hub corpus (wikitext2, c4) or a local UTF-8 text file."""
    from quantmoe.eval.corpora import load_tokens

    return load_tokens(source, tokenizer)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's tensors (names, shapes, bytes): which weights were quantized."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def quantize(model: nn.Module, tokenizer, plan: Plan, calib: CalibrationConfig = CalibrationConfig(),
             gptq: GPTQConfig = GPTQConfig(), device: str | torch.device | None = None,
             progress: bool = True) -> QuantizeResult:
    """Quantize ``model`` in place following ``plan``; calibration text from ``calib.split``."""
    anatomy = describe(model)
    specs = plan.resolve(anatomy)
    bits = bit_stats(specs, anatomy.units)
    log.info("plan: %.3f average bits (%.3f effective) over %s quantizable parameters",
             bits.average_bits, bits.effective_bits, f"{bits.params:,}")
    try:
        windows = calibration_windows(calibration_tokens(calib.split, tokenizer), calib.num_windows, calib.seq_len,
                                      calib.seed)
    except ValueError as err:
        message = str(err)
        raise ValueError(message if calib.split in message else f"{calib.split}: {message}") from None
    torch.manual_seed(calib.seed)
    report = quantize_model(model, specs, windows, calib, gptq, device=device, progress=progress)
    log.info("quantized %d linears in %.1f s (%d fallbacks)", len(report.units), report.seconds,
             len(report.fallbacks))
    return QuantizeResult(model=model, report=report, bits=bits, specs=specs)


def report_dict(result: QuantizeResult) -> dict[str, Any]:
    r = result.report
    return {"average_bits": result.bits.average_bits, "effective_bits": result.bits.effective_bits,
            "quantizable_params": result.bits.params, "seconds": r.seconds, "block_seconds": list(r.block_seconds),
            "fallbacks": list(r.fallbacks),
            "expert_tokens": {str(b): list(t) for b, t in r.expert_tokens.items()},
            "units": {name: asdict(u) for name, u in r.units.items()}}


def save(result: QuantizeResult, out_dir: Path, tokenizer, plan: Plan, calib: CalibrationConfig, gptq: GPTQConfig,
         source: str, source_fingerprint: str | None = None, overwrite: bool = False) -> Path:
    """Save a checkpoint to ``out_dir``: never over the source model or a folder quantmoe did not write."""
    from quantmoe.zoo.embedded import local_model_folder

    source_path = local_model_folder(source)
    metadata = {"source_model": source, "source_sha256": source_fingerprint, "plan": plan.to_dict(),
                "calibration": asdict(calib), "gptq": asdict(gptq),
                "average_bits": result.bits.average_bits, "effective_bits": result.bits.effective_bits}
    return save_quantized(result.model, out_dir, result.specs, metadata, report_dict(result), tokenizer,
                          overwrite=overwrite, protect=(source_path,) if source_path is not None else ())


def save_gptq(result: QuantizeResult, out_dir: Path, tokenizer, plan: Plan, calib: CalibrationConfig,
              gptq: GPTQConfig, source: str, source_fingerprint: str | None = None, target: str | None = None) -> Path:
    """Write the quantized model directly as a GPTQ-format folder (see quantmoe.export.writer)."""
    from quantmoe.export.writer import write_export

    metadata = {"source_model": source, "source_sha256": source_fingerprint, "plan": plan.to_dict(),
                "calibration": asdict(calib), "gptq": asdict(gptq),
                "average_bits": result.bits.average_bits, "effective_bits": result.bits.effective_bits}
    return write_export(result.model, result.specs, out_dir, tokenizer=tokenizer, metadata=metadata,
                        report=report_dict(result), target=target)


def load(path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False,
         attn_implementation: str | None = None, dense: bool = False, cache_codes: bool = True) -> nn.Module:
    """Load a quantized checkpoint written by ``quantmoe quantize``, or a GPTQ-format folder
    (``quantmoe export``, ``quantmoe quantize --format gptq``, or one GPTQModel wrote).

    ``dense=False`` (default): the weights stay packed; with ``cache_codes`` each linear unpacks
    its codes once, on first use (1 byte per weight, 2 at 8 bits), else on every call (least
    memory, slowest). ``dense=True``: dequantized once into plain linears and fused experts, a
    plain transformers model as large and as fast as the full-precision one in the compute
    dtype. See ``quantmoe.quant.dense`` for what each gives bit for bit.
    """
    from quantmoe.export.reader import gptq_config, load_gptq
    from quantmoe.quant.dense import dequantize_model, set_code_cache

    if gptq_config(Path(path)) is not None:
        model = load_gptq(path, device=device, trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation)
    else:
        model = load_quantized(Path(path), device=device, trust_remote_code=trust_remote_code,
                               attn_implementation=attn_implementation)
    return dequantize_model(model) if dense else set_code_cache(model, cache_codes)


def quantized_format(path: str | Path) -> str | None:
    """``quantmoe`` or ``gptq`` if ``path`` is a quantized model folder, else None."""
    from quantmoe.export.reader import gptq_config
    from quantmoe.quant.checkpoint import CONFIG_NAME

    path = Path(path)
    if not path.is_dir():
        return None
    if (path / CONFIG_NAME).exists():
        return "quantmoe"
    return "gptq" if gptq_config(path) is not None else None
