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
from quantmoe.models import (
    model_fingerprint,  # noqa: F401  (compatibility name: moved to quantmoe.models)
    quantized_format,
)
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
                "calibration": asdict(calib), "gptq": gptq.to_dict(),
                "average_bits": result.bits.average_bits, "effective_bits": result.bits.effective_bits}
    return save_quantized(result.model, out_dir, result.specs, metadata, report_dict(result), tokenizer,
                          overwrite=overwrite, protect=(source_path,) if source_path is not None else ())


def save_gptq(result: QuantizeResult, out_dir: Path, tokenizer, plan: Plan, calib: CalibrationConfig,
              gptq: GPTQConfig, source: str, source_fingerprint: str | None = None, target: str | None = None) -> Path:
    """Write the quantized model directly as a GPTQ-format folder (see quantmoe.export.writer)."""
    from quantmoe.export.writer import write_export

    metadata = {"source_model": source, "source_sha256": source_fingerprint, "plan": plan.to_dict(),
                "calibration": asdict(calib), "gptq": gptq.to_dict(),
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


def load_model_or_quantized(name_or_path: str, device: str | torch.device = "cpu", trust_remote_code: bool = False,
                            tokenizer: str | None = None):
    """Model (eval mode) and tokenizer of a full-precision model (``quantmoe.models.load_model``) or of a
    quantized folder (a quantmoe checkpoint or a GPTQ-format folder, through ``load``): what evaluation takes."""
    from transformers import AutoTokenizer

    from quantmoe.models import _check_tokenizer_files, _check_vocab, load_model, resolve_model

    path = resolve_model(name_or_path)
    if quantized_format(path) is None:
        return load_model(name_or_path, device=device, trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    tok_path = resolve_model(tokenizer) if tokenizer else path
    _check_tokenizer_files(path, tok_path if tokenizer else None)
    model = load(path, device=device, trust_remote_code=trust_remote_code).eval()
    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code,
                                        config=model.config if tok_path == path else None)
    _check_vocab(model, tok, tok_path)
    return model, tok
