"""The ops layer: references against float64, schemas (opcheck), torch.compile, input checks."""
import pytest
import torch

from lowrank_engine import ops
from lowrank_engine.modules import LowRankLinear

from conftest import devices


@pytest.fixture(autouse=True)
def reference_backend():
    with ops.backend("reference"):
        yield


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lowrank_linear_reference_against_float64(dtype, device):
    x = torch.randn(3, 5, 37)
    V, U, b = torch.randn(37, 5), torch.randn(29, 5), torch.randn(29)
    y = ops.lowrank_linear(*(t.to(device, dtype) for t in (x, V, U, b)))
    assert y.device.type == device
    y = y.cpu()
    ref = (x.double() @ V.double()) @ U.double().T + b.double()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("wanted", [(True, True, True, True), (False, True, True, False), (True, False, False, True),
                                    (False, False, True, False)])
def test_lowrank_linear_backward_against_float64(wanted, device):
    """The op's autograd formula (any subset of inputs needing gradients) matches autograd through
    the float64 composite, and gives None where no gradient is wanted."""
    x, V, U, b = (torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=w)
                  for shape, w in zip([(2, 7, 31), (31, 6), (23, 6), (23,)], wanted))
    grad = torch.randn(2, 7, 23, dtype=torch.float64, device=device)
    inputs = [t for t in (x, V, U, b) if t.requires_grad]
    got = torch.autograd.grad(ops.lowrank_linear(x, V, U, b), inputs, grad)
    ref = torch.autograd.grad((x @ V) @ U.T + b, inputs, grad)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: ops.lowrank_linear(*t), (x, V, U, b))


def test_lowrank_module_training_path_matches_the_op():
    """LowRankLinear trains through native autograd; values and gradients equal the op's."""
    torch.manual_seed(1)
    module = LowRankLinear.from_factors(torch.randn(23, 6, dtype=torch.float64), torch.randn(31, 6, dtype=torch.float64),
                                        torch.randn(23, dtype=torch.float64))
    x = torch.randn(3, 5, 31, dtype=torch.float64, requires_grad=True)
    y = module(x)
    grads = torch.autograd.grad(y.square().sum(), (x, module.U, module.V, module.bias))
    y_op = ops.lowrank_linear(x, module.V, module.U, module.bias)
    grads_op = torch.autograd.grad(y_op.square().sum(), (x, module.U, module.V, module.bias))
    torch.testing.assert_close(y, y_op, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, grads_op):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)


def test_grouped_shares_one_shrink():
    x = torch.randn(4, 19, dtype=torch.float64)
    Us = [torch.randn(7, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)]
    V_cat = torch.randn(19, 5, dtype=torch.float64)
    ys = ops.lowrank_linear_grouped(x, V_cat, Us, [None, torch.randn(5, dtype=torch.float64)])
    torch.testing.assert_close(ys[0], x @ V_cat[:, :3] @ Us[0].T)
    with pytest.raises(ValueError, match="add up"):
        ops.lowrank_linear_grouped(x, V_cat, Us[:1])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("weighted", [False, True])
def test_covariance_reference_against_float64(weighted, device):
    X, Xp = torch.randn(2, 13, 11), torch.randn(2, 13, 11)
    w = torch.rand(2, 13) if weighted else None
    A0, B0, C0 = (torch.randn(11, 11) for _ in range(3))
    A, B, C = (t.clone().to(device) for t in (A0, B0, C0))
    ops.covariance_accumulate(A, X.to(device), B, C, Xp.to(device), weight=None if w is None else w.to(device))
    A, B, C = A.cpu(), B.cpu(), C.cpu()
    x, xp = X.reshape(-1, 11).double(), Xp.reshape(-1, 11).double()
    ww = torch.ones(26, dtype=torch.float64) if w is None else w.reshape(-1).double()
    torch.testing.assert_close(A.double(), A0.double() + (x * ww[:, None]).T @ x, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(B.double(), B0.double() + (xp * ww[:, None]).T @ xp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(C.double(), C0.double() + (x * ww[:, None]).T @ xp, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_a", [True, False])
def test_covariance_symmetric_panels_against_float64(with_a, device):
    """Statistics wide enough for the panelled symmetric GEMM (n ≥ 512, odd) and the A-less pair form."""
    n, tokens = 523, 301
    X, Xp = torch.randn(tokens, n), torch.randn(tokens, n) * 3 + 0.5
    M1, M2 = torch.randn(n, n), torch.randn(n, n)
    A0, B0, C0 = M1 + M1.T, M2 + M2.T, torch.randn(n, n)  # accumulators hold symmetric sums
    A, B, C = A0.clone().to(device) if with_a else None, B0.clone().to(device), C0.clone().to(device)
    ops.covariance_accumulate(A, X.to(device), B, C, Xp.to(device))
    A, B, C = A.cpu() if with_a else None, B.cpu(), C.cpu()
    x, xp = X.double(), Xp.double()
    if with_a:
        torch.testing.assert_close(A.double(), A0.double() + x.T @ x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(B.double(), B0.double() + xp.T @ xp, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(C.double(), C0.double() + x.T @ xp, rtol=1e-5, atol=1e-3)


def test_covariance_rejects_bad_input():
    with pytest.raises(ValueError, match="two-stream"):
        ops.covariance_accumulate(None, torch.randn(4, 3))
    with pytest.raises(ValueError, match="float32"):
        ops.covariance_accumulate(torch.zeros(3, 3, dtype=torch.float64), torch.randn(4, 3))
    with pytest.raises(ValueError, match="features"):
        ops.covariance_accumulate(torch.zeros(3, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="both B and C"):
        ops.covariance_accumulate(torch.zeros(3, 3), torch.randn(4, 3), B=torch.zeros(3, 3), Xp=torch.randn(4, 3))
    with pytest.raises(ValueError, match="weight"):
        ops.covariance_accumulate(torch.zeros(3, 3), torch.randn(4, 3), weight=torch.ones(5))


def test_opcheck_reference_ops():
    x, V, U, b = torch.randn(2, 6, 9), torch.randn(9, 4), torch.randn(7, 4), torch.randn(7)
    torch.library.opcheck(torch.ops.lowrank_engine.lowrank_linear.default, (x, V, U, b))
    torch.library.opcheck(torch.ops.lowrank_engine.lowrank_linear_grouped.default,
                          (x, V, [U[:, :2], U[:3, 2:]], [None, b[:3]]))
    X, Xp = torch.randn(10, 5), torch.randn(10, 5)
    torch.library.opcheck(torch.ops.lowrank_engine.covariance_accumulate.default,
                          (torch.randn(5, 5), X, torch.rand(10)))
    torch.library.opcheck(torch.ops.lowrank_engine.covariance_accumulate_pair.default,
                          (torch.randn(5, 5), torch.randn(5, 5), torch.randn(5, 5), X, Xp, None))
    torch.library.opcheck(torch.ops.lowrank_engine.covariance_accumulate_pair.default,
                          (None, torch.randn(5, 5), torch.randn(5, 5), X, Xp, None))
    H = torch.randn(2, 6, 6, dtype=torch.float64)
    H = H @ H.mT
    torch.library.opcheck(torch.ops.lowrank_engine.whiten.default, (H, 1e-6))


def test_compiled_model_with_lowrank_linear_fullgraph():
    torch._dynamo.reset()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = LowRankLinear.from_factors(torch.randn(16, 3), torch.randn(12, 3), torch.randn(16))
            self.b = LowRankLinear.from_factors(torch.randn(5, 2), torch.randn(16, 2))

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Net()
    x = torch.randn(2, 7, 12)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), net(x))


def test_whiten_reference_against_float64_eigh():
    X = torch.randn(10, 24, dtype=torch.float64)  # rank-deficient: 10 tokens, 24 features
    H = (X.T @ X).unsqueeze(0)
    L, L_inv, evals, clamped, count, info = ops.whiten_reference(H, 1e-6)
    ref_evals = torch.linalg.eigvalsh(H[0])
    torch.testing.assert_close(evals[0], ref_evals)
    torch.testing.assert_close(clamped[0], ref_evals.clamp_min(1e-6 * ref_evals.max()))
    assert int(count[0]) == int((ref_evals < 1e-6 * ref_evals.max()).sum()) >= 14
    torch.testing.assert_close(L[0] @ L[0].T, H[0] + (L[0] @ L[0].T - H[0]).detach() * 0, atol=1e-6 * float(ref_evals.max()),
                               rtol=0)
    torch.testing.assert_close(L_inv[0] @ L[0], torch.eye(24, dtype=torch.float64))
    assert torch.isfinite(L).all() and torch.isfinite(L_inv).all()


# --------------------------------------------------------------------------------------
# which path the ops take (safe defaults until the device suite has passed on a GPU)
# --------------------------------------------------------------------------------------
@pytest.fixture
def kernels_runnable():
    if ops._triton_kernels() is None:
        pytest.skip("Triton kernels cannot run here")


def test_auto_keeps_cuda_tensors_on_the_reference_until_verified(monkeypatch, kernels_runnable):
    monkeypatch.setattr(ops, "GPU_PATHS_VERIFIED", False)
    monkeypatch.setattr(ops, "EXTENSION_HAS_CUDA", True)
    with ops.backend("auto"):
        assert not ops._use_triton_on("cuda") and not ops._extension_whitens_on("cuda")
        paths = ops.active_paths()
        assert paths["cuda"] == {"kernels": "PyTorch reference", "whitening": "PyTorch reference"}
        assert "LOWRANK_ENGINE_BACKEND=accelerated" in paths["why"]
        monkeypatch.setattr(ops, "GPU_PATHS_VERIFIED", True)  # the flip, once the suite has passed
        assert ops._use_triton_on("cuda") and ops._extension_whitens_on("cuda")
        assert ops.active_paths()["cuda"] == {"kernels": "Triton kernels", "whitening": "C++ extension"}
        monkeypatch.setattr(ops, "EXTENSION_HAS_CUDA", False)  # auto falls back where a path is missing
        monkeypatch.setattr(ops, "_triton_kernels", lambda: None)
        assert not ops._use_triton_on("cuda") and not ops._extension_whitens_on("cuda")


@pytest.mark.parametrize("verified", [False, True])
def test_cpu_tensors_keep_their_paths_whatever_the_backend(monkeypatch, verified):
    """CPU covariance / low-rank linear stay on the reference outside backend "triton"; CPU whitening
    is the extension whenever it is loaded (the path CI tests)."""
    monkeypatch.setattr(ops, "GPU_PATHS_VERIFIED", verified)
    for name in ("auto", "accelerated", "reference"):
        with ops.backend(name):
            assert not ops._use_triton_on("cpu")
            assert ops._extension_whitens_on("cpu") == (ops.EXTENSION_PATH is not None)


def test_accelerated_is_the_opt_in_and_says_what_is_missing(monkeypatch, kernels_runnable):
    monkeypatch.setattr(ops, "GPU_PATHS_VERIFIED", False)
    with ops.backend("accelerated"):
        assert ops._use_triton_on("cuda")
        monkeypatch.setattr(ops, "EXTENSION_HAS_CUDA", False)
        with pytest.raises(RuntimeError, match="CUDA whitening"):
            ops._extension_whitens_on("cuda")
        assert ops.active_paths()["cuda"]["whitening"].startswith("unavailable: ")
        monkeypatch.setattr(ops, "EXTENSION_HAS_CUDA", True)
        assert ops._extension_whitens_on("cuda")
    with ops.backend("reference"):
        assert not ops._use_triton_on("cuda") and not ops._extension_whitens_on("cuda")
    with ops.backend("triton"):  # the kernels everywhere; whitening as auto
        assert ops._use_triton_on("cpu") and ops._use_triton_on("cuda") and not ops._extension_whitens_on("cuda")


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="accelerated"):
        ops.set_backend("fast")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["auto", "reference", "accelerated"])
def test_cuda_whitening_takes_the_path_the_backend_names(name, monkeypatch):
    """On CUDA tensors ops.whiten_ex calls the reference unless the GPU paths are wanted; either way
    the factors match float64 eigh."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "accelerated" and not ops.extension_info()["cuda"]:
        pytest.skip("the extension has no CUDA kernels")
    calls = []
    reference = ops.whiten_reference
    monkeypatch.setattr(ops, "whiten_reference", lambda H, eps: calls.append(H.device) or reference(H, eps))
    X = torch.randn(3, 90, 37, dtype=torch.float64)
    H = (X.mT @ X).float()
    with ops.backend(name):
        L, L_inv, evals, clamped, count, info = ops.whiten_ex(H.cuda())
    assert bool(calls) == (not ops.GPU_PATHS_VERIFIED if name == "auto" else name == "reference")
    ref = torch.linalg.eigvalsh(H.double())
    torch.testing.assert_close(evals.cpu().double(), ref, rtol=0, atol=1e-5 * float(ref.max()))
    torch.testing.assert_close((L @ L.mT).cpu().double(), H.double(), rtol=0, atol=1e-5 * float(ref.max()))
    torch.testing.assert_close((L_inv @ L).cpu().double(), torch.eye(37, dtype=torch.float64).expand(3, 37, 37),
                               rtol=0, atol=1e-4)
