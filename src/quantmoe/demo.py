"""The main job on the embedded models (``make demo``)."""

from __future__ import annotations

import logging
import time

import torch

from quantmoe.anatomy import describe, format_anatomy
from quantmoe.eval.metrics import evaluate, make_windows
from quantmoe.zoo.embedded import EMBEDDED_MODELS, load_model, split_tokens

log = logging.getLogger(__name__)


def run_demo(threads: int | None = None) -> int:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rows = []
    for name in EMBEDDED_MODELS:
        model, tokenizer = load_model(name)
        anatomy = describe(model)
        print(f"\n=== {name} ===\n{format_anatomy(anatomy)}")
        windows = make_windows(split_tokens("test", tokenizer), 256)
        res = evaluate(model, windows, progress=True)
        rows.append((name, anatomy.total_params, res.ppl, res.tokens))
    print("\nFull-precision perplexity on the embedded test split (windows of 256 tokens)")
    print(f"{'model':<12} {'params':>10} {'ppl':>8} {'tokens':>8}")
    for name, params, ppl, tokens in rows:
        print(f"{name:<12} {params:>10,} {ppl:>8.2f} {tokens:>8,}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0
