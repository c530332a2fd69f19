"""lowrank-engine: SVD-based post-training compression of LLMs with fused kernels."""
import os

# OpenMP threads that spin-wait long (libgomp's default) turn LAPACK eigh 100-250x slower as soon
# as another process shares the cores, but never waiting (OMP_WAIT_POLICY=PASSIVE) makes each of
# LAPACK's many small parallel regions pay a wake-up: a 576² fp64 eigh took 0.13 s instead of 0.03 s
# on 2 idle cores. A short spin keeps both cases close to their best (measured, 2 cores, 576² eigh:
# 0.04 s idle, 0.12 s beside a busy process). Set before torch is first imported; a user's own
# OpenMP wait settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

__version__ = "0.1.0"
