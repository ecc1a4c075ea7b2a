"""Quantize a model with quantmoe in its own process (peak RSS per tool), for bench_vs_gptqmodel.py.

Same interface and outputs as _gptqmodel_runner.py: reads the bench's calibration windows
(only to check that ``api.quantize`` draws the very same ones), writes to --out

    dequant.safetensors  every quantized linear's dequantized weight (out, in), float32,
                         keyed by quantmoe's unit names
    result.json          timings, peak RSS, settings, RTN fallbacks

With --stream the model is quantized as ``quantmoe quantize --stream --dtype float32`` does
(one block in memory, read from the model's safetensors, each finished block written to
--out/checkpoint), and the dequantized weights are written block by block from that checkpoint,
one ``dequant-<block>.safetensors`` per block, so that the export holds one block too.
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
    p.add_argument("--model", required=True, help="embedded model name or local folder")
    p.add_argument("--windows", required=True, help=".npy of calibration token ids, (n, seq_len)")
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration forward batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-expert-tokens", type=int, default=16)
    p.add_argument("--clip", default="none", help="grid range search: none, mse, hmse")
    p.add_argument("--act-order", default="none", help="GPTQ column order: none, desc, gar")
    p.add_argument("--refine", type=int, default=0, help="GPTQ refinement sweeps")
    p.add_argument("--stream", action="store_true", help="quantize block by block from disk (quantize --stream)")
    p.add_argument("--expert-batch-mb", type=float, default=None,
                   help="GPTQConfig.expert_batch_mb (default: quantmoe's own)")
    p.add_argument("--expert-cache-mb", type=float, default=None,
                   help="GPTQConfig.expert_cache_mb (default: quantmoe's own)")
    return p.parse_args()


def main() -> int:
    from quantmoe.allocator import bound_kernel_caches, tune_malloc

    tune_malloc()  # as the quantmoe command does (QUANTMOE_MALLOC=default turns it off)
    bound_kernel_caches()
    args = _parse()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from quantmoe import api
    from quantmoe.anatomy import describe
    from quantmoe.calib.data import CalibrationConfig, calibration_windows
    from quantmoe.data import split_tokens
    from quantmoe.models import load_model
    from quantmoe.quant.pipeline import GPTQConfig
    from quantmoe.quant.plan import Plan
    from quantmoe.quant.qlinear import QuantLinear

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    given = torch.from_numpy(np.load(args.windows))
    calib = CalibrationConfig(num_windows=given.shape[0], seq_len=given.shape[1], seed=args.seed,
                              batch_size=args.batch_size, min_expert_tokens=args.min_expert_tokens)
    plan = Plan.uniform(args.bits, group_size=args.group_size, symmetric=True, clip=args.clip)
    options = {k: v for k, v in (("expert_batch_mb", args.expert_batch_mb), ("expert_cache_mb", args.expert_cache_mb))
               if v is not None}
    gptq = GPTQConfig(method="gptq", damp=args.damp, act_order=args.act_order, refine=args.refine, **options)
    if args.stream:
        return streamed(args, out, given, calib, plan, gptq)
    t_load = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - t_load

    drawn = calibration_windows(split_tokens(calib.split, tokenizer), calib.num_windows, calib.seq_len, calib.seed)
    if not torch.equal(drawn, given):
        raise SystemExit(f"{args.windows}: not the windows api.quantize draws from {calib}")

    t_quant = time.perf_counter()
    result = api.quantize(model, tokenizer, plan, calib, gptq, progress=False)
    quant_seconds = time.perf_counter() - t_quant

    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for unit in describe(model).units:  # the model stays in the per-expert view after quantize
            module = model.get_submodule(unit.name)
            if isinstance(module, QuantLinear):
                weights[unit.name] = module.dequantize_weight().to(torch.float32).contiguous()
    save_file(weights, str(out / "dequant.safetensors"))

    report = result.report
    return _summary(out, load_seconds, quant_seconds, report.seconds, calib, sorted(weights), list(report.fallbacks),
                    str(next(model.parameters()).dtype).removeprefix("torch."))


def streamed(args: argparse.Namespace, out: Path, given, calib, plan, gptq) -> int:
    """``quantize --stream --dtype float32``, then the dequantized weights block by block from the checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from quantmoe import api
    from quantmoe.calib.data import calibration_windows
    from quantmoe.quant.lazy_quantized import LazyQuantized
    from quantmoe.quant.qlinear import QuantLinear
    from quantmoe.quant.stream import anatomy_of, quantize_stream

    t_quant = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = calibration_windows(api.calibration_tokens(calib.split, tokenizer), calib.num_windows, calib.seq_len,
                                  calib.seed)
    if not torch.equal(windows, given):
        raise SystemExit(f"{args.windows}: not the windows quantize --stream draws from {calib}")
    specs = plan.resolve(anatomy_of(args.model))
    result = quantize_stream(args.model, out / "checkpoint", specs, windows, calib, gptq, dtype=torch.float32,
                             tokenizer=tokenizer, progress=False, overwrite=True)
    quant_seconds = time.perf_counter() - t_quant

    lazy = LazyQuantized(result.out, verify=False)
    names = []
    with torch.no_grad():
        for i, block in enumerate(lazy.model.get_submodule(lazy.family.layers)):
            lazy.load_block(i)
            prefix = f"{lazy.family.layers}.{i}."
            weights = {prefix + name: m.dequantize_weight().to(torch.float32).contiguous()
                       for name, m in block.named_modules() if isinstance(m, QuantLinear)}
            save_file(weights, str(out / f"dequant-{i:05d}.safetensors"))
            names += weights
            del weights
            lazy.release_block(i)
    report = result.report
    return _summary(out, 0.0, quant_seconds, report["seconds"], calib, sorted(names), list(report["fallbacks"]),
                    "float32")


def _summary(out: Path, load_seconds: float, quant_seconds: float, report_seconds: float, calib, names: list[str],
             fallbacks: list[str], dtype: str) -> int:
    import torch

    summary = {
        "tool": "quantmoe",
        "load_seconds": load_seconds,
        "quant_seconds": quant_seconds,
        "report_seconds": report_seconds,
        "process_seconds": time.perf_counter() - T_START,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "calibration": {"windows": calib.num_windows, "seq_len": calib.seq_len, "batch_size": calib.batch_size,
                        "min_expert_tokens": calib.min_expert_tokens},
        "quantized_modules": names,
        "fallbacks": fallbacks,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=1))
    print(f"quantmoe: {len(names)} quantized linears, quantize {quant_seconds:.1f} s, "
          f"process {summary['process_seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
