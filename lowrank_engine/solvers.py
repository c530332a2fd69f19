"""One closed-form solver for every method (DESIGN §1).

Every objective is   min_{rank(W')≤k}  tr(W' H W'ᵀ) − 2 tr(W' Pᵀ)
with H = a·A + b·B and P = W·(c·A + d·C + e·B), over the statistics
A = XᵀX, B = X'ᵀX', C = XᵀX'. A method is only its coefficients.

Solution: H = L Lᵀ (eigh whitening), G = P L⁻ᵀ, G ≈ U_k Σ_k V_kᵀ,
U = U_k Σ_k^½ (m×k), V = L⁻ᵀ V_k Σ_k^½ (n×k), so that y ≈ (x V) Uᵀ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lowrank_engine import ops


@dataclass(frozen=True)
class Coefficients:
    """H = a·A + b·B ;  P = W·(c·A + d·C + e·B)."""
    a: float
    b: float
    c: float
    d: float
    e: float

    @property
    def needs(self) -> frozenset:
        """Which statistics (A, B, C) the objective reads."""
        used = set()
        if self.a or self.c:
            used.add("A")
        if self.b or self.e:
            used.add("B")
        if self.d:
            used.add("C")
        return frozenset(used)


@dataclass(frozen=True)
class Method:
    name: str
    coefficients: Optional[Coefficients]  # None: plain SVD (H = I, P = W)
    adaptive_beta: bool = False  # SAES: β chosen per layer by ACES
    diagonal: Optional[str] = None  # ASVD: H = diag(s)², s = (per-channel |x| statistic)^α, P = W H
    alpha: float = 0.5
    residual: bool = False  # ERC-SVD: stage 2 compensates W − W₁ with its own objective (see solve_residual)
    description: str = ""

    @property
    def needs(self) -> frozenset:
        if self.adaptive_beta:
            return frozenset({"B", "C"})
        if self.diagonal == "fisher":  # from gradients (fisher.py), not from the activation streams
            return frozenset()
        if self.diagonal:
            return frozenset({"D"})
        if self.residual:  # stage 2's objective may be any two-stream coefficient set
            return frozenset({"A", "B", "C"})
        return frozenset() if self.coefficients is None else self.coefficients.needs

    @property
    def two_stream(self) -> bool:
        """Whether the objective reads X', the input in the model compressed so far."""
        return bool(self.needs & {"B", "C"})


def cealc(beta: float) -> Coefficients:
    """SAES-SVD CEALC: ‖WX' − W'X'‖² + β‖WX − W'X'‖²."""
    return Coefficients(a=0.0, b=1.0 + beta, c=0.0, d=beta, e=1.0)


METHODS = {
    m.name: m
    for m in (
        Method("svd", None, description="plain SVD, ‖W − W'‖"),
        Method("svd-llm", Coefficients(1, 0, 1, 0, 0), description="‖WX − W'X‖ (statistics of the dense model)"),
        Method("shift-aware", Coefficients(0, 1, 0, 0, 1), description="‖WX' − W'X'‖ (Dobi-like)"),
        Method("aa-svd", Coefficients(0, 1, 0, 1, 0), description="anchored ‖WX − W'X'‖ (AA-SVD stage 1)"),
        Method("saes", None, adaptive_beta=True, description="CEALC with ACES choosing β per layer"),
        Method("erc-svd", Coefficients(1, 0, 1, 0, 0), residual=True,
               description="SVD-LLM at rank k₁, then the residual at rank k₂ on ‖WX − W₁X' − R'X'‖ (ERC-SVD)"),
        Method("asvd", None, diagonal="absmean", description="‖(W − W')S‖, S = diag(mean|x|)^½ (ASVD)"),
        Method("asvd-max", None, diagonal="absmax", description="‖(W − W')S‖, S = diag(max|x|)^½ (ASVD)"),
        Method("fwsvd", None, diagonal="fisher", description="‖(W − W')S‖, S = diag(column Fisher)^½ (FWSVD)"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


# --------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------
def break_even_rank(m: int, n: int) -> int:
    """Smallest k at which the factor pair stores as many parameters as W."""
    return math.ceil(m * n / (m + n))


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """ratio = fraction of the matrix's parameters REMOVED: k = floor((1−ratio)·m·n/(m+n))."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (fraction of parameters removed), got {ratio}")
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n)))


def check_rank(name: str, m: int, n: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"rank for {name} must be ≥ 1, got {k}")
    if k >= min(m, n):
        raise ValueError(f"rank {k} for {name} ({m}×{n}) must be < min(m, n) = {min(m, n)}")
    if k * (m + n) >= m * n:
        raise ValueError(f"rank {k} for {name} ({m}×{n}) is past break-even ({break_even_rank(m, n)}): "
                         "the factors would not be smaller than W")


# --------------------------------------------------------------------------------------
# the solver
# --------------------------------------------------------------------------------------
@dataclass
class Whitening:
    """H = L Lᵀ with L = Q Λc^½; keeps L⁻ᵀ = Q Λc^-½ (n×n)."""
    L_inv_T: torch.Tensor
    num_clamped: int
    retried_fp64: bool


def whitening_from_ops(L_inv: torch.Tensor, num_clamped, info) -> Whitening:
    return Whitening(L_inv_T=L_inv.mT, num_clamped=int(num_clamped), retried_fp64=bool(int(info)))


def whiten_many(Hs: list[torch.Tensor], eps_rel: float = 1e-6) -> list[Whitening]:
    """Whiten several same-sized matrices in one batched op call."""
    batch = Hs[0].unsqueeze(0) if len(Hs) == 1 else torch.stack(Hs)  # no copy of a lone (maybe 28672²) metric
    _, L_inv, _, _, num_clamped, info = ops.whiten_ex(batch, eps_rel)
    return [whitening_from_ops(L_inv[i], num_clamped[i], info[i]) for i in range(len(Hs))]


@dataclass
class Factors:
    U: torch.Tensor  # m×k
    V: torch.Tensor  # n×k
    sigma: torch.Tensor  # all singular values of G (descending)
    rank: int
    beta: Optional[float] = None
    sigma_rank: Optional[int] = None  # how many of sigma were kept, when not `rank` (ERC's stage 2)
    clamped: int = 0  # eigenvalues of the metric the whitening raised to ε·λ_max (dead channels, few tokens)
    retried_fp64: bool = False  # the whitening's fp32 eigh failed and was redone in fp64

    @property
    def truncation_loss(self) -> float:
        """Σ_{i>k} σ_i(G)²: the excess of the objective over its unconstrained optimum."""
        return float((self.sigma[self.kept:] ** 2).sum())

    @property
    def retained_energy(self) -> float:
        total = float((self.sigma ** 2).sum())
        return float((self.sigma[: self.kept] ** 2).sum()) / total if total > 0 else 1.0

    @property
    def kept(self) -> int:
        return self.rank if self.sigma_rank is None else self.sigma_rank


# From this smaller side on, the top-k SVD comes from an eigh of the smaller Gram matrix. Squaring
# costs σ² an absolute error of ε·σ₁²: ~1e-16·σ₁² in fp64 (so fp64 takes it from small sizes, where
# it is 2–4× faster than LAPACK's SVD on 2 CPU cores), ~1e-7·σ₁² in fp32 (only where LAPACK is slow).
GRAM_SVD_MIN = {torch.float64: 128, torch.float32: 2048}


def eigh_descending(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric matrix, largest first; retried in fp64 if fp32 does not converge."""
    M = (M + M.mT) / 2
    try:
        evals, evecs = torch.linalg.eigh(M)
    except RuntimeError:
        if M.dtype == torch.float64:
            raise
        evals, evecs = (t.to(M.dtype) for t in torch.linalg.eigh(M.double()))
    return evals.flip(-1), evecs.flip(-1)


def top_svd(G: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_k, all σ descending, V_k) of G. Matrices past GRAM_SVD_MIN go through the Gram matrix of
    the smaller side: one min(m,n)² eigh (BLAS-3 bound) instead of a LAPACK SVD, which on a
    28672×8192 LLaMA-70B MLP matrix is several times slower. σ_i² then carries an absolute
    error of about ε·σ₁², far below what the truncation keeps or drops."""
    m, n = G.shape
    if min(m, n) < GRAM_SVD_MIN.get(G.dtype, 2048):
        Uf, S, Vh = torch.linalg.svd(G, full_matrices=False)
        return Uf[:, :rank], S, Vh[:rank].mT
    tall = m >= n
    evals, evecs = eigh_descending(G.mT @ G if tall else G @ G.mT)
    S = evals.clamp_min(0).sqrt()
    inv = torch.where(S[:rank] > 0, 1.0 / S[:rank], torch.zeros_like(S[:rank]))
    small = evecs[:, :rank]
    other = (G @ small if tall else G.mT @ small) * inv
    return (other, S, small) if tall else (small, S, other)


def factorize_whitened(G: torch.Tensor, L_inv_T: Optional[torch.Tensor], rank: int) -> Factors:
    """Top-k SVD of the whitened target and the un-whitening of its right factor."""
    Uk, S, Vk = top_svd(G, rank)
    root = S[:rank].sqrt()
    U = Uk * root
    V = Vk * root
    if L_inv_T is not None:
        V = L_inv_T @ V
    return Factors(U=U, V=V, sigma=S, rank=rank)


def solve(W: torch.Tensor, H: Optional[torch.Tensor], P: Optional[torch.Tensor], rank: int,
          eps_rel: float = 1e-6) -> Factors:
    """Closed-form minimizer of tr(W'HW'ᵀ) − 2tr(W'Pᵀ) at rank k (H=None: plain SVD of W)."""
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}], got {rank}")
    if H is None:
        return factorize_whitened(W if P is None else P, None, rank)
    (white,) = whiten_many([H], eps_rel)
    f = factorize_whitened(P @ white.L_inv_T, white.L_inv_T, rank)
    f.clamped, f.retried_fp64 = white.num_clamped, white.retried_fp64
    return f


def solve_output_side(W: torch.Tensor, H: torch.Tensor, rank: int) -> Factors:
    """The (H, P = W·H) objectives (svd-llm, shift-aware) without whitening H.

    G = W·H·L⁻ᵀ = W·L, so G·Gᵀ = W·H·Wᵀ (m×m): its top-k eigenvectors are G's left singular
    vectors and W' = U_k·U_kᵀ·W, the same optimum as the whitened solve (whose clamp
    λ ≥ ε·λ_max is the only difference). For m ≤ n this replaces the n×n eigh by an m×m one:
    LLaMA-70B's down_proj whitens 8192² instead of 28672². The pair is balanced column by
    column (‖U_i‖ = ‖V_i‖), as the whitened solve's U_kΣ½ / L⁻ᵀV_kΣ½ are.
    """
    return solve_output_gram(W, W @ H @ W.mT, rank)


def solve_output_gram(W: torch.Tensor, gram: torch.Tensor, rank: int) -> Factors:
    """solve_output_side from W·H·Wᵀ itself. With H = A it is YᵀY, Y = XWᵀ: the covariance of the
    linear's own output, which the pipeline can accumulate instead of A (see output_statistics)."""
    evals, evecs = eigh_descending(gram)
    Uk = evecs[:, :rank]
    V = W.mT @ Uk
    scale = V.norm(dim=0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Factors(U=Uk * scale, V=V / scale, sigma=evals.clamp_min(0).sqrt(), rank=rank)


def output_side(method: "Method", shapes) -> bool:
    """Whether a group with these (out, in) shapes is solved by solve_output_side: the method's
    target is P = W·H, and no matrix is taller than wide (else its m×m eigh is the larger one)."""
    c = method.coefficients
    if c is None or method.adaptive_beta or method.residual or method.diagonal:
        return False
    return (c.c, c.d, c.e) == (c.a, 0, c.b) and all(m <= n for m, n in shapes)


def anchored_output_side(method: "Method", shapes) -> bool:
    """Whether a two-stream group (H = b·B, P = W·(d·C + e·B), no A: aa-svd) is solved by
    solve_anchored_output: every linear is shorter than its input (down_proj), so one n×n Cholesky
    and an m×m eigh per linear replace the n×n eigh of the whitening (SmolLM2: 1536² → 576²;
    LLaMA-70B: 28672² → 8192²)."""
    c = method.coefficients
    if c is None or method.adaptive_beta or method.residual or method.diagonal:
        return False
    return c.a == 0 and c.c == 0 and c.b != 0 and bool(shapes) and all(m < n for m, n in shapes)


def largest_eigenvalue(H: torch.Tensor, iterations: int = 30) -> float:
    """λ_max of a symmetric PSD matrix by power iteration: a covariance's top eigenvalue stands far
    above the rest, so a few dozen n² products suffice."""
    v = torch.ones(H.shape[0], dtype=H.dtype, device=H.device)
    value = 0.0
    for _ in range(iterations):
        w = H @ v
        norm = float(w.norm())
        if norm == 0 or not math.isfinite(norm):
            return norm
        value, v = norm / float(v.norm()), w / norm
    return value


def clamp_free_cholesky(H: torch.Tensor, eps_rel: float = 1e-6) -> Optional[torch.Tensor]:
    """Lower Cholesky factor of H when the whitening's clamp (λ ≥ ε·λ_max) would leave every
    eigenvalue as it is; None when some eigenvalue falls below ε·λ_max (dead channels, more
    features than tokens), and only the clamped eigh whitening gives the same optimum. The
    certificate is that H − ε·λ_max·I still has a Cholesky factor."""
    top = largest_eigenvalue(H)
    if not math.isfinite(top) or top <= 0:
        return None
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    if int(torch.linalg.cholesky_ex(H - eps_rel * top * eye)[1]) != 0:
        return None
    L, info = torch.linalg.cholesky_ex(H)
    return L if int(info) == 0 else None


def solve_anchored_output(W: torch.Tensor, P: torch.Tensor, b: float, chol: torch.Tensor, rank: int) -> Factors:
    """min tr(W'HW'ᵀ) − 2tr(W'Pᵀ), H = b·B, on the output side: the unconstrained optimum is
    W* = P·H⁻¹, and the rank-k optimum W' = U_k·U_kᵀ·W* with U_k the top eigenvectors of
    W*·H·W*ᵀ = P·W*ᵀ (m×m), whose eigenvalues are σ(P·L⁻ᵀ)², as in the whitened solve. `chol`
    factors B (clamp_free_cholesky), so H⁻¹ = B⁻¹/b."""
    W_star = torch.cholesky_solve(P.mT, chol).mT / b
    return solve_output_gram(W_star, P @ W_star.mT, rank)


def output_statistics(method: "Method", shapes) -> bool:
    """Whether a single-stream group is better served by each linear's output covariance YᵀY (m×m,
    Y = XWᵀ) than by the shared XᵀX (n×n). For H = a·A, P = W·H the output-side solve reads only
    W·A·Wᵀ = YᵀY, and the forward computes Y anyway, so when Σm² < n² the statistic costs less to
    accumulate and to hold: down_proj takes 576² instead of 1536² on SmolLM2, 8192² instead of
    28672² on LLaMA-70B."""
    c = method.coefficients
    return bool(shapes) and output_side(method, shapes) and c.b == 0 and \
        sum(m * m for m, _ in shapes) < shapes[0][1] ** 2


def solve_residual(W: torch.Tensor, stage1: Factors, stats: "GroupStatistics", stage2: Coefficients, rank2: int,
                   eps_rel: float = 1e-6, white2: Optional["Whitening"] = None) -> Factors:
    """ERC-SVD stage 2: fit R' (rank k₂) to W − W₁ under stage 2's objective, P₂ = W·M₂ − W₁·H₂
    (default anchored: target WX on the compressed inputs X', so H₂ = B, P₂ = WC − W₁B); the
    factors are concatenated. A stage 2 with stage 1's metric would add nothing (Eckart–Young)."""
    W1 = stage1.U @ stage1.V.mT
    H2 = combine_metric(stage2, stats)
    P2 = W @ _combine(stats, ((stage2.c, "A"), (stage2.d, "C"), (stage2.e, "B"))) - W1 @ H2
    if white2 is None:
        (white2,) = whiten_many([H2], eps_rel)
    f2 = factorize_whitened(P2 @ white2.L_inv_T.to(W.dtype), white2.L_inv_T.to(W.dtype), rank2)
    return Factors(U=torch.cat([stage1.U, f2.U], 1), V=torch.cat([stage1.V, f2.V], 1), sigma=f2.sigma,
                   rank=stage1.rank + rank2, sigma_rank=rank2)


def solve_diagonal(W: torch.Tensor, s: torch.Tensor, rank: int) -> Factors:
    """H = diag(s)², P = W H: the whitening is diag(s), so G = W·diag(s) and V = diag(1/s)·V_k."""
    f = factorize_whitened(W * s, None, rank)
    f.V = f.V / s[:, None]
    return f


def diagonal_scale(stats: "GroupStatistics", method: Method, eps_rel: float = 1e-6) -> torch.Tensor:
    """s = statistic^α, with the same relative clamp as eigh whitening (s² ≥ eps_rel·max s²)."""
    if stats.D is None:
        raise ValueError(f"{method.name} needs the per-channel activation statistic, which was not collected")
    stat = stats.D.double() / max(stats.tokens, 1) if method.diagonal == "absmean" else stats.D.double()
    s = stat.clamp_min(0) ** method.alpha
    return s.clamp_min(math.sqrt(eps_rel) * float(s.max()) if float(s.max()) > 0 else 1.0)


def objective(Wp: torch.Tensor, H: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """tr(W'HW'ᵀ) − 2tr(W'Pᵀ)."""
    return (Wp @ H * Wp).sum() - 2 * (Wp * P).sum()


# --------------------------------------------------------------------------------------
# ACES: β per layer maximizing the retained-energy ratio of G(β) = G0 + β·G1
# --------------------------------------------------------------------------------------
BETA_MAX = 8.0


def _squared_singular_values(gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _rer_from_gram(gram: torch.Tensor, rank: int) -> float:
    s2 = _squared_singular_values(gram)
    total = float(s2.sum())
    return float(s2[:rank].sum()) / total if total > 0 else 1.0


def _small_side_grams(G0: torch.Tensor, G1: torch.Tensor):
    """Gram matrices on the smaller side, so each RER evaluation is one small eigvalsh."""
    if G0.shape[0] <= G0.shape[1]:
        return G0 @ G0.mT, G0 @ G1.mT, G1 @ G1.mT
    return G0.mT @ G0, G0.mT @ G1, G1.mT @ G1


def aces_exact(G0: torch.Tensor, G1: torch.Tensor, rank: int, beta_max: float = BETA_MAX,
               grid: int = 13, refine_steps: int = 12) -> float:
    """Exact 1-D search of RER(β) on [0, β_max]: log-spaced grid, then golden section."""
    g00, g01, g11 = _small_side_grams(G0, G1)

    def rer(beta: float) -> float:
        return _rer_from_gram(g00 + beta * (g01 + g01.mT) + beta * beta * g11, rank)

    betas = [0.0] + [beta_max * 2.0 ** (-i) for i in range(grid - 2, -1, -1)]
    values = [rer(b) for b in betas]
    best = max(range(len(betas)), key=values.__getitem__)
    lo = betas[max(best - 1, 0)]
    hi = betas[min(best + 1, len(betas) - 1)]
    invphi = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - invphi * (hi - lo), lo + invphi * (hi - lo)
    f1, f2 = rer(x1), rer(x2)
    for _ in range(refine_steps):
        if f1 >= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - invphi * (hi - lo)
            f1 = rer(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + invphi * (hi - lo)
            f2 = rer(x2)
    candidates = [(values[best], betas[best]), (f1, x1), (f2, x2)]
    return max(candidates)[1]


def aces_fixed_subspace(G0: torch.Tensor, G1: torch.Tensor, rank: int, beta_max: float = BETA_MAX,
                        iterations: int = 3, gap_tolerance: float = 0.05) -> float:
    """Closed-form β with U_k frozen: RER ≈ (a0+2a1β+a2β²)/(b0+2b1β+b2β²).

    Its stationary points solve (a2b1−a1b2)β² + (a2b0−a0b2)β + (a1b0−a0b1) = 0. The frozen
    subspace is unreliable when σ_k ≈ σ_{k+1}, so β is capped and shrunk toward 0 by
    gap/(gap+tol) (relative spectral gap), and U_k is refreshed a few times.
    """
    b0 = float((G0 * G0).sum())
    b1 = float((G0 * G1).sum())
    b2 = float((G1 * G1).sum())
    beta = 0.0
    for _ in range(iterations):
        Gb = G0 + beta * G1
        Uf, S, _ = torch.linalg.svd(Gb, full_matrices=False)
        Uk = Uf[:, :rank]
        P0, P1 = Uk.mT @ G0, Uk.mT @ G1
        a0, a1, a2 = float((P0 * P0).sum()), float((P0 * P1).sum()), float((P1 * P1).sum())

        def ratio(x: float) -> float:
            den = b0 + 2 * b1 * x + b2 * x * x
            return (a0 + 2 * a1 * x + a2 * x * x) / den if den > 0 else 0.0

        qa, qb, qc = a2 * b1 - a1 * b2, a2 * b0 - a0 * b2, a1 * b0 - a0 * b1
        candidates = [0.0, beta_max]
        if abs(qa) > 1e-30:
            disc = qb * qb - 4 * qa * qc
            if disc >= 0:
                r = math.sqrt(disc)
                candidates += [(-qb + r) / (2 * qa), (-qb - r) / (2 * qa)]
        elif abs(qb) > 1e-30:
            candidates.append(-qc / qb)
        candidates = [min(max(c, 0.0), beta_max) for c in candidates if math.isfinite(c)]
        target = max(candidates, key=ratio)
        if rank < S.numel() and S[0] > 0:
            gap = float((S[rank - 1] - S[rank]) / S[0])
            target *= gap / (gap + gap_tolerance)
        if abs(target - beta) <= 1e-4 * max(1.0, beta):
            beta = target
            break
        beta = target
    return beta


BETA_SEARCHES: dict[str, Callable[..., float]] = {"exact": aces_exact, "fixed": aces_fixed_subspace}


# --------------------------------------------------------------------------------------
# one group of linears sharing an input: the generic entry point the pipeline calls
# --------------------------------------------------------------------------------------
@dataclass
class GroupStatistics:
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    C: Optional[torch.Tensor] = None
    D: Optional[torch.Tensor] = None  # per-input-channel Σ|x| (absmean) or max|x| (absmax), length n
    tokens: int = 0
    outputs: Optional[dict] = None  # linear → YᵀY (m×m), in place of A (output_statistics)
    anchors: Optional[dict] = None  # linear → W·C = YᵀX' (m×n), in place of C (anchored_statistics)

    def accumulators(self) -> list[torch.Tensor]:
        """The single-stream sums being folded: A, D or the output covariances."""
        return [t for t in (self.A, self.D, *(self.outputs or {}).values()) if t is not None]


def _combine(stats: GroupStatistics, terms: tuple[tuple[float, str], ...]) -> Optional[torch.Tensor]:
    out = None
    for coef, name in terms:
        if coef:
            mat = getattr(stats, name)
            if mat is None:
                raise ValueError(f"statistic {name} is required but was not collected")
            out = coef * mat if out is None else out + coef * mat
    return out


def combine_metric(coeffs: Coefficients, stats: GroupStatistics) -> torch.Tensor:
    """H = a·A + b·B."""
    return _combine(stats, ((coeffs.a, "A"), (coeffs.b, "B")))


def anchored_statistics(method: Method, shapes) -> bool:
    """Whether a two-stream group keeps each linear's W·C = YᵀX' (m×n, Y = XWᵀ the dense output)
    instead of C = XᵀX' (n×n): the method reads C only through W·C and needs no A, and Σm < n, so
    the product costs Σm·n per token instead of n², and the dense pass keeps the m-wide outputs
    rather than the n-wide inputs (down_proj: 576 against 1536 on SmolLM2)."""
    if method.residual or method.diagonal or "C" not in method.needs or "A" in method.needs:
        return False
    return bool(shapes) and sum(m for m, _ in shapes) < shapes[0][1]


@dataclass(frozen=True)
class GroupPath:
    """The one answer to "what does this group collect, and how is it solved?" for the pipeline, the
    memory plan and solve_group.

    statistics: "none" (nothing to collect), "D" (a diagonal scale), "A" (XᵀX), "YtY" (each linear's
    output covariance, output_statistics), "ABC" (two streams: A, B, C as the method needs them) or
    "anchored" (two streams: B and each linear's W·C, anchored_statistics).
    solve: "none" (every linear stays dense), "plain" (SVD of W), "diagonal", "output_gram",
    "output_side", "anchored_output" (falls back to "whitened" when the whitening's clamp acts), or
    "whitened"."""
    statistics: str
    solve: str

    @property
    def two_stream(self) -> bool:
        return self.statistics in ("ABC", "anchored")


def group_path(method: Method, shapes) -> GroupPath:
    """The path of a group whose compressed linears have these (out, in) shapes (none: all dense)."""
    shapes = [tuple(s) for s in shapes]
    if not shapes:
        return GroupPath("none", "none")
    if method.diagonal:  # FWSVD's scale comes from gradients (fisher.py), not from the streams
        return GroupPath("none" if method.diagonal == "fisher" else "D", "diagonal")
    if method.two_stream:
        statistics = "anchored" if anchored_statistics(method, shapes) else "ABC"
    elif method.coefficients is None:
        return GroupPath("none", "plain")
    else:
        statistics = "YtY" if output_statistics(method, shapes) else "A"
    if statistics == "YtY":
        solve = "output_gram"
    elif method.coefficients is None and not method.adaptive_beta:
        solve = "plain"
    elif output_side(method, shapes):
        solve = "output_side"
    elif anchored_output_side(method, shapes):
        solve = "anchored_output"
    else:
        solve = "whitened"
    return GroupPath(statistics, solve)


def _target(W: torch.Tensor, name: str, stats: GroupStatistics, coeffs: Coefficients) -> torch.Tensor:
    """P = W·(c·A + d·C + e·B), with W·C read from the anchors when they were kept instead of C."""
    if stats.anchors is None:
        return W @ _combine(stats, ((coeffs.c, "A"), (coeffs.d, "C"), (coeffs.e, "B")))
    rest = _combine(stats, ((coeffs.c, "A"), (coeffs.e, "B")))
    P = coeffs.d * stats.anchors[name]
    return P if rest is None else P + W @ rest


RESIDUAL_SPLIT = 0.75  # ERC-SVD: share of each rank given to stage 1
RESIDUAL_STAGE2 = "aa-svd"
RESIDUAL_STAGE2_METHODS = ("aa-svd", "shift-aware")  # ERC's residual stage needs a two-stream objective


def solve_group(method: Method, weights: dict[str, torch.Tensor], ranks: dict[str, int], stats: GroupStatistics,
                eps_rel: float = 1e-6, beta_search: str = "exact", beta_max: float = BETA_MAX,
                dtype: torch.dtype = torch.float64, whitening: Optional[Whitening] = None,
                residual_split: float = RESIDUAL_SPLIT, residual_stage2: str = RESIDUAL_STAGE2) -> dict[str, Factors]:
    """Factorize every linear of a group; the whitening is shared by the group (or given, when batched)."""
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    path = group_path(method, [tuple(W.shape) for W in weights.values()])
    if path.solve == "diagonal":
        scale = diagonal_scale(stats, method, eps_rel).to(dtype)
        return {name: solve_diagonal(W.to(dtype), scale, ranks[name]) for name, W in weights.items()}
    Ws = {name: W.to(dtype) for name, W in weights.items()}
    coeffs = method.coefficients
    if stats.outputs is not None:
        if path.solve not in ("output_gram", "output_side") or coeffs.b:
            raise ValueError(f"{method.name} cannot be solved from output covariances")
        return {name: solve_output_gram(W, coeffs.a * stats.outputs[name].to(dtype), ranks[name])
                for name, W in Ws.items()}
    stats = GroupStatistics(cast(stats.A), cast(stats.B), cast(stats.C),
                            anchors=None if stats.anchors is None else {n: cast(t) for n, t in stats.anchors.items()})
    if path.solve == "plain":
        return {name: solve(W, None, None, ranks[name]) for name, W in Ws.items()}
    if path.solve in ("output_side", "output_gram"):  # output_gram from A when YᵀY was not collected
        H = combine_metric(coeffs, stats)
        return {name: solve_output_side(W, H, ranks[name]) for name, W in Ws.items()}
    if whitening is None and path.solve == "anchored_output":
        chol = clamp_free_cholesky(stats.B, eps_rel)
        if chol is not None:  # else the clamp acts: the whitened solve below
            return {name: solve_anchored_output(W, _target(W, name, stats, coeffs), coeffs.b, chol, ranks[name])
                    for name, W in Ws.items()}
    if whitening is not None:
        white = whitening
    else:
        # SAES: the metric is (1+β)B for every β, so whiten B once and rescale per layer below
        H = stats.B if method.adaptive_beta else combine_metric(coeffs, stats)
        (white,) = whiten_many([H], eps_rel)
    white = Whitening(white.L_inv_T.to(dtype), white.num_clamped, white.retried_fp64)
    white2 = None
    if method.adaptive_beta:
        if beta_search not in BETA_SEARCHES:
            raise ValueError(f"unknown beta search {beta_search!r}; choose one of {', '.join(BETA_SEARCHES)}")
        BL = stats.B @ white.L_inv_T  # n×n products shared by the group
        CL = stats.C @ white.L_inv_T if stats.anchors is None else None
    else:
        M = _combine(stats, ((coeffs.c, "A"), (coeffs.d, "C"), (coeffs.e, "B"))) if stats.anchors is None else None
        # G = W·M·L⁻ᵀ: sharing M·L⁻ᵀ costs n³ + Σm·n², W·M first 2·Σm·n² (cheaper when Σm < n: down_proj)
        ML = M @ white.L_inv_T if M is not None and sum(W.shape[0] for W in Ws.values()) >= M.shape[0] else None
    out = {}
    for name, W in Ws.items():
        k = ranks[name]
        if method.adaptive_beta:
            G0 = W @ BL
            G1 = W @ CL if CL is not None else stats.anchors[name] @ white.L_inv_T
            beta = BETA_SEARCHES[beta_search](G0, G1, k, beta_max=beta_max)
            # H = (1+β)B → L = √(1+β) L_B, so G = (G0 + βG1)/√(1+β) and V carries 1/√(1+β).
            scale = 1.0 / math.sqrt(1.0 + beta)
            f = factorize_whitened((G0 + beta * G1) * scale, white.L_inv_T * scale, k)
            f.beta = beta
        else:
            G = W @ ML if ML is not None else _target(W, name, stats, coeffs) @ white.L_inv_T
            if method.residual:
                k1 = min(k, max(1, round(residual_split * k)))
                f = factorize_whitened(G, white.L_inv_T, k1)
                if k > k1:
                    if residual_stage2 not in RESIDUAL_STAGE2_METHODS:
                        raise ValueError(f"ERC stage 2 needs a two-stream objective ({', '.join(RESIDUAL_STAGE2_METHODS)}), "
                                         f"got {residual_stage2!r}")
                    stage2 = get_method(residual_stage2).coefficients
                    if white2 is None:  # shared by the group, like stage 1's
                        (white2,) = whiten_many([combine_metric(stage2, stats)], eps_rel)
                    f = solve_residual(W, f, stats, stage2, k - k1, eps_rel, white2)
            else:
                f = factorize_whitened(G, white.L_inv_T, k)
        f.clamped, f.retried_fp64 = white.num_clamped, white.retried_fp64
        out[name] = f
    return out
