"""The main job on the embedded models (``make demo``): the default benchmark sweep.

Runs ``sweeps/demo.yaml`` (full precision; uniform GPTQ at 2, 3 and 4 bits; the paper's
main heuristics; the budget solver at 2.5 and 3.0 bits; three calibration seeds each) into
``runs/demo/results.sqlite``, writes the report beside it and prints the summary table.
Resumable: an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from quantmoe.anatomy import format_anatomy
from quantmoe.anatomy.describe import inspect_model
from quantmoe.models import embedded_root, resolve_model

log = logging.getLogger(__name__)


def demo_sweep_path() -> Path:
    """``sweeps/demo.yaml`` of the repository."""
    path = embedded_root().parent / "sweeps" / "demo.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a clone of the repository")
    return path


def run_demo(threads: int | None = None, sweep: Path | None = None, store: Path | None = None,
             report_dir: Path | None = None) -> int:
    from quantmoe.bench.outputs import check_store, prepare_report_dir
    from quantmoe.bench.report import build_report
    from quantmoe.bench.runner import run_sweep
    from quantmoe.bench.summary import default_report_dir, stored_table
    from quantmoe.bench.sweep import load_sweep

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    config = load_sweep(sweep or demo_sweep_path())
    for spec in config.models:
        print(f"\n=== {spec.name} ===\n{format_anatomy(inspect_model(resolve_model(spec.name)))}", flush=True)
    print(f"\nsweep {config.name}: {len(config.models)} models x {len(config.runs)} runs x "
          f"{len(config.seeds)} calibration seeds", flush=True)
    check_store(Path(store or config.store))
    outcome = run_sweep(config, store_path=store)
    report = build_report(outcome.store, prepare_report_dir(report_dir or default_report_dir(outcome.store)),
                          sweep=config.name)
    ppl = config.eval.perplexity
    print(f"\n{config.name}: mean ± std over calibration seeds; ppl and KL (mean per-token KL(full precision || "
          f"quantized)) on {ppl.max_windows or 'all'} {ppl.split} windows of {ppl.seq_len} tokens; task mean = "
          f"plain mean of {', '.join(config.eval.tasks) or 'no tasks'}\n")
    print(stored_table(outcome.store, config.name))
    print(f"\nreport: {report}\n{outcome.ran} runs now, {outcome.skipped} reused from {outcome.store}; "
          f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
