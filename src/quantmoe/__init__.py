"""quantmoe: structure-aware mixed-precision post-training quantization for MoE models."""

from quantmoe.version import __version__  # noqa: F401


def load(path, device="cpu", trust_remote_code=False, attn_implementation=None):
    """Load a quantized checkpoint written by ``quantmoe quantize`` (see quantmoe.quant.api.load)."""
    from quantmoe.quant.api import load as _load

    return _load(path, device=device, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
