// Shared declarations of the whitening extension (lowrank_engine._C).
//
// whiten_ex(H [b,n,n], eps_rel) -> (L, L_inv, eigenvalues, clamped_eigenvalues, num_clamped, info)
//   H_sym = 0.5 (H + Hᵀ) = Q Λ Qᵀ (eigenvalues ascending), Λc = max(Λ, eps_rel·max(λ_max, 0)),
//   L = Q Λc^½, L_inv = Λc^-½ Qᵀ, num_clamped = #{λ < floor}, info = 1 when the fp64 retry was used.
// The semantics are those of lowrank_engine.ops.whiten_reference.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace lowrank_engine {

using WhitenExResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Per-matrix status codes shared by the CPU and CUDA paths. Codes >= kNonFinite are errors;
// the op raises for the lowest matrix index that has one (the order the reference checks in).
enum WhitenStatus : int32_t {
  kOk = 0,
  kRetried = 1,      // the input-precision eigh failed / gave non-finite values; fp64 retry used
  kNonFinite = 2,    // the input contains NaN or Inf
  kAllZero = 3,      // the input is all zero
  kNoPositive = 4,   // no eigenvalue is positive, so the relative clamp has no floor
  kNoConverge = 5,   // eigh failed even in float64
};

// Shape / dtype checks (ValueError), identical to ops._check_whiten_input.
void check_whiten_input(const at::Tensor& H);

// Throws the error for `code` (>= kNonFinite) at matrix `index`.
[[noreturn]] void throw_whiten_error(int64_t index, int32_t code);

WhitenExResult whiten_ex_cpu(const at::Tensor& H, double eps_rel);

#ifdef LOWRANK_WITH_CUDA
WhitenExResult whiten_ex_cuda(const at::Tensor& H, double eps_rel);
#endif

}  // namespace lowrank_engine
