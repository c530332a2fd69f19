"""The one door to the kernels and the C++ extension.

Every op is a ``torch.library`` custom op in the ``lowrank_engine`` namespace with a
registered fake (meta) implementation, so it traces under ``torch.compile(fullgraph=True)``.
Each op has a pure-PyTorch reference here, used wherever Triton, a GPU or the extension
is absent.

Backends (``LOWRANK_ENGINE_BACKEND``, or ``set_backend``):
- ``auto`` (default): on CUDA tensors, the Triton kernels (covariance, low-rank linear) and the
  extension's CUDA whitening only once ``GPU_PATHS_VERIFIED`` is True; until then the PyTorch
  reference. On CPU tensors, the reference for covariance / low-rank linear and the extension's CPU
  whitening when it is built (``LOWRANK_ENGINE_NO_EXT=1`` turns the extension off).
- ``accelerated``: the opt-in: on CUDA tensors the Triton kernels and the extension's CUDA whitening,
  an error when either is missing (``auto`` falls back to the reference); CPU tensors as ``auto``.
- ``triton``: the Triton kernels on every tensor, CPU ones through ``TRITON_INTERPRET=1`` (the tests);
  whitening as ``auto``.
- ``reference``: the PyTorch reference for covariance / low-rank linear and for CUDA whitening; CPU
  whitening as ``auto``.
The schemas of ``lowrank_engine::whiten`` / ``whiten_ex`` are defined here, once; the extension
(``lowrank_engine._C``, loaded with ``torch.ops.load_library`` after they are defined) registers
only its kernels, and where it registered none the reference serves the op. ``active_paths()`` says what runs, and why.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
from typing import Optional, Sequence

import torch

logger = logging.getLogger("lowrank_engine")

NAMESPACE = "lowrank_engine"
_BACKENDS = ("auto", "accelerated", "triton", "reference")
_backend = os.environ.get("LOWRANK_ENGINE_BACKEND", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"LOWRANK_ENGINE_BACKEND must be one of {_BACKENDS}, got {_backend!r}")

# Whether the Triton kernels and the extension's CUDA whitening have passed the device suite
# (benchmarks/device_suite.py: every GPU test, every kernel against its float64 reference) on a GPU.
# Until they have, "auto" keeps CUDA tensors on the PyTorch reference. Flip it to True in the same
# change that commits the passing results under benchmarks/results/.
GPU_PATHS_VERIFIED = False


# --------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------
def set_backend(name: str) -> None:
    """Choose which paths the ops take: auto | accelerated | triton | reference (module docstring)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def backend(name: str):
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_kernels():
    """The Triton kernel entry points, or None when Triton is not importable."""
    try:
        from lowrank_engine import triton_kernels as kernels
    except Exception as exc:  # noqa: BLE001 - a broken triton install must not break the engine
        logger.debug("Triton kernels unavailable: %s", exc)
        return None
    return kernels if kernels.triton_available() else None


def _gpu_paths_wanted() -> bool:
    """Whether CUDA tensors take the Triton kernels and the extension's CUDA whitening."""
    return _backend == "accelerated" or (_backend == "auto" and GPU_PATHS_VERIFIED)


def _use_triton_on(device_type: str) -> bool:
    asked = _backend == "triton" or (_backend == "accelerated" and device_type == "cuda")
    if not (asked or (device_type == "cuda" and _gpu_paths_wanted())):
        return False
    if _triton_kernels() is None:
        if asked:
            raise RuntimeError(f"backend {_backend!r} runs the Triton kernels, but Triton cannot run here "
                               "(not installed, or no GPU and TRITON_INTERPRET unset)")
        return False  # auto: the reference wherever Triton cannot run
    return True


def _use_triton(t: torch.Tensor) -> bool:
    return _use_triton_on(t.device.type)


# --------------------------------------------------------------------------------------
# C++ extension
# --------------------------------------------------------------------------------------
# The one source of the whitening ops' schemas: defined here, before the extension is loaded; the
# extension registers only its CPU (and CUDA) kernels for them (csrc/whitening.cpp).
WHITEN_SCHEMA = "whiten(Tensor H, float eps_rel) -> (Tensor L, Tensor L_inv, Tensor eigenvalues, Tensor info)"
WHITEN_EX_SCHEMA = (
    "whiten_ex(Tensor H, float eps_rel) -> "
    "(Tensor L, Tensor L_inv, Tensor eigenvalues, Tensor clamped_eigenvalues, Tensor num_clamped, Tensor info)"
)
# info per matrix: 0 = solved in the input precision, 1 = solved after the fp64 retry.
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define(WHITEN_SCHEMA)
_lib.define(WHITEN_EX_SCHEMA)


def _load_extension() -> Optional[str]:
    """Load lowrank_engine._C if it was built; return its path or None."""
    if os.environ.get("LOWRANK_ENGINE_NO_EXT", "0") == "1":
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    for path in candidates:
        try:
            torch.ops.load_library(path)
            return path
        except (OSError, RuntimeError) as exc:
            logger.warning("could not load the C++ extension %s (%s); using the PyTorch fallback", path, exc)
    return None


EXTENSION_PATH = _load_extension()
logger.info("whitening: %s", f"C++ extension {EXTENSION_PATH}" if EXTENSION_PATH else "PyTorch fallback")


# read before the Python fallback registers its own CPU/CUDA kernels below
EXTENSION_HAS_CUDA = EXTENSION_PATH is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    f"{NAMESPACE}::whiten", "CUDA")


def extension_info() -> dict:
    """Whether the extension is loaded and has CUDA kernels, for `lowrank-engine info` and logs."""
    return {"loaded": EXTENSION_PATH is not None, "path": EXTENSION_PATH, "cuda": EXTENSION_HAS_CUDA}


def _extension_whitens_on(device_type: str) -> bool:
    """Whether ops.whiten / whiten_ex call the extension for tensors on this device."""
    if device_type != "cuda":
        return EXTENSION_PATH is not None  # the CPU path, tested on every CI run
    if not _gpu_paths_wanted():
        return False
    if not EXTENSION_HAS_CUDA:
        if _backend == "auto":
            return False  # the reference wherever the extension has no CUDA kernels
        raise RuntimeError(f"backend {_backend!r} runs the extension's CUDA whitening, but "
                           + ("the extension has no CUDA kernels (built without nvcc or a CUDA torch)"
                              if EXTENSION_PATH else "the C++ extension is not loaded"))
    return True


def active_paths() -> dict:
    """Which implementation each op family takes on CUDA and on CPU tensors, and why."""
    paths = {"backend": _backend, "gpu_paths_verified": GPU_PATHS_VERIFIED}
    for device_type in ("cuda", "cpu"):
        entry = {}
        for family, choose, fast in (("kernels", _use_triton_on, "Triton kernels"),
                                     ("whitening", _extension_whitens_on, "C++ extension")):
            try:
                entry[family] = fast if choose(device_type) else "PyTorch reference"
            except RuntimeError as exc:
                entry[family] = f"unavailable: {exc}"
        paths[device_type] = entry
    if _backend == "auto" and not GPU_PATHS_VERIFIED:
        paths["why"] = ("the Triton kernels and the extension's CUDA whitening have not passed the device suite "
                        "on a GPU yet; opt in with LOWRANK_ENGINE_BACKEND=accelerated")
    elif _backend == "auto":
        paths["why"] = "the device suite passed on a GPU (ops.GPU_PATHS_VERIFIED)"
    else:
        paths["why"] = "chosen through LOWRANK_ENGINE_BACKEND or ops.set_backend"
    return paths


# --------------------------------------------------------------------------------------
# whitening: H = Q Λ Qᵀ  ->  L = Q Λc^½,  L⁻¹ = Λc^-½ Qᵀ, with Λc = max(Λ, eps_rel·λ_max)
# --------------------------------------------------------------------------------------


def _check_whiten_input(H: torch.Tensor) -> None:
    if H.dim() != 3 or H.shape[-1] != H.shape[-2]:
        raise ValueError(f"whiten: expected H of shape [batch, n, n], got {tuple(H.shape)}")
    if H.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"whiten: H must be float32 or float64, got {H.dtype}")


def whiten_reference(H: torch.Tensor, eps_rel: float):
    """Pure-PyTorch whitening of a batch of symmetric PSD matrices (see WHITEN_EX_SCHEMA)."""
    _check_whiten_input(H)
    batch, n, _ = H.shape
    L = torch.empty_like(H)
    L_inv = torch.empty_like(H)
    evals_out = H.new_empty(batch, n)
    clamped_out = H.new_empty(batch, n)
    num_clamped = torch.zeros(batch, dtype=torch.int64, device=H.device)
    info = torch.zeros(batch, dtype=torch.int32, device=H.device)
    for i in range(batch):
        h = H[i]
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"whiten: matrix {i} contains NaN or Inf")
        if not bool((h != 0).any()):
            raise ValueError(f"whiten: matrix {i} is all zero (no calibration signal)")
        h = 0.5 * (h + h.mT)
        evals = evecs = None
        try:
            evals, evecs = torch.linalg.eigh(h)
            if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
                evals = None
        except RuntimeError:
            evals = None
        if evals is None:  # fp64 retry
            info[i] = 1
            evals, evecs = torch.linalg.eigh(h.double())
        floor = eps_rel * evals.max().clamp_min(0)
        if floor <= 0:
            raise ValueError(f"whiten: matrix {i} has no positive eigenvalue")
        clamped = evals.clamp_min(floor)
        num_clamped[i] = int((evals < floor).sum())
        root = clamped.sqrt()
        L[i] = (evecs * root).to(H.dtype)
        L_inv[i] = (evecs / root).mT.to(H.dtype)
        evals_out[i] = evals.to(H.dtype)
        clamped_out[i] = clamped.to(H.dtype)
    return L, L_inv, evals_out, clamped_out, num_clamped, info


def _whiten_fake(H, eps_rel):
    return (torch.empty_like(H), torch.empty_like(H), H.new_empty(H.shape[:-1]),
            H.new_empty(H.shape[:-2], dtype=torch.int32))


def _whiten_ex_fake(H, eps_rel):
    return (torch.empty_like(H), torch.empty_like(H), H.new_empty(H.shape[:-1]), H.new_empty(H.shape[:-1]),
            H.new_empty(H.shape[:-2], dtype=torch.int64), H.new_empty(H.shape[:-2], dtype=torch.int32))


def _whiten_impl(H, eps_rel):
    L, L_inv, evals, _, _, info = whiten_reference(H, eps_rel)
    return L, L_inv, evals, info


def _whiten_ex_impl(H, eps_rel):
    return whiten_reference(H, eps_rel)


# the reference wherever the extension registered no kernel (not built, or built without CUDA)
for _name, _impl in (("whiten", _whiten_impl), ("whiten_ex", _whiten_ex_impl)):
    for _key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{_name}", _key):
            _lib.impl(_name, _impl, _key)
torch.library.register_fake(f"{NAMESPACE}::whiten", _whiten_fake, lib=_lib)
torch.library.register_fake(f"{NAMESPACE}::whiten_ex", _whiten_ex_fake, lib=_lib)


def _whiten_call(name: str, H: torch.Tensor, eps_rel: float):
    batched = H.unsqueeze(0) if H.dim() == 2 else H
    if H.is_cuda and not _extension_whitens_on("cuda"):
        out = whiten_reference(batched, float(eps_rel))
        out = out if name == "whiten_ex" else (out[0], out[1], out[2], out[5])
    else:
        out = getattr(torch.ops.lowrank_engine, name)(batched, float(eps_rel))
    return tuple(t[0] for t in out) if H.dim() == 2 else out


def whiten(H: torch.Tensor, eps_rel: float = 1e-6):
    """Batched whitening: returns (L, L_inv, eigenvalues, info); accepts [n,n] or [b,n,n]."""
    return _whiten_call("whiten", H, eps_rel)


def whiten_ex(H: torch.Tensor, eps_rel: float = 1e-6):
    """Like whiten, plus the clamped eigenvalues and the count clamped per matrix."""
    return _whiten_call("whiten_ex", H, eps_rel)


# --------------------------------------------------------------------------------------
# covariance accumulation: A += XᵀX (+ B += X'ᵀX', C += XᵀX'), optional per-token weight
# --------------------------------------------------------------------------------------
def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _check_covariance_args(A, X, weight):
    if A.dtype != torch.float32 or A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"covariance: accumulators must be square float32, got {tuple(A.shape)} {A.dtype}")
    if X.shape[-1] != A.shape[0]:
        raise ValueError(f"covariance: X has {X.shape[-1]} features but the accumulator is {A.shape[0]}×{A.shape[0]}")
    if weight is not None and weight.numel() != _as_rows(X).shape[0]:
        raise ValueError(f"covariance: weight has {weight.numel()} entries for {_as_rows(X).shape[0]} tokens")


SYMMETRIC_PANELS = 4  # a symmetric statistic computes 4 block-rows of its upper triangle: 10/16 of the GEMM


def _accumulate_symmetric(acc: torch.Tensor, xw: torch.Tensor, x: torch.Tensor) -> None:
    """acc += xwᵀx for a symmetric result: the diagonal and upper blocks only, then mirrored
    block by block (no n×n temporary, which for a 28672² statistic would be 3 GiB)."""
    n, tokens = acc.shape[0], x.shape[0]
    if n < 512 or tokens < 256:  # small products: one GEMM is faster than the bookkeeping
        acc.addmm_(xw.T, x)
        return
    step = -(-n // SYMMETRIC_PANELS)
    for i in range(0, n, step):
        j = min(i + step, n)
        acc[i:j, i:].addmm_(xw[:, i:j].T, x[:, i:])
        acc[j:, i:j].copy_(acc[i:j, j:].T)


def covariance_reference(A, B, C, X, Xp, weight) -> None:
    """In-place fp32 accumulation; weight multiplies each token's outer product. A may be None
    in the two-stream form (methods that read only B and C skip its GEMM)."""
    x = _as_rows(X).float()
    xw = x if weight is None else x * weight.reshape(-1, 1).float()
    if A is not None:
        _accumulate_symmetric(A, xw, x)
    if B is not None:
        xp = _as_rows(Xp).float()
        xpw = xp if weight is None else xp * weight.reshape(-1, 1).float()
        _accumulate_symmetric(B, xpw, xp)
        C.addmm_(xw.T, xp)


@torch.library.custom_op(f"{NAMESPACE}::covariance_accumulate", mutates_args=("A",))
def _covariance_single_op(A: torch.Tensor, X: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    if _use_triton(X):
        _triton_kernels().covariance_accumulate(A, None, None, X, None, weight)
    else:
        covariance_reference(A, None, None, X, None, weight)


@_covariance_single_op.register_fake
def _(A, X, weight):
    return None


@torch.library.custom_op(f"{NAMESPACE}::covariance_accumulate_pair", mutates_args=("A", "B", "C"))
def _covariance_pair_op(A: Optional[torch.Tensor], B: torch.Tensor, C: torch.Tensor, X: torch.Tensor,
                        Xp: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    if _use_triton(X):  # the fused kernel always produces A; without one it lands in a scratch
        _triton_kernels().covariance_accumulate(torch.zeros_like(B) if A is None else A, B, C, X, Xp, weight)
    else:
        covariance_reference(A, B, C, X, Xp, weight)


@_covariance_pair_op.register_fake
def _(A, B, C, X, Xp, weight):
    return None


def covariance_accumulate(A: Optional[torch.Tensor], X: torch.Tensor, B: Optional[torch.Tensor] = None,
                          C: Optional[torch.Tensor] = None, Xp: Optional[torch.Tensor] = None,
                          weight: Optional[torch.Tensor] = None) -> None:
    """A += XᵀX; with Xp also B += X'ᵀX' and C += XᵀX'. X, Xp: [..., n]; weight: [...] or None.

    A padding mask is a 0/1 weight. In the two-stream form A may be None (only B and C wanted).
    """
    if A is None and (Xp is None or B is None or C is None):
        raise ValueError("covariance: A may be omitted only in the two-stream form (with Xp, B and C)")
    _check_covariance_args(A if A is not None else B, X, weight)
    if Xp is None:
        if B is not None or C is not None:
            raise ValueError("covariance: B and C need the second stream Xp")
        torch.ops.lowrank_engine.covariance_accumulate(A, X, weight)
        return
    if B is None or C is None:
        raise ValueError("covariance: the two-stream form needs both B and C")
    if Xp.shape != X.shape:
        raise ValueError(f"covariance: X {tuple(X.shape)} and Xp {tuple(Xp.shape)} differ in shape")
    reference = A if A is not None else B
    for name, acc in (("B", B), ("C", C)):
        if acc.shape != reference.shape or acc.dtype != torch.float32:
            raise ValueError(f"covariance: {name} must match A ({tuple(A.shape)}, float32)")
    torch.ops.lowrank_engine.covariance_accumulate_pair(A, B, C, X, Xp, weight)


def cross_covariance_accumulate(acc: torch.Tensor, Y: torch.Tensor, X: torch.Tensor) -> None:
    """acc += YᵀX (fp32) for Y [..., m] and X [..., n] over the same tokens: one GEMM, so no kernel of
    its own (the anchored target W·C = YᵀX' of a linear whose output Y is narrower than its input)."""
    if acc.dtype != torch.float32 or acc.shape != (Y.shape[-1], X.shape[-1]):
        raise ValueError(f"cross covariance: accumulator must be float32 {Y.shape[-1]}×{X.shape[-1]}, "
                         f"got {tuple(acc.shape)} {acc.dtype}")
    if _as_rows(Y).shape[0] != _as_rows(X).shape[0]:
        raise ValueError(f"cross covariance: Y {tuple(Y.shape)} and X {tuple(X.shape)} differ in tokens")
    acc.addmm_(_as_rows(Y).float().T, _as_rows(X).float())


# --------------------------------------------------------------------------------------
# low-rank linear: y = (x V) Uᵀ + bias, and the grouped form sharing one shrink
# --------------------------------------------------------------------------------------
def lowrank_linear_reference(x, V, U, bias):
    y = torch.matmul(torch.matmul(x, V), U.T)
    return y if bias is None else y + bias


def lowrank_linear_grouped_reference(x, V_cat, Us, biases):
    t = torch.matmul(x, V_cat)
    outs, start = [], 0
    for U, b in zip(Us, biases):
        k = U.shape[1]
        y = torch.matmul(t[..., start:start + k], U.T)
        outs.append(y if b is None else y + b)
        start += k
    return outs


@torch.library.custom_op(f"{NAMESPACE}::lowrank_linear", mutates_args=())
def _lowrank_linear_op(x: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _use_triton(x):
        return _triton_kernels().lowrank_forward(x, V, U, bias)
    return lowrank_linear_reference(x, V, U, bias)


@_lowrank_linear_op.register_fake
def _(x, V, U, bias):
    return x.new_empty(*x.shape[:-1], U.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::lowrank_linear_grouped", mutates_args=())
def _lowrank_linear_grouped_op(x: torch.Tensor, V_cat: torch.Tensor, Us: list[torch.Tensor],
                               biases: list[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    if _use_triton(x):
        return list(_triton_kernels().lowrank_forward_grouped(x, V_cat, Us, biases))
    return lowrank_linear_grouped_reference(x, V_cat, Us, biases)


@_lowrank_linear_grouped_op.register_fake
def _(x, V_cat, Us, biases):
    return [x.new_empty(*x.shape[:-1], U.shape[0]) for U in Us]


def _check_lowrank_args(x, V, U, bias):
    if V.dim() != 2 or U.dim() != 2:
        raise ValueError("lowrank_linear: V and U must be 2-D")
    if x.shape[-1] != V.shape[0]:
        raise ValueError(f"lowrank_linear: x has {x.shape[-1]} features, V is {tuple(V.shape)}")
    if bias is not None and bias.shape != (U.shape[0],):
        raise ValueError(f"lowrank_linear: bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}")


def lowrank_linear(x: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (x V) Uᵀ + bias with x [..., n], V (n×k), U (m×k)."""
    _check_lowrank_args(x, V, U, bias)
    if V.shape[1] != U.shape[1]:
        raise ValueError(f"lowrank_linear: V is {tuple(V.shape)} but U is {tuple(U.shape)}")
    return torch.ops.lowrank_engine.lowrank_linear(x, V, U, bias)


def lowrank_linear_grouped(x: torch.Tensor, V_cat: torch.Tensor, Us: Sequence[torch.Tensor],
                           biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """One shared shrink t = x V_cat, then y_i = t[:, slice_i] U_iᵀ + b_i (q/k/v, gate/up)."""
    biases = list(biases) if biases is not None else [None] * len(Us)
    if len(biases) != len(Us):
        raise ValueError("lowrank_linear_grouped: one bias (or None) per U")
    if sum(U.shape[1] for U in Us) != V_cat.shape[1]:
        raise ValueError("lowrank_linear_grouped: the ranks of Us must add up to V_cat's columns")
    for U, b in zip(Us, biases):
        _check_lowrank_args(x, V_cat, U, b)
    return torch.ops.lowrank_engine.lowrank_linear_grouped(x, V_cat, list(Us), biases)


# autograd for the low-rank linear (block refinement trains the factors through the op)
def _lowrank_setup_context(ctx, inputs, output):
    x, V, U, bias = inputs
    ctx.save_for_backward(x, V, U)
    ctx.has_bias = bias is not None


def _lowrank_backward(ctx, grad):
    x, V, U = ctx.saved_tensors
    need_x, need_V, need_U, need_bias = ctx.needs_input_grad
    g_u = torch.matmul(grad, U)  # [..., k]
    grad_x = torch.matmul(g_u, V.T) if need_x else None
    grad_V = _as_rows(x).T @ _as_rows(g_u) if need_V else None
    grad_U = _as_rows(grad).T @ _as_rows(torch.matmul(x, V)) if need_U else None
    grad_bias = _as_rows(grad).sum(0) if ctx.has_bias and need_bias else None
    return grad_x, grad_V, grad_U, grad_bias


torch.library.register_autograd(f"{NAMESPACE}::lowrank_linear", _lowrank_backward, setup_context=_lowrank_setup_context)
