"""The one solver reaches the closed-form optimum; methods are coefficient sets."""
import math

import pytest
import torch

from lowrank_engine import solvers


def random_spd(n, tokens=None, dtype=torch.float64):
    X = torch.randn(tokens or 3 * n, n, dtype=dtype)
    X[:, 0] *= 30.0  # an outlier channel
    return X.T @ X


@pytest.mark.parametrize("m,n,k", [(23, 17, 5), (17, 31, 9), (40, 40, 1)])
@pytest.mark.parametrize("deficient", [False, True])
def test_solver_reaches_eckart_young_minimum(m, n, k, deficient):
    W = torch.randn(m, n, dtype=torch.float64)
    if deficient:  # fewer tokens than features: H is rank-deficient; P lies in its range
        X = torch.randn(n // 2, n, dtype=torch.float64)
        H = X.T @ X
        P = W @ H
    else:
        H = random_spd(n)
        P = W @ random_spd(n) @ torch.randn(n, n, dtype=torch.float64) * 0.1 + W @ H
    f = solvers.solve(W, H, P, k, eps_rel=1e-12)
    Wp = f.U @ f.V.T
    measured = float(solvers.objective(Wp, H, P))
    theoretical = -float((f.sigma[:k] ** 2).sum())
    assert measured == pytest.approx(theoretical, rel=1e-6)
    # loss above the unconstrained optimum is exactly the truncated energy Σ_{i>k} σ²
    assert f.truncation_loss == pytest.approx(float((f.sigma[k:] ** 2).sum()))
    assert f.U.shape == (m, k) and f.V.shape == (n, k)


def test_solver_beats_random_rank_k_perturbations():
    m, n, k = 19, 13, 4
    W, H = torch.randn(m, n, dtype=torch.float64), random_spd(n)
    P = W @ H
    f = solvers.solve(W, H, P, k)
    best = float(solvers.objective(f.U @ f.V.T, H, P))
    for _ in range(20):
        U = f.U + 1e-3 * torch.randn_like(f.U)
        V = f.V + 1e-3 * torch.randn_like(f.V)
        assert float(solvers.objective(U @ V.T, H, P)) >= best - 1e-9


def test_plain_svd_is_truncated_svd():
    W = torch.randn(30, 20, dtype=torch.float64)
    f = solvers.solve(W, None, None, 6)
    U, S, Vh = torch.linalg.svd(W)
    ref = (U[:, :6] * S[:6]) @ Vh[:6]
    torch.testing.assert_close(f.U @ f.V.T, ref)


def test_svd_llm_equals_aa_svd_without_shift():
    """With X' = X the anchored objective reduces to SVD-LLM (DESIGN §1)."""
    n, m, k = 16, 12, 5
    X = torch.randn(200, n, dtype=torch.float64)
    A = X.T @ X
    stats = solvers.GroupStatistics(A=A, B=A.clone(), C=A.clone())
    W = {"w": torch.randn(m, n, dtype=torch.float64)}
    a = solvers.solve_group(solvers.get_method("svd-llm"), W, {"w": k}, stats)["w"]
    b = solvers.solve_group(solvers.get_method("aa-svd"), W, {"w": k}, stats)["w"]
    torch.testing.assert_close(a.U @ a.V.T, b.U @ b.V.T)


def test_methods_are_coefficient_sets():
    table = {"svd-llm": (1, 0, 1, 0, 0), "shift-aware": (0, 1, 0, 0, 1), "aa-svd": (0, 1, 0, 1, 0)}
    for name, coeffs in table.items():
        c = solvers.get_method(name).coefficients
        assert (c.a, c.b, c.c, c.d, c.e) == coeffs
    assert solvers.cealc(2.0) == solvers.Coefficients(0, 3.0, 0, 2.0, 1)
    with pytest.raises(ValueError, match="unknown method"):
        solvers.get_method("nope")


def _two_stream_stats(n, shift=0.3):
    X = torch.randn(300, n, dtype=torch.float64)
    Xp = X + shift * torch.randn_like(X)
    return X, Xp, solvers.GroupStatistics(A=X.T @ X, B=Xp.T @ Xp, C=X.T @ Xp)


@pytest.mark.parametrize("search", ["exact", "fixed"])
def test_saes_matches_cealc_at_its_chosen_beta(search):
    n, m, k = 14, 11, 4
    _, _, stats = _two_stream_stats(n)
    W = torch.randn(m, n, dtype=torch.float64)
    f = solvers.solve_group(solvers.get_method("saes"), {"w": W}, {"w": k}, stats, beta_search=search)["w"]
    assert 0.0 <= f.beta <= solvers.BETA_MAX
    c = solvers.cealc(f.beta)
    H = c.b * stats.B
    P = W @ (c.d * stats.C + c.e * stats.B)
    direct = solvers.solve(W, H, P, k)
    torch.testing.assert_close(f.U @ f.V.T, direct.U @ direct.V.T)
    measured = float(solvers.objective(f.U @ f.V.T, H, P))
    assert measured == pytest.approx(-float((direct.sigma[:k] ** 2).sum()), rel=1e-6)


def test_aces_exact_search_finds_grid_maximum():
    n, m, k = 12, 10, 3
    _, _, stats = _two_stream_stats(n, shift=0.8)
    W = torch.randn(m, n, dtype=torch.float64)
    (white,) = solvers.whiten_many([stats.B])
    G0, G1 = W @ stats.B @ white.L_inv_T, W @ stats.C @ white.L_inv_T

    def rer(beta):
        s = torch.linalg.svdvals(G0 + beta * G1) ** 2
        return float(s[:k].sum() / s.sum())

    beta = solvers.aces_exact(G0, G1, k)
    dense_grid = max(rer(b) for b in torch.linspace(0, solvers.BETA_MAX, 400).tolist())
    assert rer(beta) >= dense_grid - 1e-4
    fixed = solvers.aces_fixed_subspace(G0, G1, k)
    assert 0.0 <= fixed <= solvers.BETA_MAX and math.isfinite(fixed)


def test_rank_rules():
    assert solvers.rank_for_ratio(576, 576, 0.2) == math.floor(0.8 * 576 * 576 / 1152)
    for ratio in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            solvers.rank_for_ratio(10, 10, ratio)
    with pytest.raises(ValueError, match="break-even"):
        solvers.check_rank("w", 100, 100, 50)
    with pytest.raises(ValueError, match="min"):
        solvers.check_rank("w", 100, 10, 10)
    solvers.check_rank("w", 100, 100, 49)
    # any ratio in (0,1) stays below break-even
    for m, n in [(576, 192), (1536, 576), (7, 5)]:
        for ratio in (0.01, 0.5, 0.99):
            k = solvers.rank_for_ratio(m, n, ratio)
            assert k * (m + n) < m * n or k == 1


@pytest.mark.parametrize("stat", ["absmean", "absmax"])
def test_asvd_reaches_the_diagonal_metric_optimum(stat):
    """ASVD is the solver with H = diag(s)², P = W H (DESIGN §1): same closed-form optimum."""
    m, n, k = 21, 15, 4
    W = torch.randn(m, n, dtype=torch.float64)
    X = torch.randn(90, n, dtype=torch.float64) * torch.rand(n, dtype=torch.float64) * 5
    X[:, 2] *= 40.0  # an outlier channel: ASVD's reason to exist
    method = solvers.get_method("asvd" if stat == "absmean" else "asvd-max")
    D = X.abs().sum(0) if stat == "absmean" else X.abs().amax(0)
    stats = solvers.GroupStatistics(D=D, tokens=X.shape[0])
    f = solvers.solve_group(method, {"w": W}, {"w": k}, stats)["w"]
    s = (X.abs().mean(0) if stat == "absmean" else X.abs().amax(0)) ** 0.5
    H = torch.diag(s ** 2)
    P = W @ H
    theoretical = -float((torch.linalg.svdvals(W * s)[:k] ** 2).sum())
    assert float(solvers.objective(f.U @ f.V.T, H, P)) == pytest.approx(theoretical, rel=1e-9)
    # and it matches the generic eigh-whitened solver on the same metric
    g = solvers.solve(W, H, P, k, eps_rel=1e-12)
    torch.testing.assert_close(f.U @ f.V.T, g.U @ g.V.T)


def _shifted_stats(n, shift):
    X = torch.randn(160, n, dtype=torch.float64)
    X[:, 1] *= 20.0
    Xp = X + shift * torch.randn_like(X)
    return X, Xp, solvers.GroupStatistics(A=X.T @ X, B=Xp.T @ Xp, C=X.T @ Xp)


def test_erc_without_shift_is_one_truncation():
    """Same metric in both stages (X' = X) adds nothing beyond Eckart–Young: ERC = SVD-LLM at rank k."""
    m, n, k = 18, 14, 6
    W = torch.randn(m, n, dtype=torch.float64)
    _, _, stats = _shifted_stats(n, 0.0)
    erc = solvers.solve_group(solvers.get_method("erc-svd"), {"w": W}, {"w": k}, stats, eps_rel=1e-12)["w"]
    ref = solvers.solve_group(solvers.get_method("svd-llm"), {"w": W}, {"w": k}, stats, eps_rel=1e-12)["w"]
    assert erc.U.shape == (m, k) and erc.V.shape == (n, k)
    torch.testing.assert_close(erc.U @ erc.V.T, ref.U @ ref.V.T)


@pytest.mark.parametrize("stage2", ["aa-svd", "shift-aware"])
def test_erc_residual_stage_reaches_its_optimum(stage2):
    m, n, k = 20, 16, 8
    W = torch.randn(m, n, dtype=torch.float64)
    X, Xp, stats = _shifted_stats(n, 0.3)
    method = solvers.get_method("erc-svd")
    f = solvers.solve_group(method, {"w": W}, {"w": k}, stats, eps_rel=1e-12, residual_split=0.5,
                            residual_stage2=stage2)["w"]
    stage1 = solvers.solve_group(solvers.get_method("svd-llm"), {"w": W}, {"w": 4}, stats, eps_rel=1e-12)["w"]
    W1 = stage1.U @ stage1.V.T
    torch.testing.assert_close(f.U[:, :4] @ f.V[:, :4].T, W1)  # stage 1 is SVD-LLM at k₁ = 4
    R = f.U[:, 4:] @ f.V[:, 4:].T
    # stage 2's own error, written from the data: aa-svd anchors WX, shift-aware fits WX', both on X'
    target = X @ W.T if stage2 == "aa-svd" else Xp @ W.T
    err = lambda Wp: float((target - Xp @ Wp.T).pow(2).sum())  # noqa: E731
    # the gain over stage 1 alone is exactly the closed-form optimum −Σ_{i≤k₂} σ_i² of stage 2
    assert err(W1 + R) - err(W1) == pytest.approx(-float((f.sigma[:4] ** 2).sum()), rel=1e-8)
    # and no other rank-4 residual does better
    for _ in range(5):
        Q = (f.U[:, 4:] + 1e-3 * torch.randn(m, 4, dtype=torch.float64)) @ \
            (f.V[:, 4:] + 1e-3 * torch.randn(n, 4, dtype=torch.float64)).T  # still rank 4
        assert err(W1 + Q) >= err(W1 + R) - 1e-9


def test_column_fisher_matches_per_batch_gradients():
    from conftest import tiny_model
    from lowrank_engine import fisher

    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    f = fisher.column_fisher(model, ids, batch_size=1, progress=False)
    ref = torch.zeros(48, dtype=torch.float64)
    W = model.model.layers[0].self_attn.q_proj.weight
    for i in range(3):
        model.zero_grad()
        model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        ref += W.grad.double().pow(2).sum(0)
    torch.testing.assert_close(f["model.layers.0.self_attn.q_proj"], ref)
    layer = model.model.layers[0]
    assert {k: v.shape[0] for k, v in f.items()} == {
        f"model.layers.0.{n}": layer.get_submodule(n).in_features for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")}
    assert all(float(v.min()) >= 0 and float(v.max()) > 0 for v in f.values())
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored


@pytest.mark.parametrize("m,n,k", [(37, 23, 7), (23, 37, 7), (29, 29, 11)])
def test_gram_svd_matches_lapack(m, n, k, monkeypatch):
    """The Gram-eigh path (fp64 past 128, fp32 past 2048) gives LAPACK's σ and the same rank-k truncation."""
    G = torch.randn(m, n, dtype=torch.float64) * torch.logspace(0, -3, n, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    monkeypatch.setitem(solvers.GRAM_SVD_MIN, torch.float64, 8)
    Uk, S2, Vk = solvers.top_svd(G, k)
    torch.testing.assert_close(S2, S, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((Uk * S2[:k]) @ Vk.mT, (U[:, :k] * S[:k]) @ Vh[:k], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(Uk.mT @ Uk, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("m,n,k", [(13, 31, 6), (19, 19, 8), (5, 41, 2)])
@pytest.mark.parametrize("deficient", [False, True])
def test_output_side_solve_reaches_the_whitened_optimum(m, n, k, deficient):
    """P = W·H objectives solved from W·H·Wᵀ (no whitening) reach the same optimum, Σ_{i>k} σ² included."""
    W = torch.randn(m, n, dtype=torch.float64)
    H = (lambda X: X.T @ X)(torch.randn(n // 2, n, dtype=torch.float64)) if deficient else random_spd(n)
    P = W @ H
    ref = solvers.solve(W, H, P, k, eps_rel=1e-14)
    f = solvers.solve_output_side(W, H, k)
    assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all()
    optimum = -float((ref.sigma[:k] ** 2).sum())
    assert float(solvers.objective(f.U @ f.V.T, H, P)) == pytest.approx(optimum, rel=1e-8)
    torch.testing.assert_close(f.sigma, ref.sigma[: f.sigma.numel()], rtol=1e-6, atol=1e-6 * float(ref.sigma[0]))
    assert f.truncation_loss == pytest.approx(ref.truncation_loss, rel=1e-6, abs=1e-9 * float(ref.sigma[0]) ** 2)
    # balanced columns: bf16 storage sees neither a tiny U nor a huge V
    torch.testing.assert_close(f.U.norm(dim=0), f.V.norm(dim=0))


def test_output_side_is_chosen_only_for_p_equals_w_h():
    wide, tall = [(8, 16), (16, 16)], [(32, 16)]
    get = solvers.get_method
    assert solvers.output_side(get("svd-llm"), wide) and solvers.output_side(get("shift-aware"), wide)
    assert not solvers.output_side(get("svd-llm"), tall)  # its m×m eigh would be the larger one
    for name in ("aa-svd", "saes", "erc-svd", "asvd", "svd"):
        assert not solvers.output_side(get(name), wide)


def test_output_side_group_equals_whitened_group(monkeypatch):
    """solve_group picks the output side for svd-llm's wide groups; the factors' product is unchanged."""
    n = 24
    stats = solvers.GroupStatistics(A=random_spd(n))
    W = {"q": torch.randn(n, n, dtype=torch.float64), "k": torch.randn(7, n, dtype=torch.float64)}
    ranks = {"q": 9, "k": 3}
    method = solvers.get_method("svd-llm")
    fast = solvers.solve_group(method, W, ranks, stats, eps_rel=1e-14)
    monkeypatch.setattr(solvers, "output_side", lambda *a: False)
    slow = solvers.solve_group(method, W, ranks, stats, eps_rel=1e-14)
    for name in W:
        torch.testing.assert_close(fast[name].U @ fast[name].V.T, slow[name].U @ slow[name].V.T, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("outs", [(5, 7), (13, 11)])  # Σm < n: W·M first; Σm ≥ n: M·L⁻ᵀ shared
def test_group_product_order_reaches_the_same_optimum(outs):
    n, k = 20, 4
    X = torch.randn(300, n, dtype=torch.float64)
    Xp = X + 0.3 * torch.randn(300, n, dtype=torch.float64)
    stats = solvers.GroupStatistics(A=X.T @ X, B=Xp.T @ Xp, C=X.T @ Xp)
    Ws = {f"w{i}": torch.randn(m, n, dtype=torch.float64) for i, m in enumerate(outs)}
    got = solvers.solve_group(solvers.get_method("aa-svd"), Ws, {name: k for name in Ws}, stats, eps_rel=1e-12)
    for name, W in Ws.items():
        ref = solvers.solve(W, stats.B, W @ stats.C, k, eps_rel=1e-12)
        torch.testing.assert_close(got[name].sigma, ref.sigma, rtol=1e-9, atol=1e-9)
        P = W @ stats.C
        optimum = -float((ref.sigma[:k] ** 2).sum())
        assert float(solvers.objective(got[name].U @ got[name].V.T, stats.B, P)) == pytest.approx(optimum, rel=1e-9)


def test_output_statistics_only_where_smaller_and_single_stream():
    get = solvers.get_method
    down, qkv, o = [(5, 12)], [(12, 12), (4, 12), (4, 12)], [(12, 12)]
    assert solvers.output_statistics(get("svd-llm"), down)  # 5² < 12²
    assert solvers.output_statistics(get("svd-llm"), [(5, 12), (6, 12)])  # 25 + 36 < 144
    assert not solvers.output_statistics(get("svd-llm"), qkv)  # 144 + 16 + 16 ≥ 144: one shared XᵀX
    assert not solvers.output_statistics(get("svd-llm"), o)
    assert not solvers.output_statistics(get("svd-llm"), [(20, 12)])  # taller than wide: input side
    for name in ("shift-aware", "aa-svd", "saes", "erc-svd", "asvd", "svd"):  # H reads X', or P ≠ W·H
        assert not solvers.output_statistics(get(name), down)


@pytest.mark.parametrize("outs,n,k", [((7,), 19, 3), ((5, 6), 23, 4), ((11,), 11, 5)])
def test_output_covariances_reach_the_input_side_optimum(outs, n, k):
    """svd-llm from each linear's YᵀY (Y = XWᵀ) gives the factors and Σ_{i>k} σ² of the XᵀX solve."""
    X = torch.randn(60, n, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    Ws = {f"w{i}": torch.randn(m, n, dtype=torch.float64) for i, m in enumerate(outs)}
    ranks = {name: min(k, W.shape[0] - 1) for name, W in Ws.items()}
    method = solvers.get_method("svd-llm")
    by_input = solvers.solve_group(method, Ws, ranks, solvers.GroupStatistics(A=X.T @ X), eps_rel=1e-14)
    outputs = {name: (X @ W.T).T @ (X @ W.T) for name, W in Ws.items()}
    by_output = solvers.solve_group(method, Ws, ranks, solvers.GroupStatistics(outputs=outputs))
    for name, W in Ws.items():
        f, ref, r = by_output[name], by_input[name], ranks[name]
        torch.testing.assert_close(f.U @ f.V.T, ref.U @ ref.V.T, rtol=1e-7, atol=1e-9)
        err = float(((X @ W.T - X @ (f.U @ f.V.T).T) ** 2).sum())
        assert err == pytest.approx(float((f.sigma[r:] ** 2).sum()), rel=1e-8, abs=1e-10)
        assert f.truncation_loss == pytest.approx(ref.truncation_loss, rel=1e-7, abs=1e-10)
    with pytest.raises(ValueError, match="output covariances"):
        solvers.solve_group(solvers.get_method("aa-svd"), Ws, ranks, solvers.GroupStatistics(outputs=outputs))


def test_anchored_output_side_only_for_short_linears_without_a():
    get = solvers.get_method
    assert solvers.anchored_output_side(get("aa-svd"), [(5, 12), (7, 12)])
    assert not solvers.anchored_output_side(get("aa-svd"), [(12, 12), (4, 12)])  # q's m×m eigh is no smaller
    for name in ("svd-llm", "saes", "erc-svd", "asvd", "svd"):  # A in H or P, β search, residual, diagonal
        assert not solvers.anchored_output_side(get(name), [(5, 12)])


@pytest.mark.parametrize("outs,n,k", [((7,), 19, 3), ((5, 6), 23, 4)])
def test_anchored_output_solve_reaches_the_whitened_optimum(outs, n, k, monkeypatch):
    """aa-svd on a group of linears shorter than their input: Cholesky + m×m eigh gives the whitened
    solve's factors, σ and objective (Σ_{i>k} σ² above the unconstrained optimum)."""
    X = torch.randn(90, n, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    Xp = X + 0.2 * torch.randn(90, n, dtype=torch.float64)
    stats = solvers.GroupStatistics(A=X.T @ X, B=Xp.T @ Xp, C=X.T @ Xp)
    Ws = {f"w{i}": torch.randn(m, n, dtype=torch.float64) for i, m in enumerate(outs)}
    ranks = {name: k for name in Ws}
    method = solvers.get_method("aa-svd")
    fast = solvers.solve_group(method, Ws, ranks, stats, eps_rel=1e-14)
    cholesky = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **kw: pytest.fail("the whitened path ran Cholesky"))
    monkeypatch.setattr(solvers, "anchored_output_side", lambda *a: False)
    slow = solvers.solve_group(method, Ws, ranks, stats, eps_rel=1e-14)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", cholesky)
    for name, W in Ws.items():
        f, ref = fast[name], slow[name]
        torch.testing.assert_close(f.U @ f.V.T, ref.U @ ref.V.T, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(f.sigma, ref.sigma[: f.sigma.numel()], rtol=1e-7, atol=1e-9 * float(ref.sigma[0]))
        P = W @ stats.C
        optimum = -float((ref.sigma[:k] ** 2).sum())
        assert float(solvers.objective(f.U @ f.V.T, stats.B, P)) == pytest.approx(optimum, rel=1e-8)
        torch.testing.assert_close(f.U.norm(dim=0), f.V.norm(dim=0))


def test_anchored_output_solve_leaves_clamped_statistics_to_the_whitening():
    """Where the whitening's clamp would act (a dead channel, fewer tokens than features) the Cholesky
    path declines, and the clamped eigh solve runs: finite factors, the same clear error on zeros."""
    n, k = 16, 3
    Xp = torch.randn(6, n, dtype=torch.float64)  # 6 tokens, 16 features: B has rank 6
    Xp[:, 4] = 0  # a dead channel
    stats = solvers.GroupStatistics(B=Xp.T @ Xp, C=Xp.T @ Xp)
    assert solvers.clamp_free_cholesky(stats.B) is None
    assert solvers.clamp_free_cholesky(random_spd(n)) is not None
    W = {"down": torch.randn(5, n, dtype=torch.float64)}
    f = solvers.solve_group(solvers.get_method("aa-svd"), W, {"down": k}, stats)["down"]
    assert torch.isfinite(f.U).all() and torch.isfinite(f.V).all()
    # with X' = X the anchored optimum is SVD-LLM's: the output error on X is Σ_{i>k} σ²
    err = float(((Xp @ W["down"].T - Xp @ (f.U @ f.V.T).T) ** 2).sum())
    assert err == pytest.approx(f.truncation_loss, rel=1e-4, abs=1e-8)
    zero = solvers.GroupStatistics(B=torch.zeros(n, n, dtype=torch.float64), C=torch.zeros(n, n, dtype=torch.float64))
    with pytest.raises(ValueError, match="all zero"):
        solvers.solve_group(solvers.get_method("aa-svd"), W, {"down": k}, zero)


@pytest.mark.parametrize("method", ["aa-svd", "saes", "shift-aware"])
@pytest.mark.parametrize("anchored_output", [True, False])
def test_anchors_stand_in_for_the_cross_covariance(method, anchored_output, monkeypatch):
    """Each linear's W·C (m×n) in place of C gives the same factors, on the whitened and the Cholesky path."""
    n, outs, k = 21, (6, 5), 3
    X = torch.randn(80, n, dtype=torch.float64)
    Xp = X + 0.3 * torch.randn(80, n, dtype=torch.float64)
    B, C = Xp.T @ Xp, X.T @ Xp
    Ws = {f"w{i}": torch.randn(m, n, dtype=torch.float64) for i, m in enumerate(outs)}
    ranks = {name: k for name in Ws}
    if not anchored_output:
        monkeypatch.setattr(solvers, "anchored_output_side", lambda *a: False)
    get = solvers.get_method(method)
    full = solvers.solve_group(get, Ws, ranks, solvers.GroupStatistics(B=B, C=C), eps_rel=1e-14)
    anchors = {name: W @ C for name, W in Ws.items()}
    kept = solvers.solve_group(get, Ws, ranks, solvers.GroupStatistics(B=B, anchors=anchors), eps_rel=1e-14)
    for name in Ws:
        torch.testing.assert_close(kept[name].U @ kept[name].V.T, full[name].U @ full[name].V.T, rtol=1e-8, atol=1e-10)
        assert kept[name].beta == full[name].beta
