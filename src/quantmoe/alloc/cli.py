"""``quantmoe plan MODEL --policy ...``: compute a bit-allocation plan, print it, write it as YAML.

Rules that need no data (uniform, attention, shared, experts, first/last, kind, pattern,
randomk) run on the config alone (meta device, no weights). Data-driven rules (topk, global,
outlier, importance) load the model; their statistics are computed once on the full-precision
model and cached as JSON under ``--cache-dir`` ($QUANTMOE_CACHE, else ~/.cache/quantmoe), keyed
by content: the weight hash, the hash of the token windows and every setting (alloc/evidence.py).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantmoe.alloc.presets import MODEL_SHAPES, PRESETS, format_policy, paper_config, parse_policy
from quantmoe.alloc.scorers import Evidence
from quantmoe.quant.grid import CLIP_MODES
from quantmoe.quant.plan import PLAN_HEADER
from quantmoe.safeout import check_file_output, starts_with

log = logging.getLogger(__name__)

BIT_CHAR = {2: "2", 3: "3", 4: "4", 8: "8", 16: "K"}


# --- printing -----------------------------------------------------------------------------------


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _bits_text(values: Counter) -> str:
    """'4' or '2/4' (sorted) for the bits present."""
    return "/".join(str(b) for b in sorted(values)) if values else "-"


def format_plan(anatomy, specs: Mapping[str, Any], title: str) -> str:
    """Bits by role and by block, the expert-by-block map, average and effective bits."""
    from quantmoe.quant.plan import bit_stats

    stats = bit_stats(specs, anatomy.units)
    lines = [title, "", "bits by role (share of the role's weights):"]
    by_role: dict[str, Counter] = defaultdict(Counter)
    for u in anatomy.units:
        by_role[u.role][specs[u.name].bits] += u.numel
    for role, weights in by_role.items():
        total = sum(weights.values())
        shares = "  ".join(f"{b} bits {100 * w / total:5.1f}%" for b, w in sorted(weights.items()))
        lines.append(f"  {role:<14} {_count(total):>8} weights   {shares}")
    lines += ["", "bits by block (experts: one character per expert, K = 16 bits kept, * = mixed linears):",
              f"  {'block':>5}  {'attn':<5} {'dense':<5} {'shared':<6} experts"]
    for b in anatomy.blocks:
        def cell(names):
            return _bits_text(Counter(specs[n].bits for n in names))
        experts = "".join(BIT_CHAR[s.pop()] if len(s := {specs[n].bits for n in names}) == 1 else "*"
                          for names in b.experts)
        lines.append(f"  {b.index:>5}  {cell(b.attention):<5} {cell(b.dense_mlp):<5} {cell(b.shared):<6} {experts}")
    gs = next(iter(specs.values())).group_size
    lines += ["", f"average bits {stats.average_bits:.4f}  (the paper's: sum(bits x weights) / sum(weights) over "
                  f"{_count(stats.params)} quantizable weights)",
              f"effective bits {stats.effective_bits:.4f}  (with fp16 scales and zero points, group size "
              f"{gs or 'per-channel'})"]
    return "\n".join(lines)


def format_importance(result) -> str:
    pred, meas = result.ranking("predicted"), result.ranking("measured")
    return (f"block importance (most important first): predicted {list(pred)}, measured {list(meas)}; "
            f"Spearman rank correlation of mean similarity {result.spearman:.3f}")


# --- command ------------------------------------------------------------------------------------


def _cmd_plan(args: argparse.Namespace) -> int:
    from quantmoe.alloc.evidence import StatisticsConfig, gather_evidence, load_routing
    from quantmoe.alloc.policies import build_plan, policy_needs
    from quantmoe.anatomy import describe, describe_config, inspect_model
    from quantmoe.atomic import atomic_write_text
    from quantmoe.models import load_model, resolve_model

    if args.out:
        check_file_output(Path(args.out), overwrite=args.overwrite, ours=starts_with(PLAN_HEADER), what="plan")
    rules = parse_policy(args.policy)
    needs = policy_needs(rules)
    preset = PRESETS.get(args.policy.strip())
    group_size = args.group_size if args.group_size is not None else preset.group_size if preset else 128
    model = tokenizer = None
    without_data = args.bits_only or not needs or (args.routing and needs == ["routing"])
    if args.model in MODEL_SHAPES:
        anatomy = describe_config(paper_config(args.model))
    elif without_data:
        anatomy = inspect_model(resolve_model(args.model), trust_remote_code=args.trust_remote_code)
    else:
        # the rules on the config alone first (placeholder ranking): a bad rule fails before any weights load
        meta = inspect_model(resolve_model(args.model), trust_remote_code=args.trust_remote_code)
        build_plan(rules, meta, Evidence(placeholder=True), group_size=group_size or None,
                   symmetric=not args.asym, clip=args.clip).resolve(meta)
        model, tokenizer = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code,
                                      tokenizer=args.tokenizer)
        anatomy = describe(model)
    if args.bits_only:
        evidence = Evidence(placeholder=True)
        log.warning("--bits-only: data-driven rules pick experts/blocks/linears in index order; the average "
                    "bits are exact, the choice is not")
    else:
        routing = load_routing(Path(args.routing), anatomy) if args.routing else None
        stats = StatisticsConfig(split=args.split, rank_split=args.rank_split, windows=args.windows,
                                 seq_len=args.seq_len, seed=args.seed, massive_threshold=args.massive_threshold)
        evidence = gather_evidence(needs, model, tokenizer, anatomy, stats, model_name=args.model,
                                   cache_dir=args.cache_dir, routing=routing)
    plan = build_plan(rules, anatomy, evidence, group_size=group_size or None, symmetric=not args.asym,
                      clip=args.clip)
    specs = plan.resolve(anatomy)
    moe = [b for b in anatomy.blocks if b.is_moe]
    title = (f"{args.model}: {anatomy.family}, {anatomy.num_blocks} blocks ({len(moe)} MoE, "
             f"{moe[0].num_experts if moe else 0} routed experts each)\npolicy: {format_policy(rules)}")
    print(format_plan(anatomy, specs, title))
    from quantmoe.export.engines import format_servable

    print(format_servable(anatomy.units, specs))
    if evidence.importance is not None:
        print(format_importance(evidence.importance))
    if args.out:
        from quantmoe.quant.plan import bit_stats

        stats = bit_stats(specs, anatomy.units)
        header = (f"{PLAN_HEADER} plan {args.model} --policy '{format_policy(rules)}'\n"
                  f"# average bits {stats.average_bits:.4f}, effective bits {stats.effective_bits:.4f}\n")
        atomic_write_text(Path(args.out), header + plan.to_yaml())
        print(f"wrote {args.out}")
    return 0


EPILOG = """policy rules (compact form, comma-separated, later rules override earlier ones):
  uniform=B  attention=B (attention + dense MLP)  dense=B  shared=B  experts=B
  topk=K:B  randomk=K:B[:SEED]  global=N:B[:frequency|weight|wanda|massive]
  first=N:B  last=N:B  kind=KIND:B[:ROLE]  pattern=REGEX:B  outlier=PERCENT:B
  importance=N:B[:predicted|measured]  preset=NAME
bits: 2, 3, 4, 8, 16 (16 = kept). Example: --policy "experts=2,attention=4,shared=8,topk=30:4"
presets: """ + ", ".join(PRESETS)


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="compute a mixed-precision bit plan from a policy and print it",
                       description="Apply a bit-allocation policy to MODEL and print the plan: bits by role and "
                                   "block, an expert-by-block bit map, average and effective bits.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="embedded model (mixtral-s, deepseek-s), local folder, hub id, or the shapes "
                                 f"of a paper or flagship model on the meta device ({', '.join(MODEL_SHAPES)})")
    p.add_argument("--policy", required=True, help="compact rules, a preset name, or a policy YAML file")
    p.add_argument("--out", help="write the plan here as YAML (for `quantmoe quantize --plan`); an existing file "
                                 "is replaced only if quantmoe wrote it and --overwrite is given")
    p.add_argument("--overwrite", action="store_true", help="replace a plan file quantmoe wrote earlier at --out")
    p.add_argument("--group-size", type=int, default=None,
                   help="group size of the plan; 0 = per-channel (default: the preset's, else 128)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid")
    p.add_argument("--clip", choices=CLIP_MODES, default="none",
                   help="range search per group: none (full range), mse, hmse (Hessian-weighted; see docs/quantization.md)")
    p.add_argument("--bits-only", action="store_true",
                   help="no data: data-driven rules pick in index order (exact average bits, arbitrary choice)")
    p.add_argument("--routing", help="saved routing statistics (JSON) to use instead of computing them")
    p.add_argument("--split", default="calibration", help="text for statistics and predictor training "
                                                          "(embedded split or text file)")
    p.add_argument("--rank-split", default="validation", help="text the block-importance predictor ranks on")
    p.add_argument("--windows", type=int, default=64, help="windows of text for statistics")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per statistics window")
    p.add_argument("--seed", type=int, default=0, help="seed of the window offsets (and of randomk/the predictor)")
    p.add_argument("--massive-threshold", type=float, default=1000.0,
                   help="|h| at or above which a token is a massive-activation token")
    p.add_argument("--cache-dir", help="statistics cache (default $QUANTMOE_CACHE or ~/.cache/quantmoe)")
    p.add_argument("--device", default="cpu", help="torch device for computing statistics")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER_OR_ID",
                   help="take the tokenizer from here (default: the model's own)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code from the hub")
    p.set_defaults(func=_cmd_plan)
