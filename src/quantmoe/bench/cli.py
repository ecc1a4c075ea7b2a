"""``quantmoe bench SWEEP.yaml`` and ``quantmoe report STORE``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from quantmoe.bench.outputs import check_report_dir, check_store, is_results_store, prepare_report_dir

log = logging.getLogger(__name__)

_LOCAL = "local"  # `--ray` given without an address


def _cmd_bench(args: argparse.Namespace) -> int:
    from quantmoe.bench.runner import run_sweep
    from quantmoe.bench.summary import default_report_dir, stored_table
    from quantmoe.bench.sweep import load_sweep

    config = load_sweep(args.sweep)
    store = check_store(Path(args.store or config.store))  # both outputs are checked before any run
    report_dir = Path(args.report_dir) if args.report_dir else default_report_dir(store)
    if not args.no_report:
        check_report_dir(report_dir)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.ray is not None:
        from quantmoe.bench.ray_runner import run_sweep_ray

        outcome = run_sweep_ray(config, store_path=args.store, cache_dir=args.cache_dir,
                                address=None if args.ray == _LOCAL else args.ray, progress=not args.quiet,
                                threads=args.threads)
    else:
        outcome = run_sweep(config, store_path=args.store, cache_dir=args.cache_dir, progress=not args.quiet)
    failed = f", {outcome.failed} failed (rerun the same command to try them again)" if outcome.failed else ""
    print(f"\n{config.name}: {outcome.ran} runs done now, {outcome.skipped} already in {outcome.store}{failed} "
          f"({outcome.seconds:.0f} s)\n")
    print(stored_table(outcome.store, config.name))
    if not args.no_report:
        from quantmoe.bench.report import build_report

        path = build_report(outcome.store, prepare_report_dir(report_dir), config.name)
        print(f"\nreport: {path} (and {path.with_suffix('.html').name})")
    return 1 if outcome.failed else 0


def _write_plan(args: argparse.Namespace) -> int:
    from quantmoe.atomic import atomic_write_text
    from quantmoe.bench.plans import find_run, plan_yaml

    record = find_run(Path(args.store), args.plan, model=args.model, seed=args.seed, sweep=args.sweep)
    out = Path(args.out or f"plan-{Path(record.model).name}-{record.run.replace(' ', '-').replace('/', '-')}.yaml")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists: choose another --out, or pass --overwrite to replace it")
    atomic_write_text(out, plan_yaml(record))
    seed = "" if record.seed is None else f", calibration seed {record.seed}"
    print(f"wrote {out}: plan of {record.run!r} on {record.model}{seed} ({record.average_bits:.3f} average bits); "
          f"use it with `quantmoe quantize {record.model} --plan {out} --out DIR`")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from quantmoe.bench.report import build_report
    from quantmoe.bench.summary import default_report_dir

    if args.plan is not None:
        return _write_plan(args)
    for name in ("model", "seed"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name} selects the run of --plan RUN: add --plan, or leave --{name} out")
    store = Path(args.store)
    if store.exists() and not is_results_store(store):
        raise ValueError(f"{store} is not a quantmoe results store: give the store written by `quantmoe bench`")
    path = build_report(store, prepare_report_dir(Path(args.out) if args.out else default_report_dir(store)),
                        args.sweep)
    print(f"report: {path} (and {path.with_suffix('.html').name})")
    return 0


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a sweep (models x plans x seeds x metrics) into a results store",
                       description="Run every (model, run, calibration seed) of SWEEP.yaml that is not yet in the "
                                   "results store, then print the summary and build the report. Resumable: rerun "
                                   "the same command after an interruption. See docs/benchmark.md for the format.")
    p.add_argument("sweep", help="sweep YAML file (e.g. sweeps/demo.yaml)")
    p.add_argument("--store", help="results store (SQLite); default: the sweep's `store`")
    p.add_argument("--cache-dir", help="shared statistics and reference cache (default $QUANTMOE_CACHE)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    p.add_argument("--report-dir", help="where the report goes (default: `report` beside the store)")
    p.add_argument("--ray", nargs="?", const=_LOCAL, default=None, metavar="ADDRESS",
                   help="run each (model, run, seed) as a Ray task with the sweep's `ray` resources: on the cluster "
                        "at ADDRESS (e.g. auto, ray://head:10001), or without ADDRESS on a local Ray with 2 CPUs "
                        "(needs pip install 'quantmoe[ray]'; see docs/benchmark.md)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="build the Markdown/HTML report of a results store (no model runs)",
                       description="Summary tables (mean ± std over calibration seeds), quality vs bits with the "
                                   "Pareto frontier, bit maps of the best mixed-precision plans and routing "
                                   "frequency, from the results store alone: report.md, report.html and PNGs.")
    p.add_argument("store", help="results store (SQLite) written by `quantmoe bench`")
    p.add_argument("--out", help="output folder (default: `report` beside the store); with --plan: the plan file "
                                 "(default: plan-MODEL-RUN.yaml)")
    p.add_argument("--sweep", help="which sweep of the store (needed when it holds several)")
    p.add_argument("--plan", metavar="RUN", help="write the plan YAML of this stored run (its name, as in the "
                                                 "report) instead of the report")
    p.add_argument("--model", help="with --plan: the model, when the run was stored for several")
    p.add_argument("--seed", type=int, help="with --plan: the calibration seed (default: the latest row)")
    p.add_argument("--overwrite", action="store_true", help="with --plan: replace an existing plan file")
    p.set_defaults(func=_cmd_report)
