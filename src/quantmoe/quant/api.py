"""High-level entry points: quantize a model with a plan, save it, load it back."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantmoe.anatomy import describe
from quantmoe.calib.data import CalibrationConfig, calibration_windows
from quantmoe.data import calibration_tokens
from quantmoe.models import model_fingerprint  # noqa: F401  (compatibility name: moved to quantmoe.models)
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
    from quantmoe.models import local_model_folder

    source_path = local_model_folder(source)
    metadata = {"source_model": source, "source_sha256": source_fingerprint, "plan": plan.to_dict(),
                "calibration": asdict(calib), "gptq": asdict(gptq),
                "average_bits": result.bits.average_bits, "effective_bits": result.bits.effective_bits}
    return save_quantized(result.model, out_dir, result.specs, metadata, report_dict(result), tokenizer,
                          overwrite=overwrite, protect=(source_path,) if source_path is not None else ())


def load(path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False,
         attn_implementation: str | None = None) -> nn.Module:
    """Load a quantized checkpoint written by ``quantmoe quantize``."""
    return load_quantized(Path(path), device=device, trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation)
