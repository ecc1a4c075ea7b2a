"""Quantize linear weights with HQQ; run INSIDE the HQQ venv (see peer_envs.py).

HQQ is calibration-free: it needs only the weights. The bench writes every linear that
quantmoe's uniform plans quantize (attention and expert linears, one (out, in) float32
tensor per expert, keyed by quantmoe's per-expert module name) to --weights; this runner
quantizes each with HQQ's own quantizer (``hqq.core.quantize.Quantizer.quantize``, the
call HQQLinear makes: half-quadratic zero-point optimization, axis=1, i.e. groups of
consecutive input columns) and writes to --out:

    dequant.safetensors  every weight dequantized, (out, in) float32, same names
    result.json          timings, peak RSS, versions, settings

Groups match quantmoe's layout: ``group_size`` consecutive columns of one row, a last
narrower group when ``in_features`` is not a multiple (each part goes to HQQ with its own
group size, since HQQ's reshape needs a divisor). Scale and zero are stored as float16 by
HQQLinear (its default compute dtype): they are rounded to float16 here before
dequantizing, so the weights are those an HQQ model computes with.
Does not import quantmoe: the two venvs stay independent.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="safetensors of (out, in) weights to quantize")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def hqq_dequantized(W, bits: int, group_size: int, quantizer):
    """HQQ's quantize-dequantize of W (out, in), groups of ``group_size`` columns per row."""
    import torch

    out_f, in_f = W.shape
    full = (in_f // group_size) * group_size
    parts = []
    for lo, hi, size in ((0, full, group_size), (full, in_f, in_f - full)):
        if hi <= lo:
            continue
        W_q, meta = quantizer.quantize(W[:, lo:hi].contiguous(), nbits=bits, channel_wise=True, group_size=size,
                                       optimize=True, round_zero=False, axis=1, bitpack=False,
                                       compute_dtype=torch.float32, device="cpu")
        meta["scale"] = meta["scale"].to(torch.float16).to(torch.float32)  # as HQQLinear stores them
        meta["zero"] = meta["zero"].to(torch.float16).to(torch.float32)
        meta["compute_dtype"] = torch.float32
        parts.append(quantizer.dequantize(W_q, meta).reshape(out_f, hi - lo))
    return torch.cat(parts, dim=1).contiguous()


def main() -> int:
    args = _parse()
    import torch

    torch.set_num_threads(args.threads)
    import hqq
    from hqq.core.quantize import Quantizer
    from safetensors.torch import load_file, save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(args.weights)
    t0 = time.perf_counter()
    deq = {name: hqq_dequantized(w.float(), args.bits, args.group_size, Quantizer) for name, w in weights.items()}
    quant_seconds = time.perf_counter() - t0
    levels = max(int(torch.unique(d[:, : min(args.group_size, d.shape[1])][0]).numel()) for d in deq.values())
    save_file(deq, str(out / "dequant.safetensors"))
    result = {
        "tool": "hqq",
        "versions": {"hqq": getattr(hqq, "__version__", "0.2.8"), "torch": torch.__version__},
        "settings": {"bits": args.bits, "group_size": args.group_size, "axis": 1, "optimize": True,
                     "round_zero": False, "meta_dtype": "float16"},
        "quant_seconds": quant_seconds,
        "process_seconds": time.perf_counter() - T_START,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "quantized_modules": sorted(deq),
        "levels_first_group_max": levels,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"hqq {args.bits}-bit g{args.group_size}: {len(deq)} linears in {quant_seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
