"""``quantmoe quantize``: quantize a model with a plan and write a checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from quantmoe.quant.checkpoint import REPORT_NAME, check_checkpoint_output
from quantmoe.quant.grid import SUPPORTED_BITS

log = logging.getLogger(__name__)


def plan_from_args(args: argparse.Namespace):
    from quantmoe.quant.plan import Plan

    if args.plan and args.bits is not None:
        raise ValueError("give either --plan PLAN.yaml or --bits N, not both")
    if args.plan:
        return Plan.from_yaml(Path(args.plan))
    if args.bits is None:
        raise ValueError("give a plan: --plan PLAN.yaml, or --bits N for uniform bits")
    if args.bits not in SUPPORTED_BITS:
        raise ValueError(f"check --bits: {args.bits} is not one of {', '.join(map(str, SUPPORTED_BITS))}")
    if args.group_size < 0:
        raise ValueError(f"check --group-size: {args.group_size} is negative (0 = per-channel)")
    return Plan.uniform(args.bits, group_size=None if args.group_size <= 0 else args.group_size,
                        symmetric=not args.asym)


def _source_folders(model: str) -> tuple[Path, ...]:
    from quantmoe.models import local_model_folder

    path = local_model_folder(model)
    return (path,) if path is not None else ()


def _cmd_quantize(args: argparse.Namespace) -> int:
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.data import calibration_tokens
    from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
    from quantmoe.models import load_model, model_fingerprint
    from quantmoe.quant import api
    from quantmoe.quant.pipeline import GPTQConfig

    plan = plan_from_args(args)
    out_dir = check_checkpoint_output(Path(args.out), overwrite=args.overwrite, protect=_source_folders(args.model))
    calib = CalibrationConfig(split=args.calib, num_windows=args.calib_windows, seq_len=args.calib_len,
                              seed=args.seed, moe_mode=args.moe_mode, min_expert_tokens=args.min_expert_tokens)
    gptq = GPTQConfig(method=args.method, damp=args.damp, act_order=args.act_order, block_size=args.block_size,
                      static_groups=args.static_groups)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer)
    fingerprint = model_fingerprint(model)
    windows = ref = None
    if args.eval:
        windows = make_windows(calibration_tokens(args.eval, tokenizer), args.calib_len)
        ref = reference_logprobs(model, windows)
        base = evaluate(model, windows, ref)
    result = api.quantize(model, tokenizer, plan, calib, gptq, device=args.device)
    out = api.save(result, out_dir, tokenizer, plan, calib, gptq, args.model, fingerprint, overwrite=args.overwrite)
    if result.report.fallbacks:
        log.warning("%d linears fell back to RTN (too few calibration tokens or no positive-definite Hessian): "
                    "see `fallbacks` in %s", len(result.report.fallbacks), out / REPORT_NAME)
    print(f"{args.model}: {result.bits.average_bits:.3f} average bits ({result.bits.effective_bits:.3f} effective), "
          f"{len(result.report.units)} linears, {len(result.report.fallbacks)} fallbacks, "
          f"{result.report.seconds:.1f} s -> {out}")
    if args.eval:
        q = evaluate(result.model, windows, ref)
        print(f"{args.eval} perplexity {base.ppl:.3f} -> {q.ppl:.3f} ({100 * (q.ppl / base.ppl - 1):+.2f}%), "
              f"KL {q.kl_mean:.4f} (p99 {q.kl_p99:.3f}), top-1 agreement {100 * q.top1_agreement:.1f}%")
    return 0


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    bits = ", ".join(str(b) for b in SUPPORTED_BITS)
    p = sub.add_parser("quantize", help="quantize a model (GPTQ or RTN) with a plan and save it",
                       description="Quantize MODEL block by block with GPTQ (or RTN) following a plan, and "
                                   "write a checkpoint that `quantmoe.load` reloads.")
    p.add_argument("model", help="embedded model name (mixtral-s, deepseek-s), local folder or hub id")
    p.add_argument("--plan", help="plan YAML (default/roles/kinds/patterns/modules), e.g. from `quantmoe plan`")
    p.add_argument("--bits", type=int, help=f"uniform bits instead of a plan: one of {bits} (16 = keep)")
    p.add_argument("--group-size", type=int, default=128, help="with --bits: group size, 0 = per-channel")
    p.add_argument("--asym", action="store_true", help="with --bits: asymmetric grid")
    p.add_argument("--out", required=True, help="checkpoint folder (written atomically; must be new, empty, or an "
                                                "earlier quantmoe checkpoint with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quantmoe checkpoint at --out")
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"), help="GPTQ, or round-to-nearest")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of the mean Hessian diagonal "
                                                            "(raised on failure, then RTN)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ act-order: columns by descending Hessian diagonal (implies --static-groups)")
    p.add_argument("--static-groups", action="store_true",
                   help="GPTQ: every group's scale/zero from the unquantized weight, not the error-updated one")
    p.add_argument("--block-size", type=int, default=128,
                   help="GPTQ columns per lazy-update block (speed; see docs/quantization.md)")
    p.add_argument("--calib", default="calibration", help="embedded split name or a local text file")
    p.add_argument("--calib-windows", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--moe-mode", default="routed", choices=("routed", "all", "weighted"),
                   help="which tokens each expert's Hessian sees (see docs/quantization.md)")
    p.add_argument("--min-expert-tokens", type=int, default=16,
                   help="experts with fewer calibration tokens fall back to RTN")
    p.add_argument("--eval", metavar="SPLIT", help="also report perplexity and KL before/after on this split")
    p.add_argument("--device", default=None, help="device for the block being quantized, e.g. cuda:0 "
                                                  "(default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER_OR_ID",
                   help="take the tokenizer from here (default: the model's own)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code from the hub")
    p.set_defaults(func=_cmd_quantize)
