"""One rank of a gloo quantization of a tiny model (run by test_distributed.py, one process per rank).

usage: dist_worker.py RANK WORLD RENDEZVOUS_FILE OUT_FILE [--die exit|hang] [--timeout S]
Rank 0 saves the quantized model's state dict and report to OUT_FILE. ``--die`` makes rank 1
exit (or hang) when block 1's Hessians are reduced.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from quantmoe.anatomy import describe, tiny_model
from quantmoe.calib.data import CalibrationConfig
from quantmoe.quant import distributed
from quantmoe.quant.pipeline import quantize_model
from quantmoe.quant.plan import Plan

FAMILY, WINDOWS, SEQ = "mixtral", 8, 32
CALIB = CalibrationConfig(min_expert_tokens=4, batch_size=2)


def setup():
    """The model, plan and windows every rank (and the single-process reference) starts from."""
    model = tiny_model(FAMILY)
    specs = Plan.uniform(3, group_size=16).resolve(describe(model))
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, model.config.vocab_size, (WINDOWS, SEQ), generator=g)
    return model, specs, windows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("rank", type=int)
    p.add_argument("world", type=int)
    p.add_argument("rendezvous")
    p.add_argument("out")
    p.add_argument("--die", choices=("exit", "hang"))
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.rendezvous}", rank=args.rank,
                            world_size=args.world, timeout=timedelta(seconds=args.timeout))
    if args.die and args.rank == 1:
        reduce_stats = distributed.Parallel.reduce_stats

        def dying(self, collector, units, what):
            if what.startswith("block 1 "):
                if args.die == "exit":
                    os._exit(3)
                time.sleep(3600)
            return reduce_stats(self, collector, units, what)

        distributed.Parallel.reduce_stats = dying
    model, specs, windows = setup()
    report = quantize_model(model, specs, windows, CALIB, progress=False)
    if args.rank == 0:
        torch.save({"state": model.state_dict(), "units": {k: asdict(v) for k, v in report.units.items()},
                    "expert_tokens": dict(report.expert_tokens), "fallbacks": list(report.fallbacks)}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
