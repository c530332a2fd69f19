// Whitening extension: op registration and the CPU implementation.
//
// Only kernels are registered here (TORCH_LIBRARY_IMPL). The schemas have one source,
// lowrank_engine/ops.py, which defines them before it loads this shared object, and registers
// the fake (meta) kernels.
//
// CPU: one LAPACK syevd per matrix, called through ATen's exported wrapper
// at::native::lapackSyevd (the same driver torch.linalg.eigh uses on CPU), in place in the
// output buffer, so a matrix costs one symmetrized copy and no temporaries. Every matrix is
// solved on the calling thread, one after another: LAPACK uses all intra-op threads for a large
// matrix (n >= kLapackThreadsMinN) and one thread for a small one or on an oversubscribed
// machine (see machine_oversubscribed). Never inside an at::parallel_for region: MKL's syevd
// called there on two threads returned wrong factors for n >= 640 (‖L Lᵀ − H‖ / ‖H‖ from 0.5 to
// Inf; n = 576 was right), which is how a loaded machine once got garbage ranks.
//
// The GIL: ops called through torch.ops.* from Python run with the GIL released by the
// dispatcher's Python binding (torch/csrc/jit/python/pybind_utils: invokeOperatorFromPython
// holds a gil_scoped_release around the kernel); tests/test_whitening.py checks it.
#include <Python.h>

#include "whitening.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#if AT_BUILD_WITH_LAPACK()
#include <ATen/native/BatchLinearAlgebra.h>
#endif
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <type_traits>
#include <vector>

#if AT_MKL_ENABLED() && !defined(_WIN32)
// MKL's C entry point (mkl_service.h maps mkl_set_num_threads_local to it; the lowercase symbol
// exported beside it is the Fortran one, which takes a pointer), exported by libtorch_cpu
extern "C" int MKL_Set_Num_Threads_Local(int);
#endif

namespace lowrank_engine {

void check_whiten_input(const at::Tensor& H) {
  if (H.dim() != 3 || H.size(-1) != H.size(-2)) {
    std::ostringstream shape;
    shape << "(";
    for (int64_t d = 0; d < H.dim(); ++d) shape << (d ? ", " : "") << H.size(d);
    shape << (H.dim() == 1 ? ",)" : ")");
    TORCH_CHECK_VALUE(false, "whiten: expected H of shape [batch, n, n], got ", shape.str());
  }
  TORCH_CHECK_VALUE(H.scalar_type() == at::kFloat || H.scalar_type() == at::kDouble,
                    "whiten: H must be float32 or float64, got ", H.scalar_type());
}

void throw_whiten_error(int64_t index, int32_t code) {
  switch (code) {
    case kNonFinite:
      TORCH_CHECK_VALUE(false, "whiten: matrix ", index, " contains NaN or Inf");
    case kAllZero:
      TORCH_CHECK_VALUE(false, "whiten: matrix ", index, " is all zero (no calibration signal)");
    case kNoPositive:
      TORCH_CHECK_VALUE(false, "whiten: matrix ", index, " has no positive eigenvalue");
    case kNoConverge:
      TORCH_CHECK(false, "whiten: matrix ", index, ": the eigendecomposition failed even in float64");
    default:
      TORCH_CHECK(false, "whiten: matrix ", index, ": unknown status ", code);
  }
}

namespace {

// Below this size LAPACK runs single-threaded even for a single matrix: a multithreaded syevd
// gains little there, and on a loaded machine its thread synchronization costs far more than
// the solve (measured: n = 256 took 3 ms on one thread and up to 2.6 s on two busy cores).
constexpr int64_t kLapackThreadsMinN = 512;

// True when the machine already has more runnable threads than this process's intra-op thread
// count (1-minute load average). Then a multithreaded syevd is pathological, most likely because
// each of its many fine-grained barriers waits for a descheduled thread (measured on
// a 2-core machine at load 3.5: n = 1536 took 12-26 s with LAPACK on two threads, 0.39 s on
// one). LAPACK then runs on one thread.
bool machine_oversubscribed() {
#if defined(__linux__) || defined(__APPLE__)
  double load = 0.0;
  if (getloadavg(&load, 1) == 1) return load > at::get_num_threads() + 0.5;
#endif
  return false;
}

// LAPACK on one thread for the guard's scope. MKL's setting is thread-local, so calls from other
// threads are unaffected. Without MKL, or on Windows (whose torch_cpu does not export the setter to
// extensions), LAPACK keeps its own threading: slower on a loaded machine, never wrong.
struct OneLapackThread {
#if AT_MKL_ENABLED() && !defined(_WIN32)
  int saved = MKL_Set_Num_Threads_Local(1);  // the previous local setting (0: the global one)
  ~OneLapackThread() { MKL_Set_Num_Threads_Local(saved); }
#endif
};

constexpr int64_t kTile = 32;

// ---- eigensolver ---------------------------------------------------------------------------
template <typename T>
struct Eigh {
  int64_t n = 0;
  std::vector<T> w;      // eigenvalues
  std::vector<T> root;   // sqrt of the clamped eigenvalues
  std::vector<T> work;
  std::vector<int> iwork;
  std::vector<T> a;      // matrix buffer, only when the caller has none (the fp64 retry)

  void reserve(int64_t n_) {
    if (n == n_) return;
    n = n_;
    w.resize(n);
    root.resize(n);
#if AT_BUILD_WITH_LAPACK()
    const int ni = static_cast<int>(n);
    int lwork = -1, liwork = -1, info = 0;
    T wkopt = 0, dummy = 0;
    int iwkopt = 0;
    at::native::lapackSyevd<T, T>('V', 'L', ni, &dummy, std::max(ni, 1), &dummy, &wkopt, lwork, nullptr, 0,
                                  &iwkopt, liwork, &info);
    // the documented minimum for jobz='V' guards against a query that under-reports
    const int64_t lwork_min = 1 + 6 * n + 2 * n * n;
    const int64_t liwork_min = 3 + 5 * n;
    work.resize(std::max<int64_t>(lwork_min, static_cast<int64_t>(std::ceil(static_cast<double>(wkopt)))));
    iwork.resize(std::max<int64_t>(liwork_min, iwkopt));
#endif
  }

  // Eigendecomposition of the symmetric row-major (equivalently column-major) n×n matrix `q`
  // in place: on success q holds Qᵀ row-major (row j = eigenvector j) and w ascending
  // eigenvalues. Returns false when the solver fails or any output is not finite.
  bool solve(T* q) {
    bool ok = true;
#if AT_BUILD_WITH_LAPACK()
    int info = 0;
    const int ni = static_cast<int>(n);
    at::native::lapackSyevd<T, T>('V', 'L', ni, q, std::max(ni, 1), w.data(), work.data(),
                                  static_cast<int>(work.size()), nullptr, 0, iwork.data(),
                                  static_cast<int>(iwork.size()), &info);
    ok = info == 0;
#else
    try {
      auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
      auto A = at::from_blob(q, {n, n}, opts);
      auto [evals, evecs] = at::linalg_eigh(A);  // evecs columns = eigenvectors
      at::from_blob(w.data(), {n}, opts).copy_(evals);
      A.copy_(evecs.mT());
    } catch (const c10::Error&) {
      ok = false;
    }
#endif
    if (!ok) return false;
    for (int64_t j = 0; j < n; ++j)
      if (!std::isfinite(w[j])) return false;
    for (int64_t k = 0; k < n * n; ++k)
      if (!std::isfinite(q[k])) return false;
    return true;
  }
};

// a = 0.5 (h + hᵀ), row-major n×n, in the precision of T (then converted to A).
template <typename T, typename A>
void symmetrize(const T* h, int64_t n, A* a) {
  for (int64_t rb = 0; rb < n; rb += kTile) {
    const int64_t re = std::min(n, rb + kTile);
    for (int64_t cb = 0; cb < n; cb += kTile) {
      const int64_t ce = std::min(n, cb + kTile);
      for (int64_t r = rb; r < re; ++r)
        for (int64_t c = cb; c < ce; ++c)
          a[r * n + c] = static_cast<A>(T(0.5) * (h[r * n + c] + h[c * n + r]));
    }
  }
}

struct Outputs {
  void* L;
  void* L_inv;
  void* evals;
  void* clamped;
  int64_t* num_clamped;
};

// Clamp and form the factors from q = Qᵀ (compute precision C) into the outputs (T).
// q may alias the L_inv output when C == T.
template <typename C, typename T>
int32_t finalize(int64_t n, C* q, const C* w, C* root, double eps_rel, int64_t i, const Outputs& out) {
  const C floor = static_cast<C>(eps_rel) * std::max(w[n - 1], C(0));
  if (!(floor > C(0))) return kNoPositive;
  T* evals = static_cast<T*>(out.evals) + i * n;
  T* clamped = static_cast<T*>(out.clamped) + i * n;
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    const C c = w[j] < floor ? floor : w[j];
    count += w[j] < floor;
    root[j] = std::sqrt(c);
    evals[j] = static_cast<T>(w[j]);
    clamped[j] = static_cast<T>(c);
  }
  out.num_clamped[i] = count;
  // L[r, j] = Q[r, j] * root[j] = q[j, r] * root[j]   (a tiled transpose)
  T* L = static_cast<T*>(out.L) + i * n * n;
  for (int64_t rb = 0; rb < n; rb += kTile) {
    const int64_t re = std::min(n, rb + kTile);
    for (int64_t jb = 0; jb < n; jb += kTile) {
      const int64_t je = std::min(n, jb + kTile);
      for (int64_t r = rb; r < re; ++r)
        for (int64_t j = jb; j < je; ++j) L[r * n + j] = static_cast<T>(q[j * n + r] * root[j]);
    }
  }
  // L_inv[j, r] = Q[r, j] / root[j] = q[j, r] / root[j]   (in place when q is L_inv)
  T* Linv = static_cast<T*>(out.L_inv) + i * n * n;
  for (int64_t j = 0; j < n; ++j) {
    const C s = root[j];
    for (int64_t r = 0; r < n; ++r) Linv[j * n + r] = static_cast<T>(q[j * n + r] / s);
  }
  return kOk;
}

template <typename T>
struct Solver {
  Eigh<T> eigh;
  Eigh<double> eigh64;  // the fp64 retry, set up on first use
  bool force_retry = false;  // test hook: treat every float32 solve as failed

  int32_t run(const T* H, int64_t n, double eps_rel, int64_t i, const Outputs& out) {
    const T* h = H + i * n * n;
    bool nonzero = false;
    for (int64_t k = 0; k < n * n; ++k) {
      if (!std::isfinite(h[k])) return kNonFinite;
      nonzero |= h[k] != T(0);
    }
    if (!nonzero) return kAllZero;

    eigh.reserve(n);
    T* q = static_cast<T*>(out.L_inv) + i * n * n;  // solve in place in the L_inv output
    symmetrize<T, T>(h, n, q);
    const bool forced = force_retry && std::is_same<T, float>::value;
    if (eigh.solve(q) && !forced) return finalize<T, T>(n, q, eigh.w.data(), eigh.root.data(), eps_rel, i, out);

    // fp64 retry (for fp64 input it would repeat the same computation)
    if (std::is_same<T, double>::value) return kNoConverge;
    eigh64.reserve(n);
    eigh64.a.resize(n * n);
    symmetrize<T, double>(h, n, eigh64.a.data());
    if (!eigh64.solve(eigh64.a.data())) return kNoConverge;
    const int32_t s =
        finalize<double, T>(n, eigh64.a.data(), eigh64.w.data(), eigh64.root.data(), eps_rel, i, out);
    return s == kOk ? kRetried : s;
  }
};

template <typename T>
void whiten_cpu_typed(const at::Tensor& H, double eps_rel, const Outputs& out, int32_t* status) {
  const int64_t b = H.size(0), n = H.size(1);
  const T* h = H.const_data_ptr<T>();
  const char* force = std::getenv("LOWRANK_ENGINE_WHITEN_FORCE_RETRY");  // test hook
  const bool force_retry = force != nullptr && force[0] == '1';
  Solver<T> solver;
  solver.force_retry = force_retry;
  std::optional<OneLapackThread> one_thread;
  if (at::get_num_threads() > 1 && !at::in_parallel_region() &&
      (n < kLapackThreadsMinN || machine_oversubscribed()))
    one_thread.emplace();
  for (int64_t i = 0; i < b; ++i) status[i] = solver.run(h, n, eps_rel, i, out);
}

}  // namespace

WhitenExResult whiten_ex_cpu(const at::Tensor& H_in, double eps_rel) {
  check_whiten_input(H_in);
  TORCH_CHECK(H_in.device().is_cpu(), "whiten_ex_cpu: expected a CPU tensor");
  const at::Tensor H = H_in.contiguous();
  const int64_t b = H.size(0), n = H.size(1);
  // LAPACK takes 32-bit sizes; syevd's workspace is 1 + 6n + 2n² elements.
  TORCH_CHECK_VALUE(1 + 6 * n + 2 * n * n <= INT_MAX, "whiten: n = ", n, " is too large for the CPU path");

  at::Tensor L = at::empty_like(H);
  at::Tensor L_inv = at::empty_like(H);
  at::Tensor evals = at::empty({b, n}, H.options());
  at::Tensor clamped = at::empty({b, n}, H.options());
  at::Tensor num_clamped = at::zeros({b}, H.options().dtype(at::kLong));
  at::Tensor info = at::zeros({b}, H.options().dtype(at::kInt));
  if (b == 0) return {L, L_inv, evals, clamped, num_clamped, info};

  std::vector<int32_t> status(b, kOk);
  Outputs out{L.data_ptr(), L_inv.data_ptr(), evals.data_ptr(), clamped.data_ptr(), num_clamped.data_ptr<int64_t>()};
  if (H.scalar_type() == at::kFloat) {
    whiten_cpu_typed<float>(H, eps_rel, out, status.data());
  } else {
    whiten_cpu_typed<double>(H, eps_rel, out, status.data());
  }
  int32_t* info_p = info.data_ptr<int32_t>();
  for (int64_t i = 0; i < b; ++i) {
    if (status[i] >= kNonFinite) throw_whiten_error(i, status[i]);
    info_p[i] = status[i];
  }
  return {L, L_inv, evals, clamped, num_clamped, info};
}

namespace {

using WhitenResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

WhitenResult drop_extras(WhitenExResult r) {
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<5>(r)};
}

WhitenResult whiten_cpu(const at::Tensor& H, double eps_rel) { return drop_extras(whiten_ex_cpu(H, eps_rel)); }

#ifdef LOWRANK_WITH_CUDA
WhitenResult whiten_cuda(const at::Tensor& H, double eps_rel) { return drop_extras(whiten_ex_cuda(H, eps_rel)); }
#endif

}  // namespace
}  // namespace lowrank_engine

// Kernels for the schemas WHITEN_SCHEMA / WHITEN_EX_SCHEMA of lowrank_engine/ops.py.
TORCH_LIBRARY_IMPL(lowrank_engine, CPU, m) {
  m.impl("whiten", &lowrank_engine::whiten_cpu);
  m.impl("whiten_ex", &lowrank_engine::whiten_ex_cpu);
}

#ifdef LOWRANK_WITH_CUDA
TORCH_LIBRARY_IMPL(lowrank_engine, CUDA, m) {
  m.impl("whiten", &lowrank_engine::whiten_cuda);
  m.impl("whiten_ex", &lowrank_engine::whiten_ex_cuda);
}
#endif

// An empty Python module, so `import lowrank_engine._C` works too (it only runs the static
// registrations above). The package itself loads the library with torch.ops.load_library.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define LOWRANK_CONCAT_(a, b) a##b
#define LOWRANK_CONCAT(a, b) LOWRANK_CONCAT_(a, b)
PyMODINIT_FUNC LOWRANK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "lowrank_engine._C",
                               "Whitening ops; registered in torch.ops.lowrank_engine on load.", -1, nullptr};
  return PyModule_Create(&module);
}
