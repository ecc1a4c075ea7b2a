"""Serve a GPTQ export with vLLM (and SGLang if installed) and compare with quantmoe.load.

Where CUDA and vLLM are present: loads the export in vLLM (greedy, float16, eager), runs greedy
generation on prompts cut from the test split and the prompt log-probabilities of test windows,
and prints, side by side with ``quantmoe.load`` of the same folder on the GPU (float16): the
share of greedy tokens that agree, and the max / mean |log-prob difference| of the prompt tokens.
SGLang, when importable, is checked on the greedy tokens. Where CUDA or vLLM is absent it exits 0
with one line saying what it would check. Sized for one GPU in well under 10 minutes
(embedded models, a few windows).

    .venv/bin/python benches/serve_check.py runs/mixtral-s-gptq [--quantization gptq] [--windows 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="a GPTQ folder written by `quantmoe export` (or `quantize --format gptq`)")
    p.add_argument("--quantization", default=None, help="vLLM's --quantization (gptq for non-Marlin plans)")
    p.add_argument("--split", default="test")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    return p.parse_args()


def main() -> int:
    args = _parse()
    import torch

    missing = [name for name, ok in (("CUDA", torch.cuda.is_available()),
                                     ("vllm", importlib.util.find_spec("vllm") is not None)) if not ok]
    if missing:
        print(f"serve_check: {' and '.join(missing)} not available; would serve {args.export} with vLLM (and SGLang "
              "if installed) and compare greedy tokens and prompt log-probs with quantmoe.load")
        return 0

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import quantmoe
    from quantmoe.data.corpora import load_tokens
    from quantmoe.eval.metrics import make_windows

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.export)
    windows = make_windows(load_tokens(args.split, tokenizer), args.seq_len, args.windows)  # (n, seq)
    prompts = [w[: args.seq_len // 2].tolist() for w in windows]
    ours = quantmoe.load(args.export, device="cuda").half()
    with torch.no_grad():
        logp = torch.log_softmax(ours(input_ids=windows.cuda()).logits.float(), dim=-1)
        ours_lp = logp[:, :-1].gather(-1, windows[:, 1:, None].cuda())[..., 0].cpu()  # (n, seq-1)
        ours_greedy = [ours.generate(torch.tensor([p], device="cuda"), max_new_tokens=args.new_tokens,
                                     do_sample=False)[0, len(p):].tolist() for p in prompts]

    llm = LLM(model=args.export, quantization=args.quantization, dtype="float16", enforce_eager=True,
              max_model_len=max(args.seq_len * 2, 256), gpu_memory_utilization=0.5)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    gen = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    vllm_greedy = [o.outputs[0].token_ids for o in gen]
    lp = llm.generate([{"prompt_token_ids": w.tolist()} for w in windows],
                      SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    vllm_lp = torch.tensor([[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in lp])

    def agree(a, b) -> float:
        pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
        return sum(x == y for x, y in pairs) / max(len(pairs), 1)

    diff = (vllm_lp - ours_lp).abs()
    print(f"vLLM vs quantmoe.load (float16, {len(prompts)} prompts): greedy tokens agree {100 * agree(vllm_greedy, ours_greedy):.1f}%, "
          f"prompt log-prob |diff| max {diff.max().item():.4f} mean {diff.mean().item():.5f}")
    if importlib.util.find_spec("sglang") is not None:
        del llm
        import sglang

        engine = sglang.Engine(model_path=args.export, dtype="float16")
        out = engine.generate(input_ids=prompts, sampling_params={"temperature": 0.0, "max_new_tokens": args.new_tokens})
        sgl = [o["output_ids"] if "output_ids" in o else tokenizer.encode(o["text"]) for o in out]
        print(f"SGLang vs quantmoe.load: greedy tokens agree {100 * agree(sgl, ours_greedy):.1f}%")
        engine.shutdown()
    print(f"serve_check: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
