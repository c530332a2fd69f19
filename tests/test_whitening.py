"""The whitening ops: the C++ extension and the PyTorch reference against float64 eigh.

Eigenvectors are defined up to sign (and up to rotation inside clusters of equal eigenvalues),
so factors are compared through invariants: L Lᵀ (the clamped H), L⁻¹ L, L⁻¹ H L⁻ᵀ on the
retained subspace, the eigenvalues, the clamp counts and info.

Tests that need the extension skip when it is not built, unless LOWRANK_ENGINE_REQUIRE_EXT=1
(CI), when they fail.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_engine import ops

from conftest import intra_op_threads, needs_cuda

EPS = 1e-6
REQUIRE_EXT = os.environ.get("LOWRANK_ENGINE_REQUIRE_EXT", "0") == "1"
EXT_LOADED = ops.extension_info()["loaded"]


def _need_ext():
    if EXT_LOADED:
        return
    if REQUIRE_EXT:
        pytest.fail("LOWRANK_ENGINE_REQUIRE_EXT=1 but the C++ extension lowrank_engine._C is not loaded")
    pytest.skip("the C++ extension lowrank_engine._C is not built")


def _need_ext_cuda():
    """The extension's own CUDA kernels (without them the CUDA key is served by the Python fallback)."""
    _need_ext()
    if not ops.extension_info()["cuda"]:
        if REQUIRE_EXT:
            pytest.fail("LOWRANK_ENGINE_REQUIRE_EXT=1 on a GPU but the extension has no CUDA kernels")
        pytest.skip("the C++ extension was built without CUDA kernels")


def _ext(H, eps=EPS):
    _need_ext()
    return torch.ops.lowrank_engine.whiten_ex(H, eps)


def _ref(H, eps=EPS):
    return ops.whiten_reference(H, eps)


IMPLS = {"ext": _ext, "reference": _ref}


# --------------------------------------------------------------------------------------
# statistics that break Cholesky
# --------------------------------------------------------------------------------------
def _gram(X):
    return X.mT @ X


def random_spd(batch, n, dtype, tokens=None, gen=None):
    X = torch.randn(batch, tokens or 4 * n, n, dtype=torch.float64, generator=gen)
    return _gram(X).to(dtype)


def rank_deficient(batch, dtype, tokens=10, n=40, gen=None):
    """More features than tokens: H = XᵀX with X 10×40 has rank 10."""
    X = torch.randn(batch, tokens, n, dtype=torch.float64, generator=gen)
    return _gram(X).to(dtype)


def outlier_channels(batch, n, dtype, gen=None):
    """A few channels ×300, as in LLM activations: condition number ~1e5 or worse."""
    X = torch.randn(batch, 3 * n, n, dtype=torch.float64, generator=gen)
    X[:, :, [1, n // 2, n - 2]] *= 300.0
    return _gram(X).to(dtype)


def dead_channels(batch, n, dtype, gen=None):
    """Zero rows and columns (channels that never fire)."""
    X = torch.randn(batch, 3 * n, n, dtype=torch.float64, generator=gen)
    X[:, :, ::3] = 0.0
    return _gram(X).to(dtype)


CASES = {
    "random_spd": lambda dtype: random_spd(3, 32, dtype),
    "rank_deficient": lambda dtype: rank_deficient(2, dtype),
    "outlier_channels": lambda dtype: outlier_channels(2, 48, dtype),
    "dead_channels": lambda dtype: dead_channels(2, 30, dtype),
}


# --------------------------------------------------------------------------------------
# checks against float64 eigh
# --------------------------------------------------------------------------------------
def _unit(dtype):
    return torch.finfo(dtype).eps


def check_whitening(H, out, eps=EPS):
    """Every invariant of whiten_ex's output against torch.linalg.eigh in float64."""
    L, L_inv, evals, clamped, num_clamped, info = out
    b, n, _ = H.shape
    dtype = H.dtype
    assert L.shape == L_inv.shape == H.shape and L.dtype == L_inv.dtype == dtype
    assert evals.shape == clamped.shape == (b, n) and evals.dtype == clamped.dtype == dtype
    assert num_clamped.shape == (b,) and num_clamped.dtype == torch.int64
    assert info.shape == (b,) and info.dtype == torch.int32
    for t in (L, L_inv, evals, clamped):
        assert torch.isfinite(t).all(), "whitening factors must never contain NaN or Inf"
    assert ((info == 0) | (info == 1)).all()

    u = _unit(dtype)
    Hs = 0.5 * (H.double() + H.double().mT)
    w_ref, Q_ref = torch.linalg.eigh(Hs)
    for i in range(b):
        lmax = w_ref[i].max().item()
        floor = eps * lmax
        noise = 64 * n * u * lmax  # eigenvalue error bound of a backward-stable solver, with slack
        # eigenvalues (raw, ascending) and the clamp
        assert torch.all(evals[i, 1:] >= evals[i, :-1])
        assert (evals[i].double() - w_ref[i]).abs().max().item() <= noise
        own_floor = eps * max(evals[i].double().max().item(), 0.0)
        assert torch.allclose(clamped[i].double(), evals[i].double().clamp_min(own_floor), rtol=4 * u, atol=0)
        assert int(num_clamped[i]) == int((evals[i].double() < clamped[i].double()).sum())
        ambiguous = int(((w_ref[i] - floor).abs() <= noise).sum())
        exact = int((w_ref[i] < floor).sum())
        assert abs(int(num_clamped[i]) - exact) <= ambiguous
        # L Lᵀ reconstructs the clamped H (clamping moves H by at most ~floor, plus solver noise)
        Lc = L[i].double()
        Hc = (Q_ref[i] * w_ref[i].clamp_min(floor)) @ Q_ref[i].mT
        assert (Lc @ Lc.mT - Hc).abs().max().item() <= 2 * noise + 2 * floor
        # L⁻¹ L = I: exactly Λc^-½ QᵀQ Λc^½, so the error is the loss of orthogonality of Q
        # amplified by at most sqrt(λmax / floor)
        M = L_inv[i].double() @ Lc
        I = torch.eye(n, dtype=torch.float64)
        assert (M - I).abs().max().item() <= 32 * n * u / eps ** 0.5
        # on the retained (well-resolved) subspace L⁻¹ L = I and L⁻¹ H L⁻ᵀ = I to working precision
        keep = evals[i].double() >= max(1e3 * noise, 2 * own_floor)  # not clamped
        if keep.any():
            Mk = M[keep][:, keep]
            assert (Mk - torch.eye(int(keep.sum()), dtype=torch.float64)).abs().max().item() <= (1e-3 if u > 1e-10 else 1e-9)
            W = L_inv[i].double()[keep] @ Hs[i] @ L_inv[i].double()[keep].mT
            assert (W - torch.eye(int(keep.sum()), dtype=torch.float64)).abs().max().item() <= (2e-3 if u > 1e-10 else 1e-9)


def check_same(out_a, out_b, H, eps=EPS):
    """Two whiten_ex results agree (up to eigenvector signs and solver noise)."""
    b, n, _ = H.shape
    u = _unit(H.dtype)
    La, Lia, ea, ca, na, ia = out_a
    Lb, Lib, eb, cb, nb, ib = out_b
    assert torch.equal(ia, ib)
    for i in range(b):
        lmax = eb[i].double().abs().max().item()
        noise = 64 * n * u * lmax
        assert (ea[i].double() - eb[i].double()).abs().max().item() <= noise
        assert (ca[i].double() - cb[i].double()).abs().max().item() <= noise + eps * noise
        near = int(((eb[i].double() - eps * lmax).abs() <= noise).sum())
        assert abs(int(na[i]) - int(nb[i])) <= near
        LLa = La[i].double() @ La[i].double().mT
        LLb = Lb[i].double() @ Lb[i].double().mT
        assert (LLa - LLb).abs().max().item() <= 4 * noise + 2 * eps * lmax
        # the whitening operators agree on the well-resolved subspace
        keep = eb[i].double() >= max(1e3 * noise, 2 * eps * lmax)
        Pa = Lia[i].double().mT[:, keep] @ Lia[i].double()[keep]  # Q_k Λ_k⁻¹ Q_kᵀ
        Pb = Lib[i].double().mT[:, keep] @ Lib[i].double()[keep]
        scale = 1.0 / cb[i].double()[keep].min().item() if keep.any() else 1.0
        assert (Pa - Pb).abs().max().item() <= (1e-3 if u > 1e-10 else 1e-8) * scale


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_against_float64_eigh(case, dtype, impl):
    H = CASES[case](dtype)
    out = IMPLS[impl](H)
    check_whitening(H, out)
    if case in ("rank_deficient", "dead_channels"):
        assert (out[4] > 0).all(), "the null space must be clamped"
    if case == "random_spd":
        assert (out[4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_extension_matches_reference(case, dtype):
    H = CASES[case](dtype)
    check_same(_ext(H), _ref(H), H)


# The extension's CUDA solver by size and batch: syevjBatched (n <= 32, b > 1), the batched solver
# (n <= 512, b > 1), one syevd per matrix otherwise; odd sizes on each side of the limits.
CUDA_CASES = {**CASES, "jacobi_limit": lambda dtype: outlier_channels(5, 32, dtype),
              "batched": lambda dtype: outlier_channels(3, 33, dtype),
              "batched_limit": lambda dtype: random_spd(2, 512, dtype),
              "per_matrix_batch": lambda dtype: outlier_channels(2, 517, dtype),
              "single": lambda dtype: rank_deficient(1, dtype, tokens=100, n=301)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", sorted(CUDA_CASES))
def test_cuda_against_float64_eigh(case, dtype, impl):
    """On CUDA tensors: every invariant against float64 eigh, and agreement with the CPU reference."""
    if impl == "ext":
        _need_ext_cuda()
    H = CUDA_CASES[case](dtype)
    out = IMPLS[impl](H.cuda())
    assert all(t.is_cuda for t in out)
    out = tuple(t.cpu() for t in out)
    check_whitening(H, out)
    check_same(out, _ref(H), H)


@pytest.mark.gpu
@needs_cuda
def test_cuda_errors_name_the_matrix_and_retry_in_float64(monkeypatch):
    _need_ext_cuda()
    H = random_spd(5, 40, torch.float32)
    H[3, 0, 0] = float("nan")
    H[1] = 0
    with pytest.raises(ValueError, match=r"matrix 1 .*all zero"):
        _ext(H.cuda())
    H = random_spd(3, 6, torch.float64)
    H[2, 1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"matrix 2 .*NaN or Inf"):
        _ext(H.cuda())
    with pytest.raises(ValueError, match=r"matrix 0 .*no positive eigenvalue"):
        _ext(-torch.eye(4, device="cuda").repeat(2, 1, 1))
    monkeypatch.setenv("LOWRANK_ENGINE_WHITEN_FORCE_RETRY", "1")
    for H in (outlier_channels(3, 24, torch.float32), outlier_channels(1, 600, torch.float32)):
        out = tuple(t.cpu() for t in _ext(H.cuda()))
        assert (out[5] == 1).all()
        check_whitening(H, out)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_all_zero_matrix_names_its_index(impl):
    H = random_spd(4, 8, torch.float32)
    H[2] = 0
    with pytest.raises(ValueError, match=r"matrix 2 .*all zero"):
        IMPLS[impl](H)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_matrix_names_its_index(impl, bad):
    H = random_spd(3, 6, torch.float64)
    H[1, 2, 4] = bad
    with pytest.raises(ValueError, match=r"matrix 1 .*NaN or Inf"):
        IMPLS[impl](H)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_first_bad_matrix_is_reported(impl):
    H = random_spd(5, 6, torch.float32)
    H[3, 0, 0] = float("nan")
    H[1] = 0
    with pytest.raises(ValueError, match=r"matrix 1 .*all zero"):
        IMPLS[impl](H)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_no_positive_eigenvalue(impl):
    H = -torch.eye(4).repeat(2, 1, 1)
    with pytest.raises(ValueError, match=r"matrix 0 .*no positive eigenvalue"):
        IMPLS[impl](H)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("H", [torch.zeros(3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 2, 3, 3),
                               torch.zeros(1, 3, 3, dtype=torch.float16), torch.zeros(1, 3, 3, dtype=torch.int32)],
                         ids=["2d", "rect", "4d", "fp16", "int32"])
def test_bad_input_is_a_value_error(impl, H):
    with pytest.raises(ValueError, match="whiten"):
        IMPLS[impl](H)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_symmetrizes_and_accepts_strided_input(impl):
    H = random_spd(2, 12, torch.float64)
    skew = torch.randn(2, 12, 12, dtype=torch.float64)
    out_sym = IMPLS[impl](H)
    out_skew = IMPLS[impl](H + (skew - skew.mT))  # the antisymmetric part is dropped
    check_same(out_skew, out_sym, H)
    strided = torch.stack([H, H], dim=-1)[..., 0].mT  # a non-contiguous view of Hᵀ = H
    assert not strided.is_contiguous()
    check_same(IMPLS[impl](strided), out_sym, H)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_edge_shapes(impl):
    out = IMPLS[impl](torch.empty(0, 5, 5))
    assert [tuple(t.shape) for t in out] == [(0, 5, 5), (0, 5, 5), (0, 5), (0, 5), (0,), (0,)]
    H = torch.full((3, 1, 1), 4.0)
    L, L_inv, evals, clamped, num_clamped, info = IMPLS[impl](H)
    assert torch.allclose(L.abs(), torch.full_like(L, 2.0)) and torch.allclose(L * L_inv, torch.ones_like(L))
    assert torch.equal(evals, torch.full((3, 1), 4.0)) and (num_clamped == 0).all() and (info == 0).all()
    with pytest.raises(ValueError, match=r"matrix 0 .*all zero"):
        IMPLS[impl](torch.empty(2, 0, 0))


def test_public_wrappers_squeeze_2d():
    H = random_spd(1, 10, torch.float32)[0]
    L, L_inv, evals, info = ops.whiten(H)
    assert L.shape == (10, 10) and evals.shape == (10,) and info.shape == ()
    ex = ops.whiten_ex(H)
    assert len(ex) == 6 and ex[4].shape == ()
    check_whitening(H[None], tuple(t[None] for t in ex))


def test_fp64_retry_path(monkeypatch):
    """LOWRANK_ENGINE_WHITEN_FORCE_RETRY=1 (a test hook) makes every float32 solve count as
    failed, so the float64 retry runs: info = 1 and the factors are still right."""
    _need_ext()
    monkeypatch.setenv("LOWRANK_ENGINE_WHITEN_FORCE_RETRY", "1")
    H = outlier_channels(3, 24, torch.float32)
    out = torch.ops.lowrank_engine.whiten_ex(H, EPS)
    assert (out[5] == 1).all()
    check_whitening(H, out)
    # solved in float64, then rounded: as accurate as the float64 op rounded to float32
    out64 = torch.ops.lowrank_engine.whiten_ex(H.double(), EPS)
    assert (out64[5] == 0).all()  # float64 input has nothing to retry in
    assert torch.allclose(out[2].double(), out64[2].float().double(), rtol=0, atol=1e-6 * out64[2].max().item())
    H[1] = 0
    with pytest.raises(ValueError, match=r"matrix 1 .*all zero"):
        torch.ops.lowrank_engine.whiten_ex(H, EPS)


@pytest.mark.parametrize("batch,n", [(1, 520), (2, 300), (2, 700), (1, 1100)])
def test_threading_paths(batch, n):
    """On two intra-op threads: a single matrix above the size where LAPACK may use all threads, small
    batches, and n ≥ 640, where MKL's syevd inside an at::parallel_for region returned wrong factors."""
    H = outlier_channels(batch, n, torch.float32)
    with intra_op_threads(2):
        out = _ext(H)
    check_same(out, _ref(H), H)
    assert all(bool(torch.isfinite(t).all()) for t in out[:4])


def test_whiten_is_whiten_ex_subset():
    _need_ext()
    H = outlier_channels(3, 20, torch.float32)
    a = torch.ops.lowrank_engine.whiten(H, EPS)
    b = torch.ops.lowrank_engine.whiten_ex(H, EPS)
    for x, y in zip(a, (b[0], b[1], b[2], b[5])):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------
# property test
# --------------------------------------------------------------------------------------
@st.composite
def psd_batches(draw):
    n = draw(st.integers(1, 48))
    batch = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(batch):
        rank = draw(st.integers(1, n))
        X = torch.randn(rank + draw(st.integers(0, 8)), n, dtype=torch.float64, generator=gen)
        X = X[:rank].mT @ torch.randn(rank, n, dtype=torch.float64, generator=gen)  # rank ≤ `rank`
        X = X * (10.0 ** torch.empty(n, dtype=torch.float64).uniform_(-2, 2, generator=gen))  # channel scales
        if draw(st.booleans()):
            X[:, draw(st.integers(0, n - 1))] = 0  # a dead channel
        H = X.mT @ X
        if not (H != 0).any():
            H[0, 0] = 1.0
        mats.append(H)
    return torch.stack(mats).to(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=psd_batches())
def test_property_random_shapes_and_ranks(H):
    out = _ref(H)
    check_whitening(H, out)
    if EXT_LOADED:
        ext = torch.ops.lowrank_engine.whiten_ex(H, EPS)
        check_whitening(H, ext)
        check_same(ext, out, H)


def test_property_covers_the_extension():
    _need_ext()  # the property test above silently skips the extension otherwise


# --------------------------------------------------------------------------------------
# the extension itself
# --------------------------------------------------------------------------------------
def test_extension_loaded_and_registered():
    _need_ext()
    info = ops.extension_info()
    assert info["loaded"] and info["path"].endswith(".so")
    for name in ("whiten", "whiten_ex"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_engine::{name}", "CPU")
        schema = str(getattr(torch.ops.lowrank_engine, name).default._schema)
        expected = ops.WHITEN_SCHEMA if name == "whiten" else ops.WHITEN_EX_SCHEMA
        assert schema == f"lowrank_engine::{expected}"


def test_extension_info_cuda_flag_is_the_extensions_own():
    """ops registers the Python fallback for the CUDA key when the extension has no CUDA kernel;
    extension_info()["cuda"] must not count that fallback."""
    _need_ext()
    if torch.version.cuda is None:
        assert ops.extension_info()["cuda"] is False


def test_extension_is_importable_as_a_module():
    _need_ext()
    import importlib

    mod = importlib.import_module("lowrank_engine._C")
    assert mod.__name__ == "lowrank_engine._C"


@pytest.mark.parametrize("name", ["whiten", "whiten_ex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(name, dtype):
    _need_ext()
    op = getattr(torch.ops.lowrank_engine, name).default
    for H in (random_spd(2, 8, dtype), rank_deficient(1, dtype, tokens=3, n=7)):
        torch.library.opcheck(op, (H, EPS))


def test_batch_threads_and_gil_released():
    """A batch is solved with the GIL released: another Python thread keeps running while the op
    works, and the batched results match one-by-one calls."""
    _need_ext()
    H = random_spd(16, 256, torch.float32)
    expected = [torch.ops.lowrank_engine.whiten_ex(H[i:i + 1], EPS) for i in range(H.shape[0])]
    t0 = time.perf_counter()
    batched = torch.ops.lowrank_engine.whiten_ex(H, EPS)
    single = time.perf_counter() - t0
    for i, e in enumerate(expected):
        check_same(tuple(t[i:i + 1] for t in batched), e, H[i:i + 1])

    done = threading.Event()

    def work():
        for _ in range(2):
            torch.ops.lowrank_engine.whiten_ex(H, EPS)
        done.set()

    worker = threading.Thread(target=work)
    gaps, last = [], time.perf_counter()
    start = last
    worker.start()
    while not done.is_set():
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    worker.join()
    elapsed = time.perf_counter() - start
    # With the GIL held through the op, this loop would stall for a whole op call at a time,
    # so nearly all of `elapsed` would be spent in long gaps.
    stalled = sum(g for g in gaps if g > 0.25 * single)
    assert stalled < 0.5 * elapsed, (stalled, elapsed, single, len(gaps))


def test_whitening_schemas_have_one_source():
    """ops.py defines the schemas; the extension registers only kernels (no TORCH_LIBRARY def of its own)."""
    import re

    source = open(os.path.join(os.path.dirname(ops.__file__), "..", "csrc", "whitening.cpp")).read()
    assert not re.search(r"TORCH_LIBRARY\s*\(|\.def\s*\(", source)
    for name, schema in (("whiten", ops.WHITEN_SCHEMA), ("whiten_ex", ops.WHITEN_EX_SCHEMA)):
        registered = str(getattr(torch.ops.lowrank_engine, name).default._schema)
        assert registered == f"{ops.NAMESPACE}::{schema}"
