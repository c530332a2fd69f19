"""Entry points to the Triton kernels of the top-level ``kernels/`` folder (installed as
``lowrank_engine.kernels``). Reached only through lowrank_engine.ops.

``kernels/`` has no ``__init__.py`` on purpose: as a namespace package it never shadows an
installed distribution named ``kernels`` (Hugging Face's hub kernels, which transformers imports)
when Python runs from the repository root, where a regular package would win.

Importing this module never imports Triton: the kernel modules (``covariance``,
``lowrank_linear``) are imported on first use. Triton decides at decoration time whether a
kernel is compiled or interpreted, so ``TRITON_INTERPRET=1`` must be set before the first call.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

__all__ = ["triton_available", "covariance_accumulate", "lowrank_forward", "lowrank_forward_grouped"]


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


KERNEL_PACKAGE = "lowrank_engine.kernels"


def _kernel_module(name: str):
    return importlib.import_module(f"{KERNEL_PACKAGE}.{name}")


def triton_available() -> bool:
    """True when Triton imports and its kernels can run: a CUDA GPU, or TRITON_INTERPRET=1."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
    except (ImportError, ValueError):
        return False
    # Kernels already built reflect the interpreter setting at their import time.
    mod = sys.modules.get(f"{KERNEL_PACKAGE}.lowrank_linear") or sys.modules.get(f"{KERNEL_PACKAGE}.covariance")
    interpreting = getattr(mod, "INTERPRET", None) if mod is not None else None
    if interpreting is None:
        interpreting = _interpret_requested()
    if interpreting:
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken install means "not available"
            return False
        return True
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def covariance_accumulate(A, B, C, X, Xp, weight) -> None:
    """In place fp32: A += Xᵀ diag(w) X; if B is not None also B += X'ᵀ diag(w) X', C += Xᵀ diag(w) X'."""
    _kernel_module("covariance").covariance_accumulate(A, B, C, X, Xp, weight)


def lowrank_forward(x, V, U, bias):
    """y = (x V) Uᵀ + bias, x [..., n], V (n×k), U (m×k); output dtype x.dtype."""
    return _kernel_module("lowrank_linear").lowrank_linear(x, V, U, bias)


def lowrank_forward_grouped(x, V_cat, Us, biases):
    """One shared shrink x V_cat, then y_i = t[:, off_i:off_i+k_i] U_iᵀ + b_i per output."""
    return _kernel_module("lowrank_linear").lowrank_linear_grouped(x, V_cat, Us, biases)
