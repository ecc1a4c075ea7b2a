"""quantmoe: structure-aware mixed-precision post-training quantization for MoE models."""

from quantmoe.version import __version__  # noqa: F401


def load(path, device="cpu", trust_remote_code=False, attn_implementation=None, dense=False, cache_codes=True):
    """Load a quantized checkpoint written by ``quantmoe quantize``, or a GPTQ-format folder
    (``quantmoe export``, GPTQModel); see quantmoe.api.load: packed weights
    (``cache_codes``: unpack each linear once, on first use), or ``dense=True``: dequantized once
    into a plain transformers model, as fast as the full-precision one."""
    from quantmoe.api import load as _load

    return _load(path, device=device, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
                 dense=dense, cache_codes=cache_codes)
