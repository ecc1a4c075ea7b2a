"""Quantize a model folder with GPTQModel; run INSIDE the GPTQModel venv (see gptqmodel_env.py).

Reads the calibration windows the bench wrote (int64 .npy, (n, seq_len)), quantizes on the
CPU with GPTQ settings matching quantmoe's, and writes to --out:

    dequant.safetensors  every quantized linear's dequantized weight (out, in), float32,
                         keyed by GPTQModel's module name (per-expert names after defuser)
    result.json          timings, peak RSS, versions, the effective config, GPTQModel's
                         per-module quantization log

so that the bench can evaluate the result without importing gptqmodel.
Does not import quantmoe: the two venvs stay independent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model folder (save_pretrained)")
    p.add_argument("--windows", required=True, help=".npy of calibration token ids, (n, seq_len)")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=8, help="calibration forward batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--act-group-aware", action="store_true",
                   help="keep GPTQModel's default GAR reordering (off: plain GPTQ, as quantmoe)")
    p.add_argument("--fallback-tokens", type=int, default=16,
                   help="RTN fallback below this many routed tokens (quantmoe's min_expert_tokens); "
                        "-1 keeps GPTQModel's default (0.5%% of calibration tokens)")
    p.add_argument("--verify-reload", action="store_true",
                   help="also save the checkpoint, reload it with GPTQModel.load and check that its "
                        "dequantized weights equal the in-memory ones (slow; a one-off check of the export)")
    p.add_argument("--offload-to-disk", action="store_true",
                   help="GPTQModel's default: offload finished layers to a temp dir (slower; saves RAM). "
                        "Off here, so both tools keep the model in memory")
    return p.parse_args()


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def dequantized_weights(model, quant_linear_cls, to_v2) -> dict:
    """{module name: dequantized (out, in) float32 weight} of every GPTQModel quantized linear.

    Right after quantize() the packed modules hold GPTQ v1 zero points (stored minus one);
    the loader converts them to v2 before use, so do the same (GPTQModel's own function)
    before dequantizing, or every weight comes out one quantization step off.
    """
    import torch

    weights = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, quant_linear_cls):
                continue
            module.eval()
            if getattr(module, "REQUIRES_FORMAT_V2", False) and module.qzero_format() == 1:
                to_v2(module, bits=module.bits, pack_dtype=module.pack_dtype)
            w = module.dequantize_weight()  # GPTQ layout: (in, out)
            if tuple(w.shape) != (module.in_features, module.out_features):
                raise ValueError(f"{name}: dequantized weight {tuple(w.shape)}, expected (in, out) = "
                                 f"{(module.in_features, module.out_features)}")
            weights[name] = w.T.to(torch.float32).contiguous()
    return weights


def main() -> int:
    args = _parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # its model loader asks for a pool of 2 CPU workers and refuses to start with fewer (--threads 1);
    # torch's own threads stay at --threads
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, args.threads)))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import gptqmodel
    import transformers
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.quantization.config import Fallback, GPTQConfig
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    windows = np.load(args.windows)  # (n, seq_len) int64
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in windows]

    fallback = Fallback() if args.fallback_tokens < 0 else Fallback(threshold=args.fallback_tokens)
    config = GPTQConfig(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False,
                        act_group_aware=args.act_group_aware, damp_percent=args.damp, device="cpu",
                        fallback=fallback, offload_to_disk=args.offload_to_disk)
    dtype = getattr(torch, args.dtype)

    t_load = time.perf_counter()
    model = GPTQModel.load(args.model, config, dtype=dtype, trust_remote_code=False)
    load_seconds = time.perf_counter() - t_load

    t_quant = time.perf_counter()
    quant_log = model.quantize(calibration, batch_size=args.batch_size, calibration_sort=None,
                               backend=BACKEND.TORCH)
    quant_seconds = time.perf_counter() - t_quant

    # With offload_to_disk the quantized layers end up on disk (meta in memory): export through a
    # saved checkpoint then. --verify-reload checks both routes give the same weights.
    ckpt = out / "checkpoint"
    t_export = time.perf_counter()
    if args.offload_to_disk or args.verify_reload:
        model.save(str(ckpt))  # before the in-memory v1 -> v2 conversion below
    if args.offload_to_disk:
        source = GPTQModel.load(str(ckpt), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model
    else:
        source = model.model
    weights = dequantized_weights(source, BaseQuantLinear, convert_gptq_v1_to_v2_format_module)
    classes = sorted({type(m).__name__ for m in source.modules() if isinstance(m, BaseQuantLinear)})
    save_file(weights, str(out / "dequant.safetensors"))
    export_seconds = time.perf_counter() - t_export
    reload_check = None
    if args.verify_reload and not args.offload_to_disk:
        reloaded = GPTQModel.load(str(ckpt), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        again = dequantized_weights(reloaded.model, BaseQuantLinear, convert_gptq_v1_to_v2_format_module)
        same = set(again) == set(weights)
        worst = max(((again[n] - w).abs().max() / w.abs().max()).item() for n, w in weights.items()) if same \
            else float("inf")
        reload_check = {"same_modules": same, "max_rel_diff": worst, "reload_dtype": "float16"}
        print(f"reload check: {reload_check}", file=sys.stderr)

    result = {
        "tool": "gptqmodel",
        "versions": {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "load_seconds": load_seconds,
        "quant_seconds": quant_seconds,
        "export_seconds": export_seconds,
        "reload_check": reload_check,
        "process_seconds": time.perf_counter() - T_START,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "config": _json_safe({k: getattr(config, k, None) for k in (
            "bits", "group_size", "sym", "desc_act", "act_group_aware", "damp_percent", "damp_auto_increment",
            "mse", "true_sequential", "lm_head", "fallback", "moe")}),
        "calibration": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                        "batch_size": args.batch_size},
        "quantized_modules": sorted(weights),
        "module_classes": classes,
        "quant_log": _json_safe(quant_log),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"gptqmodel: {len(weights)} quantized linears, quantize() {quant_seconds:.1f} s, "
          f"process {result['process_seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
