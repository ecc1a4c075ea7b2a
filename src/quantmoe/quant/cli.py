"""``quantmoe quantize``: quantize a model with a plan and write a checkpoint."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantmoe.quant.checkpoint import REPORT_NAME, check_checkpoint_output
from quantmoe.quant.distributed import DEFAULT_TIMEOUT_S
from quantmoe.quant.grid import CLIP_MODES, SUPPORTED_BITS

if TYPE_CHECKING:
    from quantmoe.quant.pipeline import GPTQConfig

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
                        symmetric=not args.asym, clip=args.clip)


def _source_folders(model: str) -> tuple[Path, ...]:
    from quantmoe.models import local_model_folder

    path = local_model_folder(model)
    return (path,) if path is not None else ()


DTYPES = ("float32", "bfloat16", "float16")


def model_folder(name_or_path: str) -> Path:
    """A local folder with config.json: an embedded model, a path, or a hub id's snapshot."""
    from quantmoe.models import resolve_model

    path = Path(resolve_model(name_or_path))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def source_dtype(args: argparse.Namespace) -> torch.dtype:
    """``--dtype``, else the checkpoint's own (config.json), float32 when it says none."""
    if args.dtype:
        return getattr(torch, args.dtype)
    from transformers import AutoConfig

    from quantmoe.multimodal import text_config_of
    from quantmoe.quant.lazy import config_dtype

    config = AutoConfig.from_pretrained(model_folder(args.model), trust_remote_code=args.trust_remote_code)
    return config_dtype(text_config_of(config))


def _cmd_stream(args: argparse.Namespace, plan, calib, gptq) -> int:
    from transformers import AutoTokenizer

    from quantmoe import api
    from quantmoe.calib.data import calibration_windows
    from quantmoe.quant.lazy import checkpoint_files
    from quantmoe.quant.plan import bit_stats
    from quantmoe.quant.stream import anatomy_of, parse_size, quantize_stream

    if args.eval:
        raise ValueError("--eval needs the whole model in memory: drop --stream/--resume, or evaluate the "
                         "checkpoint afterwards, block by block too: `quantmoe eval OUT --stream --reference MODEL`")
    limit = parse_size(args.max_memory) if args.max_memory else None
    folder = model_folder(args.model)
    checkpoint_files(folder)  # missing or truncated shards: an error before anything else
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or folder, trust_remote_code=args.trust_remote_code)
    anatomy = anatomy_of(folder, args.trust_remote_code)
    specs = plan.resolve(anatomy)
    bits = bit_stats(specs, anatomy.units)
    windows = calibration_windows(api.calibration_tokens(calib.split, tokenizer), calib.num_windows, calib.seq_len,
                                  calib.seed)
    metadata = {"source_model": args.model, "plan": plan.to_dict(), "calibration": asdict(calib),
                "gptq": gptq.to_dict(), "average_bits": bits.average_bits, "effective_bits": bits.effective_bits}
    result = quantize_stream(folder, Path(args.out), specs, windows, calib, gptq, dtype=source_dtype(args),
                             device=args.device, resume=args.resume, tokenizer=tokenizer, metadata=metadata,
                             trust_remote_code=args.trust_remote_code, max_memory=limit, overwrite=args.overwrite,
                             protect=_source_folders(args.model))
    r = result.report
    if r["fallbacks"]:
        log.warning("%d linears fell back to RTN (too few calibration tokens or no positive-definite Hessian): "
                    "see `fallbacks` in %s", len(r["fallbacks"]), result.out / REPORT_NAME)
    print(f"{args.model}: {bits.average_bits:.3f} average bits ({bits.effective_bits:.3f} effective), "
          f"{len(r['units'])} linears, {len(r['fallbacks'])} fallbacks, {r['seconds']:.1f} s, "
          f"peak RSS {max(r['peak_rss_mb']):.0f} MB per block -> {result.out}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Under torchrun with more than one rank, every rank runs this; rank 0 alone writes (quant/distributed.py)."""
    from quantmoe.quant.distributed import init_from_env

    parallel, device = init_from_env(args.dist_timeout, args.device)
    if parallel is None:
        return _quantize(args, args.device, lead=True)
    import torch.distributed as dist

    try:
        if args.stream or args.resume or args.eval:
            raise ValueError("torchrun runs the in-memory quantization only: drop --stream/--resume/--eval "
                             "(evaluate the checkpoint afterwards with `quantmoe eval`)")
        return _quantize(args, device, lead=parallel.rank == 0)
    finally:
        dist.destroy_process_group()


def _quantize(args: argparse.Namespace, device: str | None, lead: bool) -> int:
    """``lead``: this process checks and writes the output (rank 0, or the only process)."""
    from quantmoe import api
    from quantmoe.bench.preflight import check_plan, model_anatomy
    from quantmoe.calib.data import CalibrationConfig
    from quantmoe.data import calibration_tokens
    from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
    from quantmoe.models import load_model, model_fingerprint

    plan = plan_from_args(args)
    check_text_only(args.model, args.text_only, args.trust_remote_code)
    # the plan against the model's config (meta device): a wrong module name fails before any weights load
    check_plan(plan, model_anatomy(args.model, args.trust_remote_code), f"check --plan {args.plan}"
               if args.plan else "check --bits")
    calib = CalibrationConfig(split=args.calib, num_windows=args.calib_windows, seq_len=args.calib_len,
                              seed=args.seed, moe_mode=args.moe_mode, min_expert_tokens=args.min_expert_tokens)
    gptq = gptq_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stream or args.resume:
        if args.rotate:
            raise ValueError("--rotate rotates the whole model in memory before calibration: drop --stream/--resume")
        if args.format == "gptq":
            raise ValueError("--format gptq writes from memory: quantize with --stream, then "
                             "`quantmoe export OUT --format gptq --out DIR`")
        return _cmd_stream(args, plan, calib, gptq)
    if args.max_memory:
        raise ValueError("--max-memory guards streamed runs: add --stream")
    if args.format == "gptq":  # the export's own rule: new, empty, or an earlier export (checked again at write)
        from quantmoe.export.writer import check_export_output

        out_dir = check_export_output(Path(args.out)) if lead else None
    else:
        out_dir = None if not lead else check_checkpoint_output(Path(args.out), overwrite=args.overwrite,
                                          protect=_source_folders(args.model))
    model, tokenizer = load_model(args.model, dtype=source_dtype(args), trust_remote_code=args.trust_remote_code,
                                  tokenizer=args.tokenizer)
    if args.target:  # before the long part: a plan the engine cannot load stops here
        from quantmoe.anatomy import describe
        from quantmoe.export.engines import check

        anatomy = describe(model)
        check(anatomy.units, plan.resolve(anatomy), args.target)
    fingerprint = model_fingerprint(model)
    windows = ref = None
    if args.eval:
        windows = make_windows(calibration_tokens(args.eval, tokenizer), args.calib_len, args.eval_windows)
        log.info("full precision on %d %s windows of %d tokens: reference log-probs, then perplexity",
                 len(windows), args.eval, args.calib_len)
        ref = reference_logprobs(model, windows, progress=True)
        base = evaluate(model, windows, ref, progress=True, desc="full precision eval")
    result = api.quantize(model, tokenizer, plan, calib, gptq, device=device)
    if not lead:
        return 0
    if args.format == "gptq":
        out = api.save_gptq(result, out_dir, tokenizer, plan, calib, gptq, args.model, fingerprint,
                            target=args.target)
    else:
        out = api.save(result, out_dir, tokenizer, plan, calib, gptq, args.model, fingerprint,
                       overwrite=args.overwrite)
    if result.report.fallbacks:
        log.warning("%d linears fell back to RTN (too few calibration tokens or no positive-definite Hessian): "
                    "see `fallbacks` in %s", len(result.report.fallbacks), out / REPORT_NAME)
    print(f"{args.model}: {result.bits.average_bits:.3f} average bits ({result.bits.effective_bits:.3f} effective), "
          f"{len(result.report.units)} linears, {len(result.report.fallbacks)} fallbacks, "
          f"{result.report.seconds:.1f} s -> {out}")
    if args.eval:
        q = evaluate(result.model, windows, ref, progress=True, desc="quantized eval")
        print(f"{args.eval} perplexity {base.ppl:.3f} -> {q.ppl:.3f} ({100 * (q.ppl / base.ppl - 1):+.2f}%), "
              f"KL {q.kl_mean:.4f} (p99 {q.kl_p99:.3f}), top-1 agreement {100 * q.top1_agreement:.1f}%")
    return 0


def check_text_only(model: str, text_only: bool, trust_remote_code: bool = False) -> None:
    """A multimodal checkpoint is quantized as its text model only when the user says so (--text-only):
    the checkpoint written has no vision tower (quantmoe/multimodal.py)."""
    from quantmoe.models import resolve_model, source_config
    from quantmoe.multimodal import TEXT_ONLY_HINT, multimodal_of, text_architecture

    entry = multimodal_of(source_config(resolve_model(model), trust_remote_code))
    if entry is None:
        if text_only:
            log.info("--text-only: %s is not a multimodal checkpoint; nothing to leave out", model)
        return
    if not text_only:
        raise ValueError(f"{model} is a multimodal {entry.display_name} checkpoint ({entry.model_type}): "
                         + TEXT_ONLY_HINT.format(text=entry.text_model_type,
                                                 arch=text_architecture(entry.text_model_type)))
    log.info("%s: quantizing its text model (%s); the checkpoint written has no vision tower", model,
             entry.text_model_type)


def gptq_config(args: argparse.Namespace) -> GPTQConfig:
    """The ``GPTQConfig`` of parsed ``quantize`` arguments."""
    from quantmoe.quant.pipeline import GPTQConfig

    return GPTQConfig(method=args.method, damp=args.damp, act_order=args.act_order, block_size=args.block_size,
                      static_groups=args.static_groups, expert_chunk=args.expert_chunk,
                      expert_batch_mb=args.expert_batch_mb, expert_cache_mb=args.expert_cache_mb,
                      expert_stats_mb=args.expert_stats_mb, attention_tail=not args.recompute_attention,
                      attention_replay=not args.no_attention_replay,
                      rotate=args.rotate, refine=args.refine, tune_steps=args.tune_steps, tune_lr=args.tune_lr)


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
    p.add_argument("--clip", choices=CLIP_MODES, default="none",
                   help="with --bits: range search per group: none (full range), mse, hmse (Hessian-weighted)")
    p.add_argument("--out", required=True, help="checkpoint folder (written atomically; must be new, empty, or an "
                                                "earlier quantmoe checkpoint with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier quantmoe checkpoint at --out")
    p.add_argument("--format", choices=("quantmoe", "gptq"), default="quantmoe",
                   help="(default: quantmoe) quantmoe: a checkpoint for quantmoe.load; gptq: a GPTQ-format folder that serving engines "
                        "(and quantmoe.load) read, as `quantmoe export` writes (an earlier export at --out is "
                        "replaced)")
    p.add_argument("--method", default="gptq", choices=("gptq", "rtn"), help="GPTQ, or round-to-nearest")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of the mean Hessian diagonal "
                                                            "(raised on failure, then RTN)")
    p.add_argument("--act-order", nargs="?", const="desc", default="none", choices=("none", "desc", "gar"),
                   help="GPTQ column order (default: none): desc visits columns by descending Hessian diagonal "
                        "(implies --static-groups); gar visits groups by their largest diagonal, each group's "
                        "columns by descending diagonal (groups stay as they are). A bare --act-order is desc")
    p.add_argument("--static-groups", action="store_true",
                   help="GPTQ: every group's scale/zero from the unquantized weight, not the error-updated one")
    p.add_argument("--block-size", type=int, default=128,
                   help="GPTQ columns per lazy-update block (speed; see docs/quantization.md)")
    p.add_argument("--expert-chunk", type=int, default=0,
                   help="at most this many experts per batched GPTQ call (0 = no cap but --expert-batch-mb's); "
                        "lowers peak memory, same result")
    p.add_argument("--expert-batch-mb", type=float, default=64, metavar="MB",
                   help="float32 working set of one batched expert GPTQ call (default 64): experts are batched in "
                        "chunks that fit, at least one; 0 = all of a block's experts at once. Same result")
    p.add_argument("--expert-stats-mb", type=float, default=1024, metavar="MB",
                   help="float32 input statistics (Hessians) of routed experts collected in one calibration pass "
                        "(default 1024): a block's experts are calibrated in groups that fit, at least one expert, "
                        "each group by a pass that stops at the experts' dispatch; 0 = all at once. Same result")
    p.add_argument("--recompute-attention", action="store_true",
                   help="do not keep o_proj's calibration inputs to rebuild the attention's output: the attention "
                        "runs once more per block (tokens x o_proj's input width less memory in the o_proj and "
                        "gate/up passes). Same result")
    p.add_argument("--no-attention-replay", action="store_true",
                   help="keep none of the attention's outputs for a block's later passes: the attention runs on "
                        "every pass (tokens x hidden less memory while the block is worked on; implies "
                        "--recompute-attention). Same result")
    p.add_argument("--expert-cache-mb", type=float, default=2048, metavar="MB",
                   help="memory for the routed experts' down inputs kept from the down stage for a block's final "
                        "pass (default 2048; as many experts as fit; 0 = off: lower peak memory, the final pass "
                        "recomputes their gate/up). Same result")
    p.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream by a random Hadamard matrix folded into the weights before "
                        "quantizing (same outputs in full precision, no runtime change; RMSNorm pre-norm families; "
                        "see docs/quantization.md)")
    p.add_argument("--refine", type=int, default=0, metavar="SWEEPS",
                   help="after GPTQ, this many sweeps of coordinate descent on the codes (same grid, same export, "
                        "lower layer loss; 0 = plain GPTQ; see docs/quantization.md)")
    p.add_argument("--tune-steps", type=int, default=0, metavar="STEPS",
                   help="after GPTQ, this many Adam steps tuning each block's group scales against the full-precision "
                        "block's output (same codes, same export; 0 = off; see docs/quantization.md)")
    p.add_argument("--tune-lr", type=float, default=0.005, metavar="LR",
                   help="learning rate of --tune-steps on the log-scales")
    p.add_argument("--calib", default="calibration", help="embedded split name or a local text file")
    p.add_argument("--calib-windows", type=int, default=128, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--moe-mode", default="routed", choices=("routed", "all", "weighted"),
                   help="which tokens each expert's Hessian sees (see docs/quantization.md)")
    p.add_argument("--min-expert-tokens", type=int, default=16,
                   help="experts with fewer calibration tokens fall back to RTN")
    p.add_argument("--eval", metavar="SPLIT", help="also report perplexity and KL before/after on this split")
    p.add_argument("--eval-windows", type=int, default=None, metavar="N",
                   help="with --eval: only the first N windows (the demo uses 48); default: every window")
    p.add_argument("--device", default=None, help="device for the block being quantized, e.g. cuda:0 "
                                                  "(default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER_OR_ID",
                   help="take the tokenizer from here (default: the model's own)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the weights in memory and on disk (default: the checkpoint's own); "
                        "Hessians and GPTQ run in float32")
    p.add_argument("--stream", action="store_true",
                   help="read one block at a time from the safetensors files and write each finished block "
                        "(memory set by one block; resumable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --stream run from its work folder .OUT.work (implies --stream)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="with --stream: refuse to start when one block + calibration activations need more, "
                        "e.g. 24GB")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code from the hub")
    p.add_argument("--text-only", action="store_true",
                   help="for a multimodal checkpoint (Llama 4, Qwen3.5-MoE, Gemma 4, dots.note3): quantize its MoE text model "
                        "and write a text-only checkpoint, without the vision tower (see docs/families.md)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others at each exchange before the job "
                        "fails (longer than the slowest rank's GPTQ of one stage; see docs/distributed.md)")
    from quantmoe.export.cli import add_target_arg

    add_target_arg(p)
    p.set_defaults(func=_cmd_quantize)
