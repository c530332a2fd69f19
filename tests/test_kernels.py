"""Triton kernels against a float64 reference: on CPU tensors under TRITON_INTERPRET=1, on CUDA tensors
where a GPU is present and TRITON_INTERPRET=0 (benchmarks/device_suite.py runs them there, `-m gpu`).

The interpreter decides at kernel decoration time, so the variable is set before anything
imports Triton or the kernel modules.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from lowrank_engine import ops  # noqa: E402
from lowrank_engine import triton_kernels as kernels  # noqa: E402

cov_mod = importlib.import_module("lowrank_engine.kernels.covariance")
ll_mod = importlib.import_module("lowrank_engine.kernels.lowrank_linear")

if not kernels.triton_available():  # e.g. kernels imported earlier without the interpreter and no GPU
    pytest.skip("Triton kernels cannot run here", allow_module_level=True)

pytestmark = pytest.mark.gpu  # every test here runs on CUDA tensors when a GPU is present

DEVICE = "cuda" if (torch.cuda.is_available() and not cov_mod.INTERPRET) else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# Each autotuner with the configs it chooses among (one each under the interpreter). The covariance kernel
# prunes to its single-statistic or its pair configs by call; under the interpreter both use the single one.
TUNED = {
    "covariance": (cov_mod._covariance_kernel, cov_mod._SINGLE_CONFIGS),
    "covariance_pair": (cov_mod._covariance_kernel, cov_mod._PAIR_CONFIGS or cov_mod._SINGLE_CONFIGS),
    "shrink_decode": (ll_mod._shrink_decode, ll_mod._SHRINK_DECODE_CONFIGS),
    "expand_decode": (ll_mod._expand_decode, ll_mod._EXPAND_DECODE_CONFIGS),
    "shrink_prefill": (ll_mod._shrink_prefill, ll_mod._SHRINK_PREFILL_CONFIGS),
    "expand_prefill": (ll_mod._expand_prefill, ll_mod._EXPAND_PREFILL_CONFIGS),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every internal buffer and output of the low-rank kernels starts as NaN."""
    monkeypatch.setattr(ll_mod, "_DEBUG_POISON", True)


@pytest.fixture(autouse=True)
def _one_config_per_kernel(monkeypatch):
    """On a GPU the autotuners would time every config at every new shape, minutes over this file, and
    the values do not depend on the choice: pin the first config of each kind here, and check every
    config in test_every_autotune_config_matches_float64."""
    if DEVICE == "cuda":
        first = {}  # tuner id -> (tuner, the first config of each kind it serves)
        for tuner, configs in TUNED.values():
            first.setdefault(id(tuner), (tuner, []))[1].append(configs[0])
        for tuner, configs in first.values():
            monkeypatch.setattr(tuner, "configs", configs)
            monkeypatch.setattr(tuner, "cache", {})
    yield


def _gen(seed):
    if not isinstance(seed, int):
        seed = zlib.crc32(repr(seed).encode())  # str hashes are salted per process
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, g=None, scale=1.0):
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + 0.1  # nonzero mean: never near zero
    return t.to(dtype).to(DEVICE)


def assert_close(actual, expected, dtype, scale=None):
    """Compare with a float64 reference; the tolerance is relative to the reference's magnitude."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert torch.isfinite(actual).all(), "output has NaN/Inf (an element was never written?)"
    tol = TOL[dtype]
    if scale is None:
        scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-30))


# --------------------------------------------------------------------------------------
# covariance
# --------------------------------------------------------------------------------------
def _weights(kind, N, g):
    if kind is None:
        return None
    if kind == "mask":
        w = torch.ones(N)
        w[-max(1, N // 3):] = 0.0  # padded tail
        return w.to(DEVICE)
    return (torch.rand(N, generator=g, dtype=torch.float64) * 2).float().to(DEVICE)


def _cov_ref(X, Xp, w):
    x = X.reshape(-1, X.shape[-1]).double().cpu()
    wd = torch.ones(x.shape[0], 1, dtype=torch.float64) if w is None else w.double().cpu().reshape(-1, 1)
    a = (x * wd).T @ x
    if Xp is None:
        return a, None, None
    xp = Xp.reshape(-1, Xp.shape[-1]).double().cpu()
    return a, (xp * wd).T @ xp, (x * wd).T @ xp


def _cov_scale(X, Xp, w):
    """Magnitude of the accumulated sums: sum_r |w_r| |x_r|² bounds every entry."""
    x = X.reshape(-1, X.shape[-1]).double().cpu().abs()
    wd = 1.0 if w is None else w.double().cpu().abs().reshape(-1, 1)
    s = ((x * wd).T @ x).max().item()
    if Xp is not None:
        xp = Xp.reshape(-1, Xp.shape[-1]).double().cpu().abs()
        s = max(s, ((xp * wd).T @ xp).max().item(), ((x * wd).T @ xp).max().item())
    return s


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
@pytest.mark.parametrize("wkind", [None, "mask", "real"])
@pytest.mark.parametrize("shape", [(1, 37), (2, 35, 37), (45, 67)], ids=["one_token", "batched", "multi_tile"])
def test_covariance(dtype, pair, wkind, shape):
    g = _gen((str(dtype), pair, wkind, shape))
    n = shape[-1]
    X = randn(*shape, dtype=dtype, g=g)
    Xp = randn(*shape, dtype=dtype, g=g) if pair else None
    N = X.numel() // n
    w = _weights(wkind, N, g)
    accs0 = [randn(n, n, g=g, scale=10.0) for _ in range(3 if pair else 1)]  # poisoned accumulators
    accs = [a.clone() for a in accs0]
    A, B, C = (accs + [None, None])[:3]
    kernels.covariance_accumulate(A, B, C, X, Xp, w)
    refs = _cov_ref(X, Xp, w)
    scale = _cov_scale(X, Xp, w) + 10.0
    for acc, acc0, ref in zip(accs, accs0, refs):
        assert_close(acc, acc0.double().cpu() + ref, dtype, scale)
    assert accs[0].dtype == torch.float32


def test_covariance_masked_rows_ignored():
    """Rows with weight 0 contribute nothing, whatever their values."""
    g = _gen(1)
    X = randn(20, 37, g=g)
    w = torch.ones(20, device=DEVICE)
    w[15:] = 0
    A1 = torch.zeros(37, 37, device=DEVICE)
    A2 = torch.zeros(37, 37, device=DEVICE)
    kernels.covariance_accumulate(A1, None, None, X, None, w)
    kernels.covariance_accumulate(A2, None, None, X[:15], None, None)
    torch.testing.assert_close(A1, A2, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_covariance_accumulates_over_calls(pair):
    g = _gen(2)
    n = 37
    accs0 = [randn(n, n, g=g) for _ in range(3 if pair else 1)]
    accs = [a.clone() for a in accs0]
    A, B, C = (accs + [None, None])[:3]
    expected = [a.double().cpu() for a in accs0]
    scale = 1.0
    for step in range(3):
        X = randn(7 + step, n, dtype=torch.bfloat16, g=g)
        Xp = randn(7 + step, n, dtype=torch.bfloat16, g=g) if pair else None
        w = _weights("real", X.shape[0], g)
        kernels.covariance_accumulate(A, B, C, X, Xp, w)
        for i, ref in enumerate(_cov_ref(X, Xp, w)[: len(accs)]):
            expected[i] += ref
        scale += _cov_scale(X, Xp, w)
    for acc, exp in zip(accs, expected):
        assert_close(acc, exp, torch.float32, scale)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("pair", [False, True], ids=["single", "pair"])
def test_covariance_split_rows(splits, pair):
    """The split-N path (partials + fixed-order reduction) matches the reference."""
    g = _gen(3 + splits)
    n = 37
    X = randn(50, n, g=g)
    Xp = randn(50, n, g=g) if pair else None
    w = _weights("mask", 50, g)
    accs0 = [randn(n, n, g=g) for _ in range(3 if pair else 1)]
    accs = [a.clone() for a in accs0]
    A, B, C = (accs + [None, None])[:3]
    cov_mod.covariance_accumulate(A, B, C, X, Xp, w, splits=splits)
    scale = _cov_scale(X, Xp, w)
    for acc, acc0, ref in zip(accs, accs0, _cov_ref(X, Xp, w)):
        assert_close(acc, acc0.double().cpu() + ref, torch.float32, scale)


def test_covariance_noncontiguous():
    """Strided inputs and accumulator views (the view's neighbours must stay untouched)."""
    g = _gen(4)
    n = 37
    Xbig = randn(30, 2 * n, g=g)
    X = Xbig[:, ::2]  # column stride 2
    Xp = randn(n, 30, g=g).T  # transposed
    big = randn(3, n, n + 5, g=g)
    big0 = big.clone()
    A, B, C = big[0, :, :n], big[1, :, :n], big[2, :, :n]
    kernels.covariance_accumulate(A, B, C, X, Xp, None)
    refs = _cov_ref(X, Xp, None)
    scale = _cov_scale(X, Xp, None)
    for i in range(3):
        assert_close(big[i, :, :n], big0[i, :, :n].double().cpu() + refs[i], torch.float32, scale)
        assert torch.equal(big[i, :, n:], big0[i, :, n:])


def test_covariance_mixed_dtypes_promote():
    g = _gen(5)
    X = randn(9, 21, dtype=torch.bfloat16, g=g)
    Xp = randn(9, 21, dtype=torch.float32, g=g)
    A, B, C = (torch.zeros(21, 21, device=DEVICE) for _ in range(3))
    kernels.covariance_accumulate(A, B, C, X, Xp, None)
    for acc, ref in zip((A, B, C), _cov_ref(X, Xp, None)):
        assert_close(acc, ref, torch.float32, _cov_scale(X, Xp, None))


def test_covariance_deterministic():
    g = _gen(6)
    n = 45
    X = randn(3, 33, n, dtype=torch.bfloat16, g=g)
    Xp = randn(3, 33, n, dtype=torch.bfloat16, g=g)
    w = _weights("real", 99, g)
    A0 = randn(n, n, g=g)
    outs = []
    for _ in range(2):
        A, B, C = A0.clone(), A0.clone(), A0.clone()
        kernels.covariance_accumulate(A, B, C, X, Xp, w)
        outs.append((A, B, C))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_covariance_symmetric_from_zero():
    """Off-diagonal tiles are mirrors, so A is exactly symmetric there."""
    g = _gen(7)
    n = 67
    X = randn(25, n, g=g)
    A = torch.zeros(n, n, device=DEVICE)
    kernels.covariance_accumulate(A, None, None, X, None, None)
    off = torch.ones(n, n, dtype=torch.bool)
    bt = cov_mod._covariance_kernel.configs[0].kwargs["BLOCK_T"] if cov_mod.INTERPRET else None
    if bt is not None:
        for i in range(0, n, bt):
            off[i:i + bt, i:i + bt] = False  # diagonal tiles: symmetric only up to rounding
        assert torch.equal(A.cpu()[off], A.cpu().T[off])
    torch.testing.assert_close(A, A.T, rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------
# low-rank linear
# --------------------------------------------------------------------------------------
def _ll_ref(x, V, U, bias):
    y = (x.double().cpu() @ V.double().cpu()) @ U.double().cpu().T
    return y if bias is None else y + bias.double().cpu()


def _ll_scale(x, V, U, bias):
    y = (x.double().cpu().abs() @ V.double().cpu().abs()) @ U.double().cpu().abs().T
    if bias is not None:
        y = y + bias.double().cpu().abs()
    return y.max().item()


def _ll_inputs(lead, n, m, k, dtype, g, bias=True):
    x = randn(*lead, n, dtype=dtype, g=g)
    V = randn(n, k, dtype=dtype, g=g, scale=max(n, 1) ** -0.5)
    U = randn(m, k, dtype=dtype, g=g, scale=max(k, 1) ** -0.5)
    b = randn(m, dtype=dtype, g=g) if bias else None
    return x, V, U, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(1,), (5,), (16,), (2, 20), (45,)], ids=lambda s: "M" + "x".join(map(str, s)))
@pytest.mark.parametrize("nmk", [(37, 29, 5), (70, 45, 33)], ids=lambda s: "n%d_m%d_k%d" % s)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lowrank_linear(dtype, lead, nmk, bias):
    n, m, k = nmk
    g = _gen((str(dtype), lead, nmk, bias))
    x, V, U, b = _ll_inputs(lead, n, m, k, dtype, g, bias)
    y = kernels.lowrank_forward(x, V, U, b)
    assert y.dtype == dtype and y.shape == (*lead, m)
    assert_close(y, _ll_ref(x, V, U, b), dtype, _ll_scale(x, V, U, b))


def test_lowrank_linear_1d_input():
    g = _gen(8)
    x, V, U, b = _ll_inputs((), 37, 29, 5, torch.float32, g)
    y = kernels.lowrank_forward(x, V, U, b)
    assert y.shape == (29,)
    assert_close(y, _ll_ref(x, V, U, b), torch.float32, _ll_scale(x, V, U, b))


@pytest.mark.parametrize("M,splits", [(1, 3), (4, 4), (8, 3), (16, 5), (3, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lowrank_linear_decode_splits(M, splits, dtype):
    """Split-K shrink: partials summed inside the expand (S·M <= 16) or by the reduce kernel."""
    g = _gen(9 + M + splits)
    x, V, U, b = _ll_inputs((M,), 70, 45, 33, dtype, g)
    y = ll_mod.lowrank_linear(x, V, U, b, splits=splits)
    assert_close(y, _ll_ref(x, V, U, b), dtype, _ll_scale(x, V, U, b))


def test_lowrank_linear_noncontiguous():
    g = _gen(10)
    n, m, k = 37, 29, 5
    for M in (3, 40):
        x = randn(n, M, g=g).T  # [M, n] with stride (1, M)
        V = randn(k, n, g=g, scale=n ** -0.5).T  # (n, k), column major
        U = randn(m, 2 * k, g=g, scale=k ** -0.5)[:, ::2]  # (m, k), column stride 2
        b = randn(2 * m, g=g)[::2]
        y = kernels.lowrank_forward(x, V, U, b)
        assert_close(y, _ll_ref(x, V, U, b), torch.float32, _ll_scale(x, V, U, b))


def test_lowrank_linear_deterministic():
    g = _gen(11)
    for M, splits in ((1, 4), (8, 4), (40, None)):
        x, V, U, b = _ll_inputs((M,), 70, 45, 33, torch.bfloat16, g)
        y1 = ll_mod.lowrank_linear(x, V, U, b, splits=splits)
        y2 = ll_mod.lowrank_linear(x, V, U, b, splits=splits)
        assert torch.equal(y1, y2)


def test_lowrank_linear_empty_rows_and_rank():
    g = _gen(12)
    x, V, U, b = _ll_inputs((0,), 37, 29, 5, torch.float32, g)
    assert kernels.lowrank_forward(x, V, U, b).shape == (0, 29)
    x, V, U, b = _ll_inputs((3,), 37, 29, 0, torch.float32, g)
    y = kernels.lowrank_forward(x, V, U, b)
    assert torch.equal(y, b.expand(3, 29))
    x, V, U, b = _ll_inputs((3,), 0, 29, 5, torch.float32, g)  # no input features
    assert torch.equal(kernels.lowrank_forward(x, V, U, b), b.expand(3, 29))
    A = torch.ones(4, 4, device=DEVICE)
    kernels.covariance_accumulate(A, None, None, torch.empty(0, 4, device=DEVICE), None, None)  # no rows: a no-op
    assert torch.equal(A, torch.ones(4, 4, device=DEVICE))


def _grouped_inputs(M, n, ms, ks, dtype, g, with_bias):
    x = randn(M, n, dtype=dtype, g=g)
    Vs = [randn(n, k, dtype=dtype, g=g, scale=n ** -0.5) for k in ks]
    Us = [randn(m, k, dtype=dtype, g=g, scale=k ** -0.5) for m, k in zip(ms, ks)]
    bs = [randn(m, dtype=dtype, g=g) if wb else None for m, wb in zip(ms, with_bias)]
    return x, Vs, torch.cat(Vs, dim=1), Us, bs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,splits", [(1, None), (1, 3), (8, 3), (40, None)])
def test_lowrank_linear_grouped(dtype, M, splits):
    g = _gen(13 + M)
    ms, ks = (29, 17, 17), (5, 3, 7)  # q/k/v-like: different outputs and ranks
    x, Vs, V_cat, Us, bs = _grouped_inputs(M, 37, ms, ks, dtype, g, (True, False, True))
    ys = ll_mod.lowrank_linear_grouped(x, V_cat, Us, bs, splits=splits)
    assert len(ys) == 3
    for y, V, U, b in zip(ys, Vs, Us, bs):
        assert y.dtype == dtype
        assert_close(y, _ll_ref(x, V, U, b), dtype, _ll_scale(x, V, U, b))


# --------------------------------------------------------------------------------------
# through the ops layer
# --------------------------------------------------------------------------------------
def test_ops_triton_backend_matches_reference():
    g = _gen(14)
    n = 37
    X = randn(2, 9, n, dtype=torch.bfloat16, g=g)
    Xp = randn(2, 9, n, dtype=torch.bfloat16, g=g)
    w = _weights("mask", 18, g)
    accs = {}
    for name in ("triton", "reference"):
        A, B, C = (torch.ones(n, n, device=DEVICE) for _ in range(3))
        A1 = torch.ones(n, n, device=DEVICE)
        with ops.backend(name):
            ops.covariance_accumulate(A, X, B=B, C=C, Xp=Xp, weight=w.reshape(2, 9))
            ops.covariance_accumulate(A1, X, weight=w)
        accs[name] = (A, B, C, A1)
    scale = _cov_scale(X, Xp, w)
    for a, r in zip(accs["triton"], accs["reference"]):
        assert_close(a, r, torch.float32, scale)

    x, V, U, b = _ll_inputs((2, 3), n, 29, 5, torch.bfloat16, g)
    with ops.backend("triton"):
        y = ops.lowrank_linear(x, V, U, b)
    assert_close(y, _ll_ref(x, V, U, b), torch.bfloat16, _ll_scale(x, V, U, b))

    x, Vs, V_cat, Us, bs = _grouped_inputs(4, n, (29, 11), (5, 6), torch.float32, g, (False, True))
    with ops.backend("triton"):
        ys = ops.lowrank_linear_grouped(x, V_cat, Us, bs)
    for y, V, U, b in zip(ys, Vs, Us, bs):
        assert_close(y, _ll_ref(x, V, U, b), torch.float32, _ll_scale(x, V, U, b))


def _opcheck(op, args):
    # The faketensor / schema / autograd-registration checks; skip the slow aot_dispatch_dynamic compile.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_triton_backend():
    g = _gen(15)
    n = 37
    with ops.backend("triton"):
        for M in (1, 20):
            x, V, U, b = _ll_inputs((M,), n, 29, 5, torch.float32, g)
            _opcheck(torch.ops.lowrank_engine.lowrank_linear.default, (x, V, U, b))
            _opcheck(torch.ops.lowrank_engine.lowrank_linear.default, (x, V, U, None))
        x, _, V_cat, Us, bs = _grouped_inputs(3, n, (29, 11), (5, 6), torch.float32, g, (True, False))
        _opcheck(torch.ops.lowrank_engine.lowrank_linear_grouped.default, (x, V_cat, Us, bs))
        X = randn(11, n, g=g)
        Xp = randn(11, n, g=g)
        w = _weights("mask", 11, g)
        A, B, C = (torch.zeros(n, n, device=DEVICE) for _ in range(3))
        _opcheck(torch.ops.lowrank_engine.covariance_accumulate.default, (A, X, w))
        _opcheck(torch.ops.lowrank_engine.covariance_accumulate_pair.default, (A, B, C, X, Xp, w))


def test_opcheck_aot_dispatch():
    """The full opcheck (incl. aot_dispatch_dynamic) on one small case per op."""
    g = _gen(16)
    n = 37
    with ops.backend("triton"):
        x, V, U, b = _ll_inputs((3,), n, 29, 5, torch.float32, g)
        torch.library.opcheck(torch.ops.lowrank_engine.lowrank_linear.default, (x, V, U, b))
        X = randn(11, n, g=g)
        A = torch.zeros(n, n, device=DEVICE)
        torch.library.opcheck(torch.ops.lowrank_engine.covariance_accumulate.default, (A, X, None))


# --------------------------------------------------------------------------------------
# every autotune config (on a GPU the tuner may pick any of them for some shape)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,index", [(kind, i) for kind, (_, configs) in TUNED.items() for i in range(len(configs))],
                         ids=lambda v: str(v))
def test_every_autotune_config_matches_float64(kind, index, monkeypatch):
    """One config forced at a time, on odd shapes that leave partial tiles for every block size (up to
    256 on a GPU, 32 under the interpreter)."""
    tuner, configs = TUNED[kind]
    monkeypatch.setattr(tuner, "configs", [configs[index]])  # a single config: used as is, no timing
    monkeypatch.setattr(tuner, "cache", {})
    g = _gen((kind, index))
    if kind.startswith("covariance"):
        pair = kind == "covariance_pair"
        n, N = (150, 301) if DEVICE == "cuda" else (67, 45)
        X = randn(N, n, dtype=torch.bfloat16, g=g)
        Xp = randn(N, n, dtype=torch.bfloat16, g=g) if pair else None
        w = _weights("real", N, g)
        accs0 = [randn(n, n, g=g) for _ in range(3 if pair else 1)]
        accs = [a.clone() for a in accs0]
        kernels.covariance_accumulate(*(accs + [None, None])[:3], X, Xp, w)
        scale = _cov_scale(X, Xp, w)
        for acc, acc0, ref in zip(accs, accs0, _cov_ref(X, Xp, w)):
            assert_close(acc, acc0.double().cpu() + ref, torch.float32, scale)
        return
    tokens = (1, 5, 16) if kind.endswith("decode") else ((150,) if DEVICE == "cuda" else (40,))
    n, m, k = (300, 203, 70) if DEVICE == "cuda" else (70, 45, 33)
    for dtype in (torch.bfloat16, torch.float32):
        for M in tokens:
            x, V, U, b = _ll_inputs((M,), n, m, k, dtype, g)
            y = kernels.lowrank_forward(x, V, U, b)
            assert_close(y, _ll_ref(x, V, U, b), dtype, _ll_scale(x, V, U, b))


# --------------------------------------------------------------------------------------
# random odd shapes
# --------------------------------------------------------------------------------------
try:
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(M=st.integers(1, 40), n=st.integers(1, 70), m=st.integers(1, 50), k=st.integers(1, 40),
           bias=st.booleans(), splits=st.sampled_from([None, 1, 2, 5]))
    def test_lowrank_linear_random_shapes(M, n, m, k, bias, splits):
        g = _gen(M * 100003 + n * 1009 + m * 101 + k)
        x, V, U, b = _ll_inputs((M,), n, m, k, torch.float32, g, bias)
        y = ll_mod.lowrank_linear(x, V, U, b, splits=splits)
        assert_close(y, _ll_ref(x, V, U, b), torch.float32, _ll_scale(x, V, U, b))

    @settings(max_examples=10, deadline=None, derandomize=True)
    @given(N=st.integers(1, 60), n=st.integers(1, 70), pair=st.booleans(), masked=st.booleans(),
           splits=st.sampled_from([None, 2, 4]))
    def test_covariance_random_shapes(N, n, pair, masked, splits):
        g = _gen(N * 1009 + n)
        X = randn(N, n, g=g)
        Xp = randn(N, n, g=g) if pair else None
        w = _weights("mask" if masked else None, N, g)
        accs0 = [randn(n, n, g=g) for _ in range(3 if pair else 1)]
        accs = [a.clone() for a in accs0]
        A, B, C = (accs + [None, None])[:3]
        cov_mod.covariance_accumulate(A, B, C, X, Xp, w, splits=splits)
        scale = _cov_scale(X, Xp, w) + 1.0
        for acc, acc0, ref in zip(accs, accs0, _cov_ref(X, Xp, w)):
            assert_close(acc, acc0.double().cpu() + ref, torch.float32, scale)
except ImportError:  # hypothesis is a dev extra
    pass


# --------------------------------------------------------------------------------------
# compiled (non-interpreted) mode: build every kernel for sm_90 without a GPU
# --------------------------------------------------------------------------------------
_AOT_SCRIPT = r'''
import importlib, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cov = importlib.import_module("lowrank_engine.kernels.covariance")
ll = importlib.import_module("lowrank_engine.kernels.lowrank_linear")
assert not cov.INTERPRET and not ll.INTERPRET

def build(fn, ptrs, consts, cfg):
    consts = {**consts, **cfg.kwargs}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "i32") for a in fn.arg_names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})

for dt in ("bf16", "fp32"):
    f32 = dt == "fp32"
    for pair, cfg in ((False, cov._SINGLE_CONFIGS[0]), (True, cov._PAIR_CONFIGS[0])):
        ptrs = dict(X="*" + dt, XP="*" + dt, W="*fp32", A="*fp32", B="*fp32", C="*fp32")
        build(cov._covariance_kernel.fn, ptrs, dict(PAIR=pair, HAS_W=True, DOT_F32=f32, ACCUMULATE=True), cfg)
    ptrs = dict(X="*" + dt, V="*" + dt, T="*fp32")
    build(ll._shrink_kernel, ptrs, dict(DOT_F32=f32, BLOCK_M=16, BLOCK_K=ll._DECODE_BLOCK_K, GROUP_M=1),
          ll._SHRINK_DECODE_CONFIGS[0])
    build(ll._shrink_kernel, {**ptrs, "T": "*" + dt}, dict(DOT_F32=f32), ll._SHRINK_PREFILL_CONFIGS[0])
    ptrs = dict(T="*fp32", U="*" + dt, BIAS="*" + dt, Y="*" + dt)
    build(ll._expand_kernel, ptrs, dict(SPLITS=4, HAS_BIAS=True, DOT_F32=f32, BLOCK_M=16, GROUP_M=1),
          ll._EXPAND_DECODE_CONFIGS[0])
    build(ll._expand_kernel, {**ptrs, "T": "*" + dt}, dict(SPLITS=1, HAS_BIAS=False, DOT_F32=f32),
          ll._EXPAND_PREFILL_CONFIGS[0])
build(ll._splitk_reduce_kernel, dict(P="*fp32", T="*fp32"), dict(BLOCK=1024), triton.Config({}, num_warps=4))
print("AOT-OK")
'''


@pytest.mark.skipif(os.environ.get("LOWRANK_ENGINE_SKIP_AOT") == "1", reason="LOWRANK_ENGINE_SKIP_AOT=1")
def test_kernels_compile_for_sm90():
    """The interpreter does not run Triton's compiler front end; compile the real kernels for Hopper."""
    import subprocess
    import sys

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("Triton without the NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "AOT-OK" in r.stdout, r.stderr[-4000:]
