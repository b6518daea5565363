"""mopeq: per-expert mixed-precision post-training quantization for Mixture-of-Experts models."""

__version__ = "0.1.0"
