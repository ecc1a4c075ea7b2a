"""``quantmoe bench SWEEP.yaml``."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def _cmd_bench(args: argparse.Namespace) -> int:
    from quantmoe.bench.runner import run_sweep
    from quantmoe.bench.store import ResultsStore
    from quantmoe.bench.summary import aggregate, format_table
    from quantmoe.bench.sweep import load_sweep

    config = load_sweep(args.sweep)
    outcome = run_sweep(config, store_path=args.store, cache_dir=args.cache_dir, progress=not args.quiet)
    with ResultsStore(outcome.store, create=False) as store:
        records = store.records(sweep=config.name)
    print(f"\n{config.name}: {outcome.ran} runs done now, {outcome.skipped} already in {outcome.store} "
          f"({outcome.seconds:.0f} s)\n")
    print(format_table(aggregate(records)))
    return 0


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a sweep (models x plans x seeds x metrics) into a results store",
                       description="Run every (model, run, calibration seed) of SWEEP.yaml that is not yet in the "
                                   "results store, then print the summary. Resumable: rerun "
                                   "the same command after an interruption. See docs/benchmark.md for the format.")
    p.add_argument("sweep", help="sweep YAML file (e.g. sweeps/demo.yaml)")
    p.add_argument("--store", help="results store (SQLite); default: the sweep's `store`")
    p.add_argument("--cache-dir", help="shared statistics and reference cache (default $QUANTMOE_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)

