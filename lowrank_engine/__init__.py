"""lowrank-engine: SVD-based post-training compression of LLMs with fused kernels."""
import os

# OpenMP threads that spin-wait turn LAPACK eigh/SVD 50-100x slower as soon as another process
# shares the cores; passive waiting costs nothing measurable otherwise. Effective only when set
# before torch is first imported, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
