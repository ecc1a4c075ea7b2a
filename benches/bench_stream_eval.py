"""Streaming evaluation against whole-model evaluation: time, peak RSS, equal perplexity.

Uses ``bench_scale.py``'s random-weight Qwen3-MoE checkpoint (bf16 on disk, one shard per
block; written once per size and kept) and runs, each in its own subprocess so that peak RSS
is the process's own:

- baseline: the interpreter with torch, transformers and quantmoe imported (no model);
- whole: ``quantmoe eval MODEL`` (the whole model loaded in float32, then evaluated);
- stream: ``quantmoe eval MODEL --stream`` (one block in float32 at a time; hidden states of
  every window in float32 on the host between blocks);
- with ``--bf16``, also ``--stream --dtype bfloat16`` (the checkpoint's own dtype: not
  expected to equal the float32 figures).

Prints wall time, peak RSS, perplexity of each, and the floor of the streamed run from the
shapes: largest block + hidden states of every window + one batch's float32 logits and
log-probs. Run:

    .venv/bin/python benches/bench_stream_eval.py --layers 16 --windows 16
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import ROOT, generate, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="also stream in the checkpoint's bfloat16")
    ap.add_argument("--dir", type=Path, default=ROOT / ".cache" / "bench" / "scale")
    args = ap.parse_args()
    model_dir = args.dir / f"qwen3moe-h{args.hidden}-l{args.layers}-e{args.experts}-i{args.moe_intermediate}"
    size = generate(model_dir, args)
    print(f"model: {model_dir} ({size / 2**30:.2f} GiB bf16 on disk, {2 * size / 2**30:.2f} GiB in float32)")

    from transformers import AutoConfig

    from quantmoe.quant.lazy import build_skeleton

    config = AutoConfig.from_pretrained(model_dir)
    skeleton = build_skeleton(config, torch.float32)
    block = max(sum(p.numel() for p in b.parameters()) for b in skeleton.model.layers) * 4
    hidden = args.windows * args.seq_len * config.hidden_size * 4
    logits = 2 * min(args.batch_size, args.windows) * args.seq_len * config.vocab_size * 4
    floor = block + hidden + logits

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads),
           "QUANTMOE_CACHE": str(args.dir / "cache")}
    py = sys.executable
    base_s, base_rss, _ = run([py, "-c", "import torch, transformers, quantmoe.eval.stream, quantmoe.cli"], env)
    common = [py, "-m", "quantmoe.cli", "eval", str(model_dir), "--max-windows", str(args.windows), "--seq-len",
              str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device]
    rows = [("baseline (imports only)", base_s, base_rss, None)]
    runs = [("whole model, float32", []), ("stream, float32", ["--stream"])]
    if args.bf16:
        runs.append(("stream, bfloat16", ["--stream", "--dtype", "bfloat16"]))
    for name, extra in runs:
        s, rss, out = run(common + extra, env)
        match = re.search(r"perplexity ([0-9.]+) over ([0-9,]+) predicted tokens", out)
        if match is None:
            raise SystemExit(f"{name}: no perplexity in its output:\n{out}")
        rows.append((name, s, rss, float(match.group(1))))
    mb = 2**20
    print(f"{args.windows} windows x {args.seq_len} tokens, batch {args.batch_size}, threads {args.threads}, "
          f"device {args.device}")
    print(f"stream floor = largest block {block / mb:.0f} MB + hidden states {hidden / mb:.0f} MB + one batch's "
          f"logits and log-probs {logits / mb:.0f} MB = {floor / mb:.0f} MB")
    print(f"{'run':28s} {'wall s':>8s} {'peak RSS MB':>12s} {'(peak-base) MB':>15s} {'perplexity':>11s}")
    for name, s, rss, ppl in rows:
        print(f"{name:28s} {s:8.1f} {rss:12.0f} {rss - base_rss:15.0f} {'' if ppl is None else f'{ppl:11.3f}'}")
    whole, stream = rows[1][3], rows[2][3]
    print(f"perplexity whole {whole:.3f} vs stream {stream:.3f}: {'equal' if whole == stream else 'DIFFERENT'} "
          "(as printed, 3 decimals)")


if __name__ == "__main__":
    main()
