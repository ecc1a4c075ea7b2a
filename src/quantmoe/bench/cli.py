"""``quantmoe bench SWEEP.yaml`` and ``quantmoe report STORE``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from quantmoe.bench.outputs import check_report_dir, check_store, is_results_store, prepare_report_dir

log = logging.getLogger(__name__)


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
    outcome = run_sweep(config, store_path=args.store, cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"\n{config.name}: {outcome.ran} runs done now, {outcome.skipped} already in {outcome.store} "
          f"({outcome.seconds:.0f} s)\n")
    print(stored_table(outcome.store, config.name))
    if not args.no_report:
        from quantmoe.bench.report import build_report

        path = build_report(outcome.store, prepare_report_dir(report_dir), config.name)
        print(f"\nreport: {path} (and {path.with_suffix('.html').name})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from quantmoe.bench.report import build_report
    from quantmoe.bench.summary import default_report_dir

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
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("report", help="build the Markdown/HTML report of a results store (no model runs)",
                       description="Summary tables (mean ± std over calibration seeds), quality vs bits with the "
                                   "Pareto frontier, bit maps of the best mixed-precision plans and routing "
                                   "frequency, from the results store alone: report.md, report.html and PNGs.")
    p.add_argument("store", help="results store (SQLite) written by `quantmoe bench`")
    p.add_argument("--out", help="output folder (default: `report` beside the store)")
    p.add_argument("--sweep", help="which sweep of the store (needed when it holds several)")
    p.set_defaults(func=_cmd_report)
