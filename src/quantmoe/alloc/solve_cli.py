"""``quantmoe solve``: the budget solver from the command line."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from quantmoe.quant.grid import CLIP_MODES
from quantmoe.quant.plan import PLAN_HEADER
from quantmoe.safeout import check_file_output, starts_with

log = logging.getLogger(__name__)


def _parse_widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"check --widths: {text!r} is not a comma-separated list of bit widths") from None


def _parse_role_bits(items: list[str] | None) -> dict[str, int]:
    out = {}
    for item in items or []:
        role, _, bits = item.partition("=")
        if not bits.isdigit():
            raise ValueError(f"check {item!r}: write ROLE=BITS, e.g. attention=4")
        out[role] = int(bits)
    return out


def _menu(args: argparse.Namespace, widths: tuple[int, ...]):
    """The solver's choices: --menu, else the product of --widths, --group-sizes, --grids and --clips
    (each defaulting to the single --group-size / --asym / --clip); () = widths only."""
    from quantmoe.alloc.menu import menu_product, parse_menu
    from quantmoe.quant.grid import QuantSpec

    base = QuantSpec(4, args.group_size or None, not args.asym, args.clip)
    if args.menu:
        if args.group_sizes or args.grids or args.clips:
            raise ValueError("give either --menu or --group-sizes/--grids/--clips, not both")
        return parse_menu(args.menu, base)
    if not (args.group_sizes or args.grids or args.clips):
        return ()
    try:
        sizes = [int(g) or None for g in args.group_sizes.split(",")] if args.group_sizes else [base.group_size]
    except ValueError:
        raise ValueError(f"check --group-sizes: {args.group_sizes!r} is not a comma-separated list like "
                         f"32,64,128,0 (0 = per-channel)") from None
    grids = args.grids.split(",") if args.grids else ["sym" if base.symmetric else "asym"]
    bad = [g for g in grids if g not in ("sym", "asym")]
    if bad:
        raise ValueError(f"check --grids: {bad[0]!r} is not sym or asym")
    clips = args.clips.split(",") if args.clips else [base.clip]
    return menu_product(widths, sizes, [g == "sym" for g in grids], clips)


def _is_damage_cache(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as d:
            return {"units", "widths", "damage", "params", "metric"} <= set(d.files)
    except (OSError, ValueError):
        return False


def _cmd_solve(args: argparse.Namespace) -> int:
    from quantmoe.alloc.damage import DamageConfig, load_or_measure_damage
    from quantmoe.alloc.solver import SolverConfig, solve
    from quantmoe.anatomy import describe
    from quantmoe.atomic import atomic_write_text
    from quantmoe.bench.preflight import check_solver, model_anatomy
    from quantmoe.models import load_model
    from quantmoe.quant.plan import bit_stats

    if args.out:
        check_file_output(Path(args.out), overwrite=args.overwrite, ours=starts_with(PLAN_HEADER), what="plan")
    if args.damage_cache:  # an existing cache of ours is reused or refreshed; anything else is left alone
        check_file_output(Path(args.damage_cache), overwrite=True, ours=_is_damage_cache, what="damage cache",
                          option="--damage-cache")
    widths = _parse_widths(args.widths)
    menu = _menu(args, widths)
    try:
        config = SolverConfig(target_bits=args.target, widths=widths, granularity=args.granularity,
                              role_min_bits=_parse_role_bits(args.min_bits),
                              role_max_bits=_parse_role_bits(args.max_bits),
                              time_limit=args.time_limit, budget=args.budget, menu=menu)
    except ValueError as err:  # the config names its fields; the user typed options
        raise ValueError(f"{err} (options: --target, --budget, --widths/--menu, --min-bits/--max-bits)") from None
    # roles, widths and the budget on the config alone: a wrong --min-bits fails before weights and damage
    check_solver(config, model_anatomy(args.model, args.trust_remote_code), "check --target, --min-bits, --max-bits",
                 group_size=args.group_size or None, symmetric=not args.asym, clip=args.clip)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer)
    anatomy = describe(model)
    damage = DamageConfig(split=args.calib, windows=args.calib_windows, seq_len=args.calib_len, seed=args.seed,
                          group_size=args.group_size or None, symmetric=not args.asym, clip=args.clip,
                          metric=args.metric, act_order=args.act_order, refine=args.refine)
    table = load_or_measure_damage(model, tokenizer, anatomy, widths, damage,
                                   Path(args.damage_cache) if args.damage_cache else None, menu=menu)
    sol = solve(anatomy, table, config, group_size=args.group_size or None, symmetric=not args.asym, clip=args.clip)
    stats = bit_stats(sol.plan.resolve(anatomy), anatomy.units)
    print(f"{args.model}: {stats.average_bits:.4f} average bits ({stats.effective_bits:.3f} effective), "
          f"estimated {table.metric} damage {sol.damage:.4g}, {sol.groups} groups, {sol.status}")
    by_role: dict[str, dict[int, int]] = {}
    for u in anatomy.units:
        by_role.setdefault(u.role, {}).setdefault(sol.bits[u.name], 0)
        by_role[u.role][sol.bits[u.name]] += u.numel
    for role, counts in by_role.items():
        total = sum(counts.values())
        print(f"  {role:<14} " + ", ".join(f"{b}-bit {100 * n / total:.0f}%" for b, n in sorted(counts.items())))
    if args.out:
        header = (f"{PLAN_HEADER} solve {args.model} --target {args.target:g} --widths {args.widths} "
                  f"--granularity {args.granularity} --metric {table.metric}\n"
                  f"# average bits {stats.average_bits:.4f}, effective bits {stats.effective_bits:.4f}\n")
        atomic_write_text(Path(args.out), header + sol.plan.to_yaml())
        print(f"plan written to {args.out}")
    if args.json:
        print(json.dumps(sol.bits))
    return 0


def add_solve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solve", help="best plan for a bit budget (budget solver)",
                       description="Measure what each unit costs at each choice (a width, or a full setting of the "
                                   "--menu: width, group size, grid, clipping) with an empirical-Fisher loss "
                                   "estimate or the GPTQ output error, and pick one choice per unit by mixed-integer "
                                   "programming so that the bits (effective by default: codes, scales and zero "
                                   "points) meet the target within the tolerance, never above it.")
    p.add_argument("model", help="embedded model name (mixtral-s, deepseek-s), local folder or hub id")
    p.add_argument("--target", type=float, required=True, help="bits per weight, e.g. 3.0 (see --budget)")
    p.add_argument("--budget", default="effective", choices=("effective", "average"),
                   help="what --target counts: effective bits (codes + 16-bit scales + zero points: what the "
                        "file stores) or average bits (codes only, the paper's)")
    p.add_argument("--menu", help="choices per unit, e.g. 2/g64/asym/hmse,3/g128,4 (BITS[/gSIZE|/gc][/sym|/asym]"
                                  "[/none|/mse|/hmse]; parts left out from --group-size/--asym/--clip)")
    p.add_argument("--group-sizes", help="menu as a product: group sizes, e.g. 32,64,128,0 (0 = per-channel)")
    p.add_argument("--grids", help="menu as a product: sym,asym")
    p.add_argument("--clips", help="menu as a product: e.g. none,hmse")
    p.add_argument("--widths", default="2,3,4", help="allowed widths, e.g. 2,3,4,8")
    p.add_argument("--granularity", default="linear", choices=("linear", "expert", "block"),
                   help="unit of choice for routed experts; 'block' = serving-compatible")
    p.add_argument("--metric", default="fisher", choices=("fisher", "output", "kfac"),
                   help="damage estimate: empirical-Fisher loss change, GPTQ output error, or both (kfac: output error weighted by the loss gradient at each output)")
    p.add_argument("--min-bits", nargs="*", metavar="ROLE=BITS", help="e.g. attention=4")
    p.add_argument("--max-bits", nargs="*", metavar="ROLE=BITS", help="e.g. routed_expert=3")
    p.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    p.add_argument("--asym", action="store_true", help="asymmetric grid")
    p.add_argument("--clip", choices=CLIP_MODES, default="none",
                   help="range search per group: none (full range), mse, hmse (Hessian-weighted; see docs/quantization.md)")
    p.add_argument("--act-order", nargs="?", const="desc", default="none", choices=("none", "desc", "gar"),
                   help="GPTQ column order the damage is measured with (quantize with the same)")
    p.add_argument("--refine", type=int, default=0, metavar="SWEEPS",
                   help="GPTQ refinement sweeps the damage is measured with (quantize with the same --refine)")
    p.add_argument("--calib", default="calibration", help="embedded split name or a local text file")
    p.add_argument("--calib-windows", type=int, default=32, help="calibration windows for measuring damage")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--time-limit", type=float, default=120.0,
                   help="seconds for the exact program; then the best plan found, with its gap to the optimum")
    p.add_argument("--damage-cache", help="npz file to reuse measured damage across targets (reused only when "
                                          "measured on the same weights, text and settings; else measured again)")
    p.add_argument("--out", help="write the plan YAML here; an existing file is replaced only if quantmoe wrote "
                                 "it and --overwrite is given")
    p.add_argument("--overwrite", action="store_true", help="replace a plan file quantmoe wrote earlier at --out")
    p.add_argument("--json", action="store_true", help="also print unit -> bits as JSON")
    p.add_argument("--tokenizer", default=None, metavar="FOLDER_OR_ID",
                   help="take the tokenizer from here (default: the model's own)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code from the hub")
    p.set_defaults(func=_cmd_solve)
