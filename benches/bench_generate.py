"""Generation speed of a quantized model by loading path, beside the full-precision model.

For each embedded model: quantize it (RTN by default: the speed of a loaded model does not
depend on how its codes were found), save the checkpoint to a temporary folder, and load it
back every way ``quantmoe.load`` can:

- ``fp``: the full-precision model (float32, eager experts), the reference;
- ``packed, unpack every call``: ``cache_codes=False``, the least memory;
- ``packed, code cache``: the default, codes unpacked once on first use;
- ``dense``: ``dense=True``, dequantized once, plain linears and fused experts.

Each path runs the same greedy generation (same prompt, a fixed number of new tokens, after
a warm-up run), best of ``--repeats`` rounds with the paths interleaved; the table gives tokens/s of the decode, prefill time of
the prompt (one forward pass over it), the ratio to fp, the max logit difference to the
in-memory quantized model on the prompt, and the weight memory of each path. Run:

    .venv/bin/python benches/bench_generate.py [--models mixtral-s deepseek-s] [--bits 4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import quantmoe
from quantmoe import api
from quantmoe.calib.data import CalibrationConfig
from quantmoe.models import load_model
from quantmoe.quant.dense import code_cache_bytes
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan

PROMPT = "ROMEO: What light through yonder window breaks? It is the east, and"


@dataclass(frozen=True)
class Row:
    model: str
    path: str
    tokens_per_s: float
    cpu_tokens_per_s: float
    prefill_ms: float
    max_logit_diff: float
    weight_mb: float


def weight_mb(model: nn.Module) -> float:
    """Parameters, buffers and code caches, in MB (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return (total + code_cache_bytes(model)) / 2**20


@torch.no_grad()
def timed_once(model: nn.Module, ids: torch.Tensor, tokens: int) -> tuple[float, float, float]:
    """(decode seconds per new token by the wall clock, the same by this process's CPU time,
    prefill seconds) of one greedy generation."""
    t0, c0 = time.perf_counter(), time.process_time()
    model(ids)
    prefill, prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if out.shape[1] != ids.shape[1] + tokens:
        raise RuntimeError(f"generate gave {out.shape[1] - ids.shape[1]} new tokens, not {tokens}")
    # generate runs the prompt once too (for the first new token): decode is the other tokens - 1
    return (wall - prefill) / (tokens - 1), (cpu - prefill_cpu) / (tokens - 1), prefill


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> list[Row]:
    fp, tok = load_model(name)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    quantized = copy.deepcopy(fp)
    plan = Plan.uniform(args.bits, group_size=args.group_size)
    result = api.quantize(quantized, tok, plan, CalibrationConfig(num_windows=args.calib_windows),
                          GPTQConfig(method=args.method), progress=False)
    path = api.save(result, tmp / name, tok, plan, CalibrationConfig(num_windows=args.calib_windows),
                    GPTQConfig(method=args.method), name)
    reference = logits(quantized, ids)
    del quantized
    paths = {
        "fp": lambda: fp,
        "packed, unpack every call": lambda: quantmoe.load(path, cache_codes=False),
        "packed, code cache": lambda: quantmoe.load(path),
        "dense": lambda: quantmoe.load(path, dense=True),
    }
    models = {label: make() for label, make in paths.items()}
    best: dict[str, list[float]] = {label: [float("inf")] * 3 for label in models}
    with torch.no_grad():
        for model in models.values():  # warm-up (and the code caches get built)
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for _ in range(args.repeats):  # paths interleaved, so a busy spell of the machine hits all of them
        for label, model in models.items():
            best[label] = [min(a, b) for a, b in zip(best[label], timed_once(model, ids, args.tokens))]
    rows = []
    for label, model in models.items():
        diff = float((logits(model, ids) - reference).abs().max()) if label != "fp" else float("nan")
        wall, cpu, prefill = best[label]
        rows.append(Row(name, label, 1 / wall, 1 / cpu, 1000 * prefill, diff, weight_mb(model)))
        print(f"{name} {label}: {1 / wall:.1f} tokens/s ({1 / cpu:.1f} by CPU time), prefill {1000 * prefill:.1f} ms",
              flush=True)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"{name}: checkpoint folder {size / 1e6:.2f} MB ({args.bits}-bit, group {args.group_size})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral-s", "deepseek-s"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation (greedy)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path; the best is kept")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", " ".join(sys.argv), f"(torch threads {torch.get_num_threads()})")
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        rows = [row for name in args.models for row in bench_model(name, args, Path(tmp))]
    print(f"\n{'model':<11} {'loading path':<26} {'tokens/s':>9} {'slowdown':>9} {'CPU tok/s':>10} {'slowdown':>9} "
          f"{'prefill ms':>11} {'weights MB':>11} {'max |dlogit|':>13}")
    for r in rows:
        fp = next(x for x in rows if x.model == r.model and x.path == "fp")
        diff = "-" if r.path == "fp" else f"{r.max_logit_diff:.2e}"
        print(f"{r.model:<11} {r.path:<26} {r.tokens_per_s:>9.1f} {fp.tokens_per_s / r.tokens_per_s:>8.2f}x "
              f"{r.cpu_tokens_per_s:>10.1f} {fp.cpu_tokens_per_s / r.cpu_tokens_per_s:>8.2f}x "
              f"{r.prefill_ms:>11.1f} {r.weight_mb:>11.2f} {diff:>13}")
    print("tokens/s: greedy decode, wall clock (CPU tok/s: by this process's CPU time, steadier on a shared "
          "machine); slowdown: fp tokens/s / path tokens/s (1.00x = as fast as fp); prefill: one forward pass "
          "over the prompt; weights MB: parameters, buffers and code caches; max |dlogit|: against the in-memory "
          "quantized model on the prompt")


if __name__ == "__main__":
    main()
