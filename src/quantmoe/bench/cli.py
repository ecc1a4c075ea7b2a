"""``quantmoe bench SWEEP.yaml`` and ``quantmoe report STORE``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from quantmoe.safeout import check_file_output, check_folder_output, claim_folder

log = logging.getLogger(__name__)


SQLITE_HEADER = b"SQLite format 3\x00"


def default_report_dir(store: Path) -> Path:
    return store.parent / "report"


def is_results_store(path: Path) -> bool:
    """Whether ``path`` is a results store quantmoe wrote (an SQLite file with its ``runs`` and ``meta`` tables)."""
    import sqlite3

    try:
        with open(path, "rb") as fh:
            if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                return False
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except (OSError, sqlite3.DatabaseError):
        return False
    return {"runs", "meta"} <= tables


def check_store(store: Path) -> Path:
    """A results store path quantmoe may append to: new, or a store of ours (never a foreign file)."""
    return check_file_output(store, overwrite=False, ours=is_results_store, what="results store",
                             option="--store", append=True)


def check_report_dir(out: Path) -> Path:
    """A report folder quantmoe may (re)write: new, empty, or an earlier report (rebuilt in place)."""
    return check_folder_output(out, overwrite=False, what="report", refresh_ours=True)


def prepare_report_dir(out: Path) -> Path:
    """``check_report_dir``, then mark the folder as ours before any file goes in."""
    check_report_dir(out)
    return claim_folder(out, "report")


def _cmd_bench(args: argparse.Namespace) -> int:
    from quantmoe.bench.runner import run_sweep
    from quantmoe.bench.summary import stored_table
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
