"""The main job on the embedded models (``make demo``).

For each embedded model: its anatomy, full-precision perplexity on the test split, then
uniform RTN and GPTQ at 4 and 2 bits with perplexity and KL to full precision. One GPTQ
checkpoint is saved and reloaded to show the round trip.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from quantmoe.anatomy import describe, format_anatomy
from quantmoe.calib.data import CalibrationConfig
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.quant import api
from quantmoe.quant.pipeline import GPTQConfig
from quantmoe.quant.plan import Plan
from quantmoe.zoo.embedded import EMBEDDED_MODELS, load_model, split_tokens

log = logging.getLogger(__name__)

DEMO_BITS = (4, 2)
DEMO_METHODS = ("rtn", "gptq")
EVAL_WINDOWS = 96  # of 256 tokens from the test split: the demo stays a few minutes on 2 cores


def run_demo(threads: int | None = None, out_dir: Path = Path("runs/demo")) -> int:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    calib = CalibrationConfig()
    rows = []
    for name in EMBEDDED_MODELS:
        fp, tokenizer = load_model(name)
        print(f"\n=== {name} ===\n{format_anatomy(describe(fp))}", flush=True)
        windows = make_windows(split_tokens("test", tokenizer), 256, max_windows=EVAL_WINDOWS)
        ref = reference_logprobs(fp, windows)
        base = evaluate(fp, windows, ref)
        rows.append((name, "full precision", 16.0, base, 0.0))
        for bits in DEMO_BITS:
            plan = Plan.uniform(bits, group_size=128)
            for method in DEMO_METHODS:
                model = copy.deepcopy(fp)
                gptq = GPTQConfig(method=method)
                result = api.quantize(model, tokenizer, plan, calib, gptq, progress=True)
                res = evaluate(model, windows, ref)
                rows.append((name, f"{method} {bits}-bit g128", result.bits.average_bits, res,
                             result.report.seconds))
                if method == "gptq" and bits == DEMO_BITS[0]:
                    path = api.save(result, out_dir / f"{name}-gptq{bits}", tokenizer, plan, calib, gptq, name)
                    reloaded = api.load(path)
                    with torch.no_grad():
                        same = torch.equal(model(input_ids=windows[:2]).logits, reloaded(input_ids=windows[:2]).logits)
                    print(f"saved {path}; reloaded logits identical: {same}", flush=True)
    print(f"\nUniform quantization of the embedded models (first {EVAL_WINDOWS} test windows of 256 tokens;"
          " KL = mean per-token KL(full precision || quantized))")
    print(f"{'model':<11} {'quantization':<18} {'bits':>5} {'ppl':>8} {'ppl change':>10} {'KL':>8} "
          f"{'top-1':>6} {'time s':>7}")
    for name, label, bits, res, secs in rows:
        base_ppl = next(r[3].ppl for r in rows if r[0] == name and r[1] == "full precision")
        kl = f"{res.kl_mean:.4f}"
        print(f"{name:<11} {label:<18} {bits:>5.2f} {res.ppl:>8.2f} {100 * (res.ppl / base_ppl - 1):>+9.1f}% "
              f"{kl:>8} {100 * res.top1_agreement:>5.1f}% {secs:>7.1f}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0
