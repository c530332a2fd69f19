"""lowrank-engine: SVD-based post-training compression of LLMs with fused kernels."""

__version__ = "0.1.0"
