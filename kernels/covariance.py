"""Covariance accumulation: A += Xᵀ diag(w) X, and for two streams B += X'ᵀ diag(w) X', C += Xᵀ diag(w) X'.

Design
------
* One program owns one output tile pair and loops over all N rows (or over one contiguous
  row range when split-N is on, see below), so the result is deterministic: no float atomics,
  a fixed summation order for a given shape and config.
* Symmetric tiles: the grid is (tiles, tiles) and programs with ``j < i`` exit at once. Program
  (i, j), i <= j, computes A_ij (and B_ij) once and writes it to tile (i, j) and its transpose to
  tile (j, i). C = XᵀX' is not symmetric, but C_ij = X_iᵀ X'_j and C_ji = X_jᵀ X'_i need exactly the
  four column panels (X_i, X_j, X'_i, X'_j) this program already loaded, so it computes both:
  every panel is read once per pair of tiles and the A/B work is halved.
  Each element of an output matrix is written by exactly one program, so the read-add-write of the
  accumulators is race free. Diagonal tiles are computed in full (both triangles), so A is
  symmetric up to rounding inside diagonal tiles and exactly symmetric elsewhere.
* Weights: the per-row weight multiplies the i-side panel in fp32. With bf16/fp16 inputs on a GPU
  the weighted panel is rounded back to the input dtype for the tensor-core dot (exact for a 0/1
  padding mask; one extra input-precision rounding for real-valued weights). Accumulation is fp32.
* fp32 inputs use ``input_precision="ieee"`` (no TF32), matching torch's fp32 addmm.
* Split-N: when the output has too few tiles to fill the GPU but N is large, the rows are cut into
  S contiguous ranges; program (i, j, s) writes its tile into an fp32 partial buffer [S, n, n] and
  the partials are summed over S by ``torch.sum`` (a fixed-order reduction, no atomics) before the
  single add into the accumulator.
* Under ``TRITON_INTERPRET=1`` every operand is upcast to fp32 before ``tl.dot`` (bf16 dots are
  wrong in the Triton 3.9 interpreter) and autotuning has exactly one config.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(bt, br, warps, stages):
    return triton.Config({"BLOCK_T": bt, "BLOCK_R": br}, num_warps=warps, num_stages=stages)


if INTERPRET:
    _SINGLE_CONFIGS = [_cfg(32, 32, 4, 1)]
    _PAIR_CONFIGS = []
else:
    # Picked from ptxas register/spill reports for sm_90 (spills, where any, sit in the
    # accumulate epilogue, not in the row loop); the autotuner chooses among them.
    _SINGLE_CONFIGS = [_cfg(128, 32, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 4), _cfg(64, 64, 4, 4),
                       _cfg(64, 32, 4, 3)]
    # four fp32 accumulators: 64-wide tiles and 8 warps keep them in registers
    _PAIR_CONFIGS = [_cfg(64, 32, 8, 3), _cfg(64, 64, 8, 3), _cfg(64, 64, 8, 4), _cfg(64, 16, 8, 2),
                     _cfg(32, 64, 4, 3)]


def _prune(configs, named_args, **kwargs):
    pair = kwargs.get("PAIR", named_args.get("PAIR", False))
    wanted = _PAIR_CONFIGS if pair else _SINGLE_CONFIGS
    kept = [c for c in configs if any(c is w for w in wanted)]
    return kept or configs[:1]


@triton.autotune(
    configs=_SINGLE_CONFIGS + _PAIR_CONFIGS,
    key=["n", "PAIR", "HAS_W", "DOT_F32"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune},
    restore_value=["A", "B", "C"],
)
@triton.jit
def _covariance_kernel(
    X, XP, W, A, B, C,
    N, n, rows_per_split,
    stride_xr, stride_xc, stride_pr, stride_pc,
    stride_split,
    PAIR: tl.constexpr, HAS_W: tl.constexpr, DOT_F32: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_j < pid_i:
        return
    PREC: tl.constexpr = "ieee" if DOT_F32 else "tf32"

    ri = pid_i * BLOCK_T + tl.arange(0, BLOCK_T)
    rj = pid_j * BLOCK_T + tl.arange(0, BLOCK_T)
    mi = ri < n
    mj = rj < n
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)

    acc_a = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    if PAIR:
        acc_b = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        acc_c = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
        acc_ct = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)

    for r0 in range(row_start, row_end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mr = rr < row_end
        rr = rr.to(tl.int64)  # N·n can exceed 2³¹ (e.g. 262144 tokens × 14336 features)
        xi = tl.load(X + rr[:, None] * stride_xr + ri[None, :] * stride_xc, mask=mr[:, None] & mi[None, :], other=0.0)
        xj = tl.load(X + rr[:, None] * stride_xr + rj[None, :] * stride_xc, mask=mr[:, None] & mj[None, :], other=0.0)
        if DOT_F32:
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        if HAS_W:
            w = tl.load(W + rr, mask=mr, other=0.0).to(tl.float32)
            xi_w = (xi.to(tl.float32) * w[:, None]).to(xi.dtype)
        else:
            xi_w = xi
        acc_a = tl.dot(tl.trans(xi_w), xj, acc_a, input_precision=PREC)
        if PAIR:
            pi = tl.load(XP + rr[:, None] * stride_pr + ri[None, :] * stride_pc, mask=mr[:, None] & mi[None, :],
                         other=0.0)
            pj = tl.load(XP + rr[:, None] * stride_pr + rj[None, :] * stride_pc, mask=mr[:, None] & mj[None, :],
                         other=0.0)
            if DOT_F32:
                pi = pi.to(tl.float32)
                pj = pj.to(tl.float32)
            if HAS_W:
                pi_w = (pi.to(tl.float32) * w[:, None]).to(pi.dtype)
            else:
                pi_w = pi
            acc_b = tl.dot(tl.trans(pi_w), pj, acc_b, input_precision=PREC)
            acc_c = tl.dot(tl.trans(xi_w), pj, acc_c, input_precision=PREC)  # C_ij = X_iᵀ W X'_j
            if pid_i != pid_j:
                acc_ct = tl.dot(tl.trans(xj), pi_w, acc_ct, input_precision=PREC)  # C_ji = X_jᵀ W X'_i

    base = pid_s * stride_split
    m_ij = mi[:, None] & mj[None, :]
    off_ij = base + ri[:, None] * n + rj[None, :]
    off_ji = base + rj[None, :] * n + ri[:, None]  # element [a, b] of the tile goes to (rj[b], ri[a])
    _store_tile(A, off_ij, m_ij, acc_a, ACCUMULATE)
    if pid_i != pid_j:
        _store_tile(A, off_ji, m_ij, acc_a, ACCUMULATE)
    if PAIR:
        _store_tile(B, off_ij, m_ij, acc_b, ACCUMULATE)
        _store_tile(C, off_ij, m_ij, acc_c, ACCUMULATE)
        if pid_i != pid_j:
            _store_tile(B, off_ji, m_ij, acc_b, ACCUMULATE)
            # acc_ct[a, b] = C[rj[a], ri[b]]
            off_ct = base + rj[:, None] * n + ri[None, :]
            _store_tile(C, off_ct, mj[:, None] & mi[None, :], acc_ct, ACCUMULATE)


@triton.jit
def _store_tile(ptr, offs, mask, acc, ACCUMULATE: tl.constexpr):
    if ACCUMULATE:
        acc = acc + tl.load(ptr + offs, mask=mask, other=0.0)
    tl.store(ptr + offs, acc, mask=mask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _choose_splits(N: int, n: int, device: torch.device, pair: bool) -> int:
    """Split the rows when the (upper-triangle) tiles alone cannot fill the GPU."""
    if INTERPRET or device.type != "cuda":
        return 1
    tile = 64 if pair else 128
    nt = triton.cdiv(n, tile)
    tiles = nt * (nt + 1) // 2
    sms = _num_sms(device)
    if tiles >= sms or N < 4096:
        return 1
    splits = min(triton.cdiv(2 * sms, tiles), N // 2048, 32)
    # keep the partial buffers modest (S * n² * 4 bytes per statistic)
    max_by_mem = max(1, (256 << 20) // (4 * n * n * (3 if pair else 1)))
    return max(1, min(splits, max_by_mem))


def covariance_accumulate(A: torch.Tensor, B: Optional[torch.Tensor], C: Optional[torch.Tensor], X: torch.Tensor,
                          Xp: Optional[torch.Tensor], weight: Optional[torch.Tensor], *,
                          splits: Optional[int] = None) -> None:
    """In place: A += Xᵀ diag(w) X; with Xp also B += X'ᵀ diag(w) X' and C += Xᵀ diag(w) X'.

    ``splits`` (tests / tuning only) forces the number of row ranges of the split-N path.
    """
    pair = B is not None
    n = A.shape[0]
    N = math.prod(X.shape[:-1])
    if N == 0 or n == 0:
        return
    x = X.reshape(N, n)
    xp = Xp.reshape(N, n) if pair else None
    if pair and xp.dtype != x.dtype:
        dt = torch.promote_types(x.dtype, xp.dtype)
        x, xp = x.to(dt), xp.to(dt)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
        xp = xp.float() if pair else None
    w = None
    if weight is not None:
        w = weight.reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()

    accs = [A, B, C] if pair else [A]
    work = [a if a.is_contiguous() else a.contiguous() for a in accs]

    S = splits if splits is not None else _choose_splits(N, n, x.device, pair)
    S = max(1, min(int(S), N))
    rows_per_split = triton.cdiv(N, S)
    S = triton.cdiv(N, rows_per_split)
    if S > 1:
        outs = [torch.empty((S, n, n), device=x.device, dtype=torch.float32) for _ in work]
    else:
        outs = work
    a_out = outs[0]
    b_out = outs[1] if pair else a_out  # placeholders are never touched when PAIR is False
    c_out = outs[2] if pair else a_out
    xp_arg = xp if pair else x
    dot_f32 = INTERPRET or x.dtype == torch.float32

    def grid(meta):
        nt = triton.cdiv(n, meta["BLOCK_T"])
        return (nt, nt, S)

    _covariance_kernel[grid](
        x, xp_arg, w if w is not None else x, a_out, b_out, c_out,
        N, n, rows_per_split,
        x.stride(0), x.stride(1), xp_arg.stride(0), xp_arg.stride(1),
        n * n,
        PAIR=pair, HAS_W=w is not None, DOT_F32=dot_f32, ACCUMULATE=S == 1,
    )
    if S > 1:
        for acc, part in zip(work, outs):
            acc.add_(part.sum(dim=0))
    for acc, wk in zip(accs, work):
        if wk is not acc:
            acc.copy_(wk)
