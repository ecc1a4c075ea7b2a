"""Where a streamed quantization's peak RSS is: the highest RSS inside each step of the driver.

Runs `quantmoe quantize --stream` in this process on bench_scale.py's random Qwen3-MoE (one
block by default, written under .cache/bench/profile), samples the process's RSS every 20 ms,
and attributes each sample to the innermost step running then: capturing the block inputs,
loading a block, each calibration pass, each stage's GPTQ (by the kinds it quantizes), the
block's final pass, or "between steps". Prints the highest RSS seen in each:

    .venv/bin/python benches/profile_stream_memory.py [--layers 1] [--quantize-args "--expert-cache-mb 0"]
"""

from __future__ import annotations

import argparse
import functools
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

import bench_scale  # noqa: E402  (its PLAN; the model is written by a child process)


def _rss_mb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmRSS"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=ROOT / ".cache" / "bench" / "profile")
    ap.add_argument("--quantize-args", default="", help="more options for `quantmoe quantize --stream`")
    args = ap.parse_args()
    model_dir = args.dir / "model"
    shape = argparse.Namespace(**{k: getattr(args, k) for k in ("hidden", "layers", "experts", "moe_intermediate")})
    writer = f"import argparse, sys; sys.path.insert(0, {str(ROOT / 'benches')!r}); import bench_scale; " \
             f"bench_scale.generate(__import__('pathlib').Path({str(model_dir)!r}), argparse.Namespace(**{vars(shape)!r}))"
    subprocess.run([sys.executable, "-c", writer], check=True)  # apart: writing it would stay in this RSS
    plan, out = args.dir / "plan.yaml", args.dir / "out"
    plan.write_text(bench_scale.PLAN)
    shutil.rmtree(out, ignore_errors=True)

    from quantmoe.cli import main as quantmoe_main
    from quantmoe.quant import lazy, pipeline

    events: list[tuple[float, str]] = []  # (time, "+step" / "-step")

    def step(owner, name: str, label=None) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def wrapper(*a, **k):
            tag = label(*a) if label else name
            events.append((time.perf_counter(), "+" + tag))
            try:
                return real(*a, **k)
            finally:
                events.append((time.perf_counter(), "-" + tag))
        setattr(owner, name, wrapper)

    step(pipeline, "capture_layer_inputs", lambda *a: "capture block inputs")
    step(lazy.LazyCheckpoint, "load_block", lambda *a: "load block")
    step(pipeline, "_calibrate_block", lambda *a: "calibration pass")
    step(pipeline, "_run_block", lambda *a: "final pass")
    step(pipeline, "_quantize_units",
         lambda model, units, *a: "GPTQ " + ",".join(sorted({u.kind for u in units})) + f" ({len(units)})")
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), _rss_mb()))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    quantmoe_main(["quantize", str(model_dir), "--plan", str(plan), "--stream", "--out", str(out),
                   "--calib-windows", str(args.calib_windows), "--calib-len", str(args.calib_len),
                   *shlex.split(args.quantize_args)])
    done.set()
    peaks: dict[str, int] = {}
    stack: list[str] = []
    ordered, i = sorted(events), 0
    for t, rss in samples:
        while i < len(ordered) and ordered[i][0] <= t:
            tag = ordered[i][1]
            i += 1
            if tag[0] == "+":
                stack.append(tag[1:])
            elif stack and stack[-1] == tag[1:]:
                stack.pop()
        where = stack[-1] if stack else "between steps"
        peaks[where] = max(peaks.get(where, 0), rss)
    print(f"highest RSS per step ({args.quantize_args or 'defaults'}):")
    for where, rss in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {rss:6d} MB  {where}")


if __name__ == "__main__":
    main()
