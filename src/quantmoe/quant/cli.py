"""``quantmoe quantize``: quantize a model with a plan and write a checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def plan_from_args(args: argparse.Namespace):
    from quantmoe.quant.plan import Plan

    if args.plan and args.bits:
        raise ValueError("give either --plan PLAN.yaml or --bits N, not both")
    if args.plan:
        return Plan.from_yaml(Path(args.plan))
    if not args.bits:
        raise ValueError("give a plan: --plan PLAN.yaml, or --bits N for uniform bits")
    return Plan.uniform(args.bits, group_size=None if args.group_size <= 0 else args.group_size,
                        symmetric=not args.asym)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
    from quantmoe.quant import api
    from quantmoe.quant.pipeline import GPTQConfig
    from quantmoe.zoo.embedded import load_model

    plan = plan_from_args(args)
    calib = CalibrationConfig(split=args.calib, num_windows=args.calib_windows, seq_len=args.calib_len,
                              seed=args.seed, moe_mode=args.moe_mode, min_expert_tokens=args.min_expert_tokens)
    gptq = GPTQConfig(method=args.method, damp=args.damp, act_order=args.act_order)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if args.target:  # before the long part: a plan the engine cannot load stops here
        from quantmoe.anatomy import describe
        from quantmoe.export.engines import check

        anatomy = describe(model)
        check(anatomy.units, plan.resolve(anatomy), args.target)
    fingerprint = api.model_fingerprint(model)
    windows = ref = None
    if args.eval:
        windows = make_windows(api.calibration_tokens(args.eval, tokenizer), args.calib_len)
        ref = reference_logprobs(model, windows)
        base = evaluate(model, windows, ref)
    result = api.quantize(model, tokenizer, plan, calib, gptq, device=args.device)
    if args.format == "gptq":
        out = api.save_gptq(result, Path(args.out), tokenizer, plan, calib, gptq, args.model, fingerprint,
                            target=args.target)
    else:
        out = api.save(result, Path(args.out), tokenizer, plan, calib, gptq, args.model, fingerprint)
    print(f"{args.model}: {result.bits.average_bits:.3f} average bits ({result.bits.effective_bits:.3f} effective), "
          f"{len(result.report.units)} linears, {len(result.report.fallbacks)} fallbacks, "
          f"{result.report.seconds:.1f} s -> {out}")
    if args.eval:
        q = evaluate(result.model, windows, ref)
        print(f"{args.eval} perplexity {base.ppl:.3f} -> {q.ppl:.3f} ({100 * (q.ppl / base.ppl - 1):+.2f}%), "
              f"KL {q.kl_mean:.4f} (p99 {q.kl_p99:.3f}), top-1 agreement {100 * q.top1_agreement:.1f}%")
    return 0


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model (GPTQ or RTN) with a plan and save it",
                       description="Quantize MODEL block by block with GPTQ (or RTN) following a plan, and "
                                   "write a checkpoint that `quantmoe.load` reloads.")
    p.add_argument("model", help="embedded model name, local folder or hub id")
    p.add_argument("--plan", help="plan YAML (default/roles/kinds/patterns/modules)")
    p.add_argument("--bits", type=int, help="uniform bits instead of a plan (2, 3, 4, 8)")
    p.add_argument("--group-size", type=int, default=128, help="with --bits: group size, 0 = per-channel")
    p.add_argument("--asym", action="store_true", help="with --bits: asymmetric grid")
    p.add_argument("--out", required=True, help="checkpoint folder (written atomically)")
    p.add_argument("--format", choices=("quantmoe", "gptq"), default="quantmoe",
                   help="quantmoe: a checkpoint for quantmoe.load; gptq: a GPTQ-format folder that serving engines "
                        "(and quantmoe.load) read, as `quantmoe export` writes")
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"))
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of the mean Hessian diagonal")
    p.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    p.add_argument("--calib", default="calibration", help="embedded split name or a local text file")
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moe-mode", default="routed", choices=("routed", "all", "weighted"))
    p.add_argument("--min-expert-tokens", type=int, default=16,
                   help="experts with fewer calibration tokens fall back to RTN")
    p.add_argument("--eval", metavar="SPLIT", help="also report perplexity and KL before/after on this split")
    p.add_argument("--device", default=None, help="device for the block being quantized, e.g. cuda:0")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    from quantmoe.export.cli import add_target_arg

    add_target_arg(p)
    p.set_defaults(func=_cmd_quantize)
