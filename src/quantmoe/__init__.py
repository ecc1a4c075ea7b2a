"""quantmoe: structure-aware mixed-precision post-training quantization for MoE models."""

__version__ = "0.1.0"
