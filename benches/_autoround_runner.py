"""Quantize a model folder with AutoRound; run INSIDE the AutoRound venv (see peer_envs.py).

Reads the calibration windows the bench wrote (int64 .npy, (n, seq_len)), tunes with AutoRound
on the CPU (uniform W{bits}A16 sym, or AutoScheme's mixed bits at --target-bits), and writes
to --out:

    dequant.safetensors  every quantized linear's dequantized weight (out, in), float32, keyed
                         by AutoRound's module name (per-expert names once it unfuses experts)
    result.json          timings, peak RSS, versions, settings, bits_per_module (AutoScheme)
    calibration_texts.json  AutoScheme only: the windows decoded (it accepts no token ids)
    error.txt            on failure: the exception, one line (the bench prints it)

Does not import quantmoe: the two venvs stay independent.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from pathlib import Path

T_START = time.perf_counter()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model folder (save_pretrained)")
    p.add_argument("--windows", required=True, help=".npy of calibration token ids, (n, seq_len)")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--target-bits", type=float, default=None, help="AutoScheme: average bits over W2/W3/W4/W8")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def qdq_weights(model) -> tuple[dict, dict]:
    """{name: (out, in) float32 weight} and {name: bits} of every linear AutoRound quantized.

    After ``quantize()`` (no export) AutoRound leaves each tuned linear as a plain linear whose
    weight is its quantize-dequantize result, with the chosen ``bits`` set on the module."""
    import torch

    weights, bits = {}, {}
    for name, module in model.named_modules():
        b = getattr(module, "bits", None)
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or b is None or int(b) >= 16:
            continue
        weights[name] = w.detach().to(torch.float32).contiguous()
        bits[name] = int(b)
    return weights, bits


def main() -> int:
    args = _parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "error.txt").unlink(missing_ok=True)
    try:
        return _run(args, out)
    except Exception as err:  # noqa: BLE001 - the bench prints why and goes on
        (out / "error.txt").write_text(f"{type(err).__name__}: {err}".splitlines()[0][:500] + "\n")
        traceback.print_exc()
        return 1


def _run(args: argparse.Namespace, out: Path) -> int:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import auto_round
    import transformers
    from auto_round import AutoRound, AutoScheme
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = np.load(args.windows)[: args.nsamples]  # (n, seq_len) int64
    dataset = [torch.from_numpy(row).long()[None] for row in windows]
    tok = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    load_seconds = time.perf_counter() - t_load
    scheme = f"W{args.bits}A16"
    if args.target_bits is not None:
        # AutoScheme takes only a dataset *name* (a string: its scoring builds its own dataloader);
        # a local JSON file of texts is one, so the same windows go in as decoded text.
        texts = out / "calibration_texts.json"
        texts.write_text(json.dumps([tok.decode(row.tolist()) for row in windows]))
        dataset = str(texts.resolve())
        scheme = AutoScheme(avg_bits=args.target_bits, options=("W2A16", "W3A16", "W4A16", "W8A16"),
                            nsamples=min(args.nsamples, 8), seqlen=windows.shape[1], device_map="cpu")
    ar = AutoRound(model, tok, scheme=scheme, group_size=args.group_size, sym=True, dataset=dataset,
                   iters=args.iters, nsamples=len(windows), seqlen=windows.shape[1], batch_size=args.batch_size,
                   device_map="cpu", enable_torch_compile=False)
    t_quant = time.perf_counter()
    qmodel, layer_config = ar.quantize()
    quant_seconds = time.perf_counter() - t_quant
    weights, bits = qdq_weights(qmodel)
    if not weights:
        raise RuntimeError("AutoRound left no quantized linear (no module with bits < 16 and a 2-D weight)")
    save_file(weights, str(out / "dequant.safetensors"))
    result = {
        "tool": "autoscheme" if args.target_bits is not None else "autoround",
        "versions": {"auto_round": auto_round.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "settings": {"scheme": str(scheme) if args.target_bits is None else f"AutoScheme avg {args.target_bits}",
                     "group_size": args.group_size, "sym": True, "iters": args.iters, "nsamples": len(windows),
                     "seqlen": int(windows.shape[1])},
        "load_seconds": load_seconds,
        "quant_seconds": quant_seconds,
        "process_seconds": time.perf_counter() - T_START,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "quantized_modules": sorted(weights),
        "group_size": args.group_size,
        "bits_per_module": bits if args.target_bits is not None else None,
        "layer_config": {k: {kk: str(vv) for kk, vv in v.items()} if isinstance(v, dict) else str(v)
                         for k, v in (layer_config or {}).items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"autoround {result['settings']['scheme']}: {len(weights)} linears, quantize() {quant_seconds:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
