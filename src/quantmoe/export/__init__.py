"""Serving export: the GPTQ checkpoint format that GPTQModel writes and vLLM, SGLang and
transformers read, with a per-module ``dynamic`` map for mixed precision (see docs/serving.md)."""
