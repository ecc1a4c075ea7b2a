"""Which settings change GPTQ's output bits: thread count and CPU kernels (ISA).

Quantizes mixtral-s (uniform 4-bit GPTQ, 16 calibration windows) and prints one JSON line:
torch threads, torch's CPU capability, the sha256 of the quantized model's tensors, and
perplexity / KL on the first 8 test windows. Run it under different settings and compare:

    for t in 1 2; do for isa in avx512 avx2 default; do
      ATEN_CPU_CAPABILITY=$isa OMP_NUM_THREADS=$t python benches/determinism.py --threads $t
    done; done

The same settings twice give the same line; the README's "What is deterministic where"
table came from this script.
"""

from __future__ import annotations

import argparse
import json

import torch

from quantmoe import api
from quantmoe.calib.data import CalibrationConfig
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs
from quantmoe.models import load_model
from quantmoe.quant.plan import Plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="mixtral-s")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    windows = make_windows(api.calibration_tokens("test", tokenizer), 256, 8)
    ref = reference_logprobs(model, windows)
    result = api.quantize(model, tokenizer, Plan.uniform(4), CalibrationConfig(num_windows=16), progress=False)
    q = evaluate(result.model, windows, ref)
    print(json.dumps({"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "weights_sha256": api.model_fingerprint(result.model)[:12], "ppl": round(q.ppl, 4),
                      "kl": round(q.kl_mean, 6)}))


if __name__ == "__main__":
    main()
