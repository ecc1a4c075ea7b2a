"""``quantmoe export``: a quantmoe checkpoint as a GPTQ-format folder for serving engines."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("gptq",)


def export_checkpoint(ckpt: Path, out: Path, target: str | None = None, max_shard_bytes: int | None = None,
                      trust_remote_code: bool = False) -> Path:
    """Export a checkpoint written by ``quantmoe quantize`` to ``out`` (GPTQ format)."""
    from transformers import AutoTokenizer

    from quantmoe.api import load
    from quantmoe.export.writer import MAX_SHARD_BYTES, write_export
    from quantmoe.models import quantized_format
    from quantmoe.quant.checkpoint import REPORT_NAME, read_quantization_config
    from quantmoe.quant.grid import QuantSpec

    kind = quantized_format(ckpt)
    if kind != "quantmoe":
        raise ValueError(f"{ckpt} is {'already a GPTQ-format folder' if kind else 'not a quantmoe checkpoint'}: "
                         "give a folder written by `quantmoe quantize`")
    qcfg = read_quantization_config(ckpt)
    specs = {name: QuantSpec(**s) for name, s in qcfg["modules"].items()}
    model = load(ckpt, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=trust_remote_code, config=model.config)
    report = json.loads((ckpt / REPORT_NAME).read_text()) if (ckpt / REPORT_NAME).exists() else None
    meta = {k: qcfg[k] for k in ("source_model", "source_sha256", "plan", "calibration", "gptq", "average_bits",
                                 "effective_bits") if k in qcfg}
    meta["exported_from"] = str(Path(ckpt).resolve())
    return write_export(model, specs, out, tokenizer=tokenizer, metadata=meta, report=report, target=target,
                        max_shard_bytes=max_shard_bytes or MAX_SHARD_BYTES)


def _cmd_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(Path(args.checkpoint), Path(args.out), target=args.target,
                            max_shard_bytes=int(args.max_shard_mb * 2**20) if args.max_shard_mb else None,
                            trust_remote_code=args.trust_remote_code)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    print(f"{args.checkpoint} -> {out} (GPTQ: base {qc['bits']} bits, group size {qc['group_size']}, "
          f"{'sym' if qc['sym'] else 'asym'}, {len(qc['dynamic'])} dynamic rules"
          f"{', checked for ' + args.target if args.target else ''})")
    return 0


def add_target_arg(p: argparse.ArgumentParser) -> None:
    from quantmoe.export.engines import ENGINES

    p.add_argument("--target", choices=ENGINES, default=None,
                   help="check that this engine can load the export, else stop naming the modules and the fix "
                        "(default: any engine whose rules the plan meets; gptqmodel also writes GPTQModel's names)")


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a quantized checkpoint in the GPTQ format for serving engines",
                       description="Write a checkpoint of `quantmoe quantize` as a GPTQ-format model folder "
                                   "(quantization_config with a per-module `dynamic` map) that GPTQModel, vLLM, "
                                   "SGLang and transformers load. See docs/serving.md.")
    p.add_argument("checkpoint", help="folder written by `quantmoe quantize`")
    p.add_argument("--format", choices=FORMATS, default="gptq", help="checkpoint format (default: gptq, v1 zero points)")
    p.add_argument("--out", required=True, help="output folder (written atomically; an existing folder is replaced "
                                                "only if it is an earlier export)")
    add_target_arg(p)
    p.add_argument("--max-shard-mb", type=float, default=None, help="split the weights into shards of this size "
                                                                     "(default 5120)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code from the hub")
    p.set_defaults(func=_cmd_export)
