"""Low-rank linear layer y = (x V) Uᵀ + bias, and the grouped form sharing one shrink.

Shapes: x [..., n] (M rows after flattening), V (n×k), U (m×k), bias (m,) or None.

Design
------
Two kernels, a "shrink" t = x V and an "expand" y = t Uᵀ + bias (bias add and the cast to
x.dtype fused into the expand's epilogue). Accumulation is always fp32.

* Decode (M <= 16 rows, memory bound: the cost is reading V and U once).
  The shrink is split-K over n: program (kb, s) reads the k-tile kb of V for rows
  [s·chunk, (s+1)·chunk) of n and writes its fp32 partial sum to a [S, M, k] buffer (plain
  stores, no atomics). S is chosen on the host so that S · ceil(k / BLOCK_K) programs cover the
  GPU about twice. The partials are then summed in a fixed order s = 0..S-1, so results are
  bit-reproducible:
    - when S·M <= 16 the expand kernel sums them itself while loading each t tile (one launch
      fewer; the extra reads are S·M·k·4 bytes per program, small next to its U tile);
    - otherwise a tiny reduce kernel writes t [M, k] once, and the expand reads that.
  The expand tiles m (BLOCK_N in {16, 32, 64}) with BLOCK_M = 16 (the minimum tl.dot size; the
  padded rows are masked).
* Prefill (M > 16, compute bound): two tiled GEMMs with grouped (L2-friendly) program order.
  The shrink writes t in the dot dtype (bf16/fp16 inputs: t is rounded to the input dtype after
  fp32 accumulation, as two back-to-back torch matmuls do; fp32 inputs keep t in fp32) and the
  expand reads it. A single fused kernel keeping the x V row block in registers only pays off
  for k <= ~128, which is far below the ranks a compressed LLM keeps (k ≈ 1000-6000), so it is
  not implemented: at those ranks the M×k intermediate is small next to the two GEMMs.
* Grouped (q/k/v, gate/up): one shrink with V_cat (n × Σk_i) — the activations are read once —
  then one expand launch per output on the column slice t[:, off_i:off_i+k_i].

Under ``TRITON_INTERPRET=1`` all dot operands are upcast to fp32 (bf16 tl.dot is wrong in the
Triton 3.9 interpreter) and every autotuner has exactly one config. fp32 inputs use
``input_precision="ieee"`` (no TF32).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DECODE_MAX_M = 16  # rows handled by the decode path (BLOCK_M = 16)
_DEBUG_POISON = False  # tests: fill every internal buffer and output with NaN before the kernels run


def _alloc(shape, dtype, device):
    if _DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _shrink_kernel(
    X, V, T,
    M, n, k, chunk, M_bucket,
    stride_xm, stride_xn, stride_vn, stride_vk, stride_ts, stride_tm, stride_tk,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """T[s, rows, cols] = X[rows, s·chunk : (s+1)·chunk] @ V[s·chunk : (s+1)·chunk, cols] (fp32 accumulate).

    ``M_bucket`` (unused in the body) is a power-of-two bucket of M for the autotuning key.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(k, BLOCK_K)
    # grouped ordering: GROUP_M row tiles share each V column tile while it is in L2
    group = GROUP_M * num_pid_k
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_k = (pid % group) // group_size
    PREC: tl.constexpr = "ieee" if DOT_F32 else "tf32"

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mm = rm < M
    mk = rk < k
    rm64 = rm.to(tl.int64)  # M·n may exceed 2³¹ for long prefills
    r_start = pid_s * chunk
    r_end = tl.minimum(r_start + chunk, n)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mr = rr < r_end
        xt = tl.load(X + rm64[:, None] * stride_xm + rr[None, :] * stride_xn, mask=mm[:, None] & mr[None, :], other=0.0)
        vt = tl.load(V + rr[:, None] * stride_vn + rk[None, :] * stride_vk, mask=mr[:, None] & mk[None, :], other=0.0)
        if DOT_F32:
            xt = xt.to(tl.float32)
            vt = vt.to(tl.float32)
        else:
            vt = vt.to(xt.dtype)
        acc = tl.dot(xt, vt, acc, input_precision=PREC)
    t_ptrs = T + pid_s * stride_ts + rm64[:, None] * stride_tm + rk[None, :] * stride_tk
    tl.store(t_ptrs, acc.to(T.dtype.element_ty), mask=mm[:, None] & mk[None, :])


@triton.jit
def _splitk_reduce_kernel(P, T, S, total, stride_ps, BLOCK: tl.constexpr):
    """T[i] = sum_{s=0..S-1} P[s, i] in this fixed order (P, T contiguous over i)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(P + s * stride_ps + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(T + offs, acc.to(T.dtype.element_ty), mask=mask)


@triton.jit
def _expand_kernel(
    T, U, BIAS, Y,
    M, m, k, M_bucket,
    stride_ts, stride_tm, stride_tk, stride_um, stride_uk, stride_ym, stride_yn,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = (sum_s T[s]) @ Uᵀ + bias, cast to Y's dtype; the SPLITS partials are summed in order."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(m, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    PREC: tl.constexpr = "ieee" if DOT_F32 else "tf32"

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    mn = rn < m
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < k
        t_ptrs = T + rm64[:, None] * stride_tm + rk[None, :] * stride_tk
        t_mask = mm[:, None] & mk[None, :]
        if SPLITS == 1:
            tt = tl.load(t_ptrs, mask=t_mask, other=0.0)
        else:
            tt = tl.load(t_ptrs, mask=t_mask, other=0.0).to(tl.float32)
            for s in tl.static_range(1, SPLITS):
                tt += tl.load(t_ptrs + s * stride_ts, mask=t_mask, other=0.0).to(tl.float32)
        ut = tl.load(U + rn[:, None] * stride_um + rk[None, :] * stride_uk, mask=mn[:, None] & mk[None, :], other=0.0)
        if DOT_F32:
            tt = tt.to(tl.float32)
            ut = ut.to(tl.float32)
        else:
            tt = tt.to(Y.dtype.element_ty)
            ut = ut.to(Y.dtype.element_ty)
        acc = tl.dot(tt, tl.trans(ut), acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rm64[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mm[:, None] & mn[None, :])


# --------------------------------------------------------------------------------------
# autotuned entry points (exactly one config when interpreting)
# --------------------------------------------------------------------------------------
def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:
    _SHRINK_DECODE_CONFIGS = [_cfg(BLOCK_R=32)]
    _SHRINK_PREFILL_CONFIGS = [_cfg(BLOCK_M=32, BLOCK_K=32, BLOCK_R=32, GROUP_M=4)]
    _EXPAND_DECODE_CONFIGS = [_cfg(BLOCK_N=32, BLOCK_K=32)]
    _EXPAND_PREFILL_CONFIGS = [_cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
else:
    _SHRINK_DECODE_CONFIGS = [_cfg(BLOCK_R=r, num_warps=w, num_stages=s)
                              for r in (64, 128, 256) for w in (4, 8) for s in (3, 4)]
    _SHRINK_PREFILL_CONFIGS = [
        _cfg(BLOCK_M=128, BLOCK_K=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3),
        _cfg(BLOCK_M=128, BLOCK_K=128, BLOCK_R=32, GROUP_M=8, num_warps=4, num_stages=4),
        _cfg(BLOCK_M=64, BLOCK_K=128, BLOCK_R=64, GROUP_M=8, num_warps=4, num_stages=4),
        _cfg(BLOCK_M=64, BLOCK_K=64, BLOCK_R=64, GROUP_M=8, num_warps=4, num_stages=4),
    ]
    _EXPAND_DECODE_CONFIGS = [_cfg(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=s)
                              for bn, bk in ((16, 64), (16, 128), (16, 256), (32, 64), (32, 128), (64, 64))
                              for s in (3, 4)]
    _EXPAND_PREFILL_CONFIGS = [
        _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
        _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
        _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    ]

# The shrink kernels write plain stores (no accumulation), so re-running them while tuning is harmless.
_shrink_decode = triton.autotune(_SHRINK_DECODE_CONFIGS, key=["n", "k", "chunk", "DOT_F32"])(_shrink_kernel)
_shrink_prefill = triton.autotune(_SHRINK_PREFILL_CONFIGS, key=["M_bucket", "n", "k", "DOT_F32"])(_shrink_kernel)
_expand_decode = triton.autotune(_EXPAND_DECODE_CONFIGS, key=["m", "k", "SPLITS", "DOT_F32"])(_expand_kernel)
_expand_prefill = triton.autotune(_EXPAND_PREFILL_CONFIGS, key=["M_bucket", "m", "k", "DOT_F32"])(_expand_kernel)

_DECODE_BLOCK_K = 32 if INTERPRET else 64  # shrink column tile in decode; fixed so the split count is known


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _decode_splits(n: int, k: int, device: torch.device) -> int:
    """Split count for the decode shrink: about 2 programs per SM, each over >= 256 rows of n."""
    if INTERPRET or device.type != "cuda":
        return 1
    col_tiles = triton.cdiv(k, _DECODE_BLOCK_K)
    want = triton.cdiv(2 * _num_sms(device), col_tiles)
    return max(1, min(want, triton.cdiv(n, 256), 64))


def _m_bucket(M: int) -> int:
    """Autotuning bucket for the token count: prefill lengths vary, so tune per power of two."""
    return min(triton.next_power_of_2(max(M, 1)), 8192)


def _dot_f32(dtype: torch.dtype) -> bool:
    return INTERPRET or dtype == torch.float32


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
def _shrink(x2: torch.Tensor, V: torch.Tensor, splits: Optional[int]):
    """Return (t, S): t is [S, M, K] fp32 partials (decode) or [1, M, K] in the dot dtype (prefill)."""
    M, n = x2.shape
    K = V.shape[1]
    dot_f32 = _dot_f32(x2.dtype)
    if M <= DECODE_MAX_M:
        S = splits if splits is not None else _decode_splits(n, K, x2.device)
        S = max(1, min(int(S), n))
        chunk = triton.cdiv(triton.cdiv(n, S), 256) * 256 if not INTERPRET else triton.cdiv(n, S)
        S = triton.cdiv(n, chunk)
        t = _alloc((S, M, K), torch.float32, x2.device)
        grid = (triton.cdiv(K, _DECODE_BLOCK_K), S)
        _shrink_decode[grid](
            x2, V, t, M, n, K, chunk, 16,
            x2.stride(0), x2.stride(1), V.stride(0), V.stride(1), t.stride(0), t.stride(1), t.stride(2),
            DOT_F32=dot_f32, BLOCK_M=DECODE_MAX_M, BLOCK_K=_DECODE_BLOCK_K, GROUP_M=1,
        )
        return t, S
    t = _alloc((1, M, K), torch.float32 if dot_f32 else x2.dtype, x2.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]), 1)

    _shrink_prefill[grid](
        x2, V, t, M, n, K, n, _m_bucket(M),
        x2.stride(0), x2.stride(1), V.stride(0), V.stride(1), t.stride(0), t.stride(1), t.stride(2),
        DOT_F32=dot_f32,
    )
    return t, 1


def _reduce_splits(t: torch.Tensor) -> torch.Tensor:
    """[S, M, K] fp32 partials -> [1, M, K] fp32, summed in the fixed order s = 0..S-1."""
    S, M, K = t.shape
    out = _alloc((1, M, K), torch.float32, t.device)
    total = M * K
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(total, block),)](t, out, S, total, t.stride(0), BLOCK=block)
    return out


def _fuse_reduce(S: int, M: int) -> bool:
    return S * M <= 16


def _expand(t: torch.Tensor, S: int, U: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (sum_s t[s]) Uᵀ + bias; t is [S, M, k] (possibly a column slice)."""
    _, M, k = t.shape
    m = U.shape[0]
    y = out if out is not None else _alloc((M, m), out_dtype, t.device)
    if bias is not None:
        bias = bias.contiguous()
    dot_f32 = _dot_f32(out_dtype)
    common = dict(SPLITS=S, HAS_BIAS=bias is not None, DOT_F32=dot_f32)
    args = (
        t, U, bias if bias is not None else y, y, M, m, k, _m_bucket(M),
        t.stride(0), t.stride(1), t.stride(2), U.stride(0), U.stride(1), y.stride(0), y.stride(1),
    )
    if M <= DECODE_MAX_M:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_N"]),)
        _expand_decode[grid](*args, BLOCK_M=DECODE_MAX_M, GROUP_M=1, **common)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)
        _expand_prefill[grid](*args, **common)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if x2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"lowrank_linear: unsupported dtype {x2.dtype}")
    return x2


def _shared_shrink(x2: torch.Tensor, V: torch.Tensor, splits: Optional[int]):
    t, S = _shrink(x2, V, splits)
    if S > 1 and not _fuse_reduce(S, x2.shape[0]):
        t, S = _reduce_splits(t), 1
    return t, S


def lowrank_linear(x: torch.Tensor, V: torch.Tensor, U: torch.Tensor, bias: Optional[torch.Tensor], *,
                   splits: Optional[int] = None) -> torch.Tensor:
    """y = (x V) Uᵀ + bias; output dtype = x.dtype. ``splits`` (tests/tuning) forces the decode split count."""
    x2 = _rows(x)
    M = x2.shape[0]
    m, k = U.shape
    lead = x.shape[:-1]
    if M == 0 or k == 0 or x2.shape[1] == 0:
        y = torch.zeros((M, m), dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias.to(x.dtype)
        return y.reshape(*lead, m)
    t, S = _shared_shrink(x2, V, splits)
    return _expand(t, S, U, bias, x.dtype).reshape(*lead, m)


def lowrank_linear_grouped(x: torch.Tensor, V_cat: torch.Tensor, Us: Sequence[torch.Tensor],
                           biases: Sequence[Optional[torch.Tensor]], *,
                           splits: Optional[int] = None) -> List[torch.Tensor]:
    """t = x V_cat once, then y_i = t[:, off_i:off_i+k_i] U_iᵀ + b_i for each output."""
    x2 = _rows(x)
    M = x2.shape[0]
    lead = x.shape[:-1]
    biases = list(biases) if biases is not None else [None] * len(Us)
    if M == 0 or V_cat.shape[1] == 0 or x2.shape[1] == 0:
        return [lowrank_linear(x, V_cat[:, :0], U[:, :0], b) for U, b in zip(Us, biases)]
    t, S = _shared_shrink(x2, V_cat, splits)
    outs, off = [], 0
    for U, b in zip(Us, biases):
        m, k = U.shape
        if k == 0:
            y = torch.zeros((M, m), dtype=x.dtype, device=x.device)
            if b is not None:
                y += b.to(x.dtype)
        else:
            y = _expand(t[:, :, off:off + k], S, U, b, x.dtype)
        outs.append(y.reshape(*lead, m))
        off += k
    return outs
