// Whitening on CUDA (built only when torch is a CUDA build: LOWRANK_WITH_CUDA).
//
// Pipeline, all on the device, on the caller's current stream unless noted:
//   1. prepare:  A = 0.5 (H + Hᵀ), written into the L_inv output (the solvers work in place),
//                plus per-matrix flags (any NaN/Inf, any nonzero) from a block reduction.
//   2. eigh:     n ≤ kJacobiMaxN and b > 1:   syevjBatched (Jacobi, one launch for the batch)
//                n ≤ kBatchedMaxN and b > 1:  cusolverDnXsyevBatched (cuSOLVER ≥ 11.7.1)
//                otherwise:                   cusolverDnXsyevd, one per matrix, spread over up to
//                                             kNumStreams streams (each with its own handle)
//                The eigenvectors come back column-major, i.e. row-major Qᵀ.
//   3. clamp:    floor = eps·max(λ_max, 0), Λc, √Λc, counts, eigenvalue outputs, flags.
//   4. form:     L = Q Λc^½ (a tiled transpose) and L_inv = Λc^-½ Qᵀ (in place), flags for any
//                non-finite eigenvector entry.
//   5. one small device→host copy of the per-matrix flags: the only synchronization. Matrices
//      whose input-precision solve failed (solver info ≠ 0 or non-finite output) are solved
//      again with float64 Xsyevd and written back in the input dtype (info = 1); this costs a
//      second small copy only when it happens.
// Errors (NaN/Inf, all zero, no positive eigenvalue) are raised for the lowest matrix index,
// with the messages of the CPU path.
#include "whitening.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

namespace lowrank_engine {
namespace {

constexpr int64_t kJacobiMaxN = 32;        // syevjBatched supports n ≤ 32
constexpr int64_t kBatchedMaxN = 512;      // batched solver up to this n, per-matrix syevd above
constexpr int64_t kMaxGridChunk = 65535;   // matrices per launch (grid y/z limit, batched solvers)
constexpr int kNumStreams = 4;             // concurrent per-matrix syevd streams
constexpr int kTile = 32;
constexpr int kTileRows = 8;
constexpr int kThreads = 256;

// flag bits, one int32 per matrix
constexpr int32_t kFlagNonFinite = 1;      // input has NaN/Inf
constexpr int32_t kFlagNonZero = 2;        // input has a nonzero entry
constexpr int32_t kFlagSolverFailed = 4;   // solver info != 0
constexpr int32_t kFlagBadResult = 8;      // non-finite eigenvalue or eigenvector entry
constexpr int32_t kFlagNoPositive = 16;    // floor <= 0

#define LOWRANK_CUSOLVER_CHECK(expr)                                                              \
  do {                                                                                            \
    cusolverStatus_t status_ = (expr);                                                            \
    TORCH_CHECK(status_ == CUSOLVER_STATUS_SUCCESS, "whiten: cuSOLVER error ", static_cast<int>(status_), \
                " in " #expr);                                                                    \
  } while (0)

template <typename T>
cudaDataType cuda_type();
template <>
cudaDataType cuda_type<float>() { return CUDA_R_32F; }
template <>
cudaDataType cuda_type<double>() { return CUDA_R_64F; }

template <typename T>
__device__ __forceinline__ bool is_finite(T x) { return isfinite(x); }

// ---- kernels --------------------------------------------------------------------------------
// grid: (x: element blocks, y: matrices of this chunk); flags may be null (retry path).
template <typename T, typename A>
__global__ void prepare_kernel(const T* __restrict__ H, A* __restrict__ out, int32_t* __restrict__ flags,
                               int64_t n, int64_t first) {
  const int64_t i = first + blockIdx.y;
  const int64_t nn = n * n;
  const T* h = H + i * nn;
  A* a = out + i * nn;
  bool nonfinite = false, nonzero = false;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nn;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = k / n, c = k - r * n;
    const T v = h[k];
    nonfinite |= !is_finite(v);
    nonzero |= v != T(0);
    a[k] = static_cast<A>(T(0.5) * (v + h[c * n + r]));
  }
  if (flags != nullptr) {
    const bool any_nonfinite = __syncthreads_or(nonfinite);
    const bool any_nonzero = __syncthreads_or(nonzero);
    if (threadIdx.x == 0 && (any_nonfinite || any_nonzero))
      atomicOr(flags + i, (any_nonfinite ? kFlagNonFinite : 0) | (any_nonzero ? kFlagNonZero : 0));
  }
}

// One block per matrix (grid x: matrices of this chunk). w: [b, n] ascending eigenvalues.
template <typename C, typename T>
__global__ void clamp_kernel(const C* __restrict__ w_all, const int* __restrict__ info, double eps_rel,
                             C* __restrict__ root_all, T* __restrict__ evals_all, T* __restrict__ clamped_all,
                             int64_t* __restrict__ num_clamped, int32_t* __restrict__ flags, int64_t n,
                             int64_t first) {
  const int64_t i = first + blockIdx.x;
  const C* w = w_all + i * n;
  const C floor = static_cast<C>(eps_rel) * max(w[n - 1], C(0));
  int64_t count = 0;
  bool bad = false;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    bool below = false;
    if (j < n) {
      const C v = w[j];
      bad |= !is_finite(v);
      below = v < floor;
      const C c = below ? floor : v;
      root_all[i * n + j] = sqrt(c);
      evals_all[i * n + j] = static_cast<T>(v);
      clamped_all[i * n + j] = static_cast<T>(c);
    }
    count += __syncthreads_count(below);
  }
  const bool any_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    num_clamped[i] = count;
    int32_t f = 0;
    if (info != nullptr && info[i] != 0) f |= kFlagSolverFailed;
    if (any_bad) f |= kFlagBadResult;
    if (!(floor > C(0))) f |= kFlagNoPositive;
    if (f) atomicOr(flags + i, f);
  }
}

// q: row-major Qᵀ (q[j, r] = Q[r, j]) in precision C; L[r, j] = Q[r, j]·root[j];
// L_inv[j, r] = Q[r, j] / root[j]. q may alias L_inv (no __restrict__ on those two).
// grid: (x: r tiles, y: j tiles, z: matrices of this chunk); block: (kTile, kTileRows).
template <typename C, typename T>
__global__ void form_kernel(const C* q_all, const C* __restrict__ root_all, T* __restrict__ L_all, T* Linv_all,
                            int32_t* __restrict__ flags, int64_t n, int64_t first) {
  __shared__ C tile[kTile][kTile + 1];
  const int64_t i = first + blockIdx.z;
  const int64_t nn = n * n;
  const C* q = q_all + i * nn;
  const C* root = root_all + i * n;
  T* L = L_all + i * nn;
  T* Linv = Linv_all + i * nn;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  bool bad = false;
  for (int k = threadIdx.y; k < kTile; k += kTileRows) {
    const int64_t j = j0 + k, r = r0 + threadIdx.x;
    if (j < n && r < n) {
      const C v = q[j * n + r];
      bad |= !is_finite(v);
      tile[k][threadIdx.x] = v;
      Linv[j * n + r] = static_cast<T>(v / root[j]);  // same element it read: safe in place
    }
  }
  __syncthreads();
  for (int k = threadIdx.y; k < kTile; k += kTileRows) {
    const int64_t r = r0 + k, j = j0 + threadIdx.x;
    if (r < n && j < n) L[r * n + j] = static_cast<T>(tile[threadIdx.x][k] * root[j]);
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0 && threadIdx.y == 0) atomicOr(flags + i, kFlagBadResult);
}

// ---- cuSOLVER handles: one per (device, stream slot), created once, never destroyed ----------
struct SolverSlot {
  cusolverDnHandle_t handle = nullptr;
  cusolverDnParams_t params = nullptr;
};

struct DevicePool {
  std::mutex mutex;  // held while a call enqueues work with this device's handles
  std::vector<SolverSlot> slots;

  SolverSlot& slot(int k) {
    while (static_cast<int>(slots.size()) <= k) {
      SolverSlot s;
      LOWRANK_CUSOLVER_CHECK(cusolverDnCreate(&s.handle));
      LOWRANK_CUSOLVER_CHECK(cusolverDnCreateParams(&s.params));
      slots.push_back(s);
    }
    return slots[k];
  }
};

DevicePool& device_pool(int device) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<DevicePool>> pools;
  std::lock_guard<std::mutex> guard(mutex);
  if (static_cast<int>(pools.size()) <= device) pools.resize(device + 1);
  if (!pools[device]) pools[device] = std::make_unique<DevicePool>();
  return *pools[device];
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, like.options().dtype(at::kByte));
}

// ---- solvers: in place on a [b, n, n] buffer (symmetric, so row/column-major agree) ----------
template <typename C>
void eigh_jacobi_batched(SolverSlot& s, cudaStream_t stream, C* a, C* w, int* info, int64_t b, int64_t n,
                         const at::Tensor& like) {
  LOWRANK_CUSOLVER_CHECK(cusolverDnSetStream(s.handle, stream));
  syevjInfo_t params = nullptr;
  LOWRANK_CUSOLVER_CHECK(cusolverDnCreateSyevjInfo(&params));
  LOWRANK_CUSOLVER_CHECK(cusolverDnXsyevjSetSortEig(params, 1));  // ascending, as the clamp assumes
  for (int64_t first = 0; first < b; first += kMaxGridChunk) {
    const int batch = static_cast<int>(std::min(kMaxGridChunk, b - first));
    const int ni = static_cast<int>(n);
    C* ac = a + first * n * n;
    C* wc = w + first * n;
    int lwork = 0;
    if constexpr (std::is_same<C, float>::value) {
      LOWRANK_CUSOLVER_CHECK(cusolverDnSsyevjBatched_bufferSize(s.handle, CUSOLVER_EIG_MODE_VECTOR,
                                                                CUBLAS_FILL_MODE_LOWER, ni, ac, ni, wc, &lwork,
                                                                params, batch));
      at::Tensor work = workspace(sizeof(C) * static_cast<size_t>(lwork), like);
      LOWRANK_CUSOLVER_CHECK(cusolverDnSsyevjBatched(s.handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, ni,
                                                     ac, ni, wc, static_cast<C*>(work.data_ptr()), lwork,
                                                     info + first, params, batch));
    } else {
      LOWRANK_CUSOLVER_CHECK(cusolverDnDsyevjBatched_bufferSize(s.handle, CUSOLVER_EIG_MODE_VECTOR,
                                                                CUBLAS_FILL_MODE_LOWER, ni, ac, ni, wc, &lwork,
                                                                params, batch));
      at::Tensor work = workspace(sizeof(C) * static_cast<size_t>(lwork), like);
      LOWRANK_CUSOLVER_CHECK(cusolverDnDsyevjBatched(s.handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, ni,
                                                     ac, ni, wc, static_cast<C*>(work.data_ptr()), lwork,
                                                     info + first, params, batch));
    }
  }
  LOWRANK_CUSOLVER_CHECK(cusolverDnDestroySyevjInfo(params));
}

#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701
constexpr bool kHaveSyevBatched = true;
template <typename C>
void eigh_batched(SolverSlot& s, cudaStream_t stream, C* a, C* w, int* info, int64_t b, int64_t n,
                  const at::Tensor& like) {
  LOWRANK_CUSOLVER_CHECK(cusolverDnSetStream(s.handle, stream));
  const cudaDataType t = cuda_type<C>();
  for (int64_t first = 0; first < b; first += kMaxGridChunk) {
    const int64_t batch = std::min(kMaxGridChunk, b - first);
    C* ac = a + first * n * n;
    C* wc = w + first * n;
    size_t dev_bytes = 0, host_bytes = 0;
    LOWRANK_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR,
                                                             CUBLAS_FILL_MODE_LOWER, n, t, ac, n, t, wc, t,
                                                             &dev_bytes, &host_bytes, batch));
    at::Tensor work = workspace(dev_bytes, like);
    std::vector<char> host(std::max<size_t>(host_bytes, 1));
    LOWRANK_CUSOLVER_CHECK(cusolverDnXsyevBatched(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR,
                                                  CUBLAS_FILL_MODE_LOWER, n, t, ac, n, t, wc, t, work.data_ptr(),
                                                  dev_bytes, host.data(), host_bytes, info + first, batch));
    if (host_bytes > 0) C10_CUDA_CHECK(cudaStreamSynchronize(stream));  // keep `host` alive until done
  }
}
#else
constexpr bool kHaveSyevBatched = false;
template <typename C>
void eigh_batched(SolverSlot&, cudaStream_t, C*, C*, int*, int64_t, int64_t, const at::Tensor&) {
  TORCH_CHECK(false, "whiten: cusolverDnXsyevBatched needs cuSOLVER >= 11.7.1");
}
#endif

// Per-matrix Xsyevd for the matrices in `which`, spread round-robin over up to kNumStreams
// streams that are ordered after (and joined back into) the current stream.
template <typename C>
void eigh_syevd(DevicePool& pool, C* a, C* w, int* info, const std::vector<int64_t>& which, int64_t n,
                const at::Tensor& like, std::vector<at::Tensor> keep_alive) {
  if (which.empty()) return;
  const cudaDataType t = cuda_type<C>();
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  // workspace size, then how many streams the free memory allows
  SolverSlot& s0 = pool.slot(0);
  LOWRANK_CUSOLVER_CHECK(cusolverDnSetStream(s0.handle, current.stream()));
  size_t dev_bytes = 0, host_bytes = 0;
  LOWRANK_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(s0.handle, s0.params, CUSOLVER_EIG_MODE_VECTOR,
                                                     CUBLAS_FILL_MODE_LOWER, n, t, a, n, t, w, t, &dev_bytes,
                                                     &host_bytes));
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  int streams = static_cast<int>(std::min<int64_t>(kNumStreams, static_cast<int64_t>(which.size())));
  if (dev_bytes > 0) streams = std::max(1, std::min<int>(streams, static_cast<int>(free_bytes / 2 / dev_bytes)));

  std::vector<c10::cuda::CUDAStream> side;
  if (streams == 1) {
    side.push_back(current);
  } else {
    cudaEvent_t ready;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(ready, current.stream()));
    for (int k = 0; k < streams; ++k) {
      side.push_back(c10::cuda::getStreamFromPool(false, current.device_index()));
      C10_CUDA_CHECK(cudaStreamWaitEvent(side.back().stream(), ready, 0));
      for (const at::Tensor& tensor : keep_alive)
        c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(), side.back());
    }
    C10_CUDA_CHECK(cudaEventDestroy(ready));  // released once the recorded work completes
  }
  std::vector<std::vector<char>> host(streams, std::vector<char>(std::max<size_t>(host_bytes, 1)));
  std::vector<at::Tensor> works;
  for (int k = 0; k < streams; ++k) {
    c10::cuda::CUDAStreamGuard guard(side[k]);  // the workspace belongs to its stream
    works.push_back(workspace(dev_bytes, like));
  }
  for (size_t m = 0; m < which.size(); ++m) {
    const int k = static_cast<int>(m % streams);
    const int64_t i = which[m];
    SolverSlot& s = pool.slot(k);
    LOWRANK_CUSOLVER_CHECK(cusolverDnSetStream(s.handle, side[k].stream()));
    LOWRANK_CUSOLVER_CHECK(cusolverDnXsyevd(s.handle, s.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                            t, a + i * n * n, n, t, w + i * n, t, works[k].data_ptr(), dev_bytes,
                                            host[k].data(), host_bytes, info + i));
  }
  if (streams > 1) {
    for (int k = 0; k < streams; ++k) {
      cudaEvent_t done;
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
      C10_CUDA_CHECK(cudaEventRecord(done, side[k].stream()));
      C10_CUDA_CHECK(cudaStreamWaitEvent(current.stream(), done, 0));
      C10_CUDA_CHECK(cudaEventDestroy(done));
    }
  }
  if (host_bytes > 0) C10_CUDA_CHECK(cudaStreamSynchronize(current.stream()));  // host workspaces in use
}

template <typename C, typename T>
void launch_clamp_and_form(const C* q, const C* w, const int* info, double eps_rel, C* root, T* L, T* Linv,
                           T* evals, T* clamped, int64_t* num_clamped, int32_t* flags, int64_t b, int64_t n,
                           cudaStream_t stream) {
  for (int64_t first = 0; first < b; first += kMaxGridChunk) {
    const int64_t chunk = std::min(kMaxGridChunk, b - first);
    clamp_kernel<C, T><<<static_cast<unsigned>(chunk), kThreads, 0, stream>>>(w, info, eps_rel, root, evals, clamped,
                                                                              num_clamped, flags, n, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned tiles = static_cast<unsigned>((n + kTile - 1) / kTile);
    form_kernel<C, T><<<dim3(tiles, tiles, static_cast<unsigned>(chunk)), dim3(kTile, kTileRows), 0, stream>>>(
        q, root, L, Linv, flags, n, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename A>
void launch_prepare(const T* H, A* out, int32_t* flags, int64_t b, int64_t n, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>((n * n + kThreads - 1) / kThreads, 1024);
  for (int64_t first = 0; first < b; first += kMaxGridChunk) {
    const int64_t chunk = std::min(kMaxGridChunk, b - first);
    prepare_kernel<T, A><<<dim3(static_cast<unsigned>(std::max<int64_t>(blocks, 1)), static_cast<unsigned>(chunk)),
                           kThreads, 0, stream>>>(H, out, flags, n, first);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool force_retry() {
  const char* v = std::getenv("LOWRANK_ENGINE_WHITEN_FORCE_RETRY");  // test hook
  return v != nullptr && v[0] == '1';
}

template <typename T>
WhitenExResult whiten_cuda_typed(const at::Tensor& H, double eps_rel) {
  const int64_t b = H.size(0), n = H.size(1);
  at::Tensor L = at::empty_like(H);
  at::Tensor L_inv = at::empty_like(H);
  at::Tensor evals = at::empty({b, n}, H.options());
  at::Tensor clamped = at::empty({b, n}, H.options());
  at::Tensor num_clamped = at::zeros({b}, H.options().dtype(at::kLong));
  at::Tensor info = at::zeros({b}, H.options().dtype(at::kInt));
  if (b == 0) return {L, L_inv, evals, clamped, num_clamped, info};
  if (n == 0) throw_whiten_error(0, kAllZero);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "whiten: n = ", n, " is too large");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor flags = at::zeros({b}, H.options().dtype(at::kInt));
  at::Tensor solver_info = at::zeros({b}, H.options().dtype(at::kInt));
  at::Tensor w = at::empty({b, n}, H.options());
  at::Tensor root = at::empty({b, n}, H.options());
  T* q = L_inv.data_ptr<T>();  // solve in place in the L_inv output

  launch_prepare<T, T>(H.const_data_ptr<T>(), q, flags.data_ptr<int32_t>(), b, n, stream);
  DevicePool& pool = device_pool(H.get_device());
  {
    std::lock_guard<std::mutex> guard(pool.mutex);
    int* dinfo = solver_info.data_ptr<int>();
    if (b > 1 && n <= kJacobiMaxN) {
      eigh_jacobi_batched<T>(pool.slot(0), stream, q, w.data_ptr<T>(), dinfo, b, n, H);
    } else if (b > 1 && n <= kBatchedMaxN && kHaveSyevBatched) {
      eigh_batched<T>(pool.slot(0), stream, q, w.data_ptr<T>(), dinfo, b, n, H);
    } else {
      std::vector<int64_t> all(b);
      for (int64_t i = 0; i < b; ++i) all[i] = i;
      eigh_syevd<T>(pool, q, w.data_ptr<T>(), dinfo, all, n, H, {L_inv, w, solver_info});
    }
  }
  launch_clamp_and_form<T, T>(q, w.data_ptr<T>(), solver_info.data_ptr<int>(), eps_rel, root.data_ptr<T>(),
                              L.data_ptr<T>(), q, evals.data_ptr<T>(), clamped.data_ptr<T>(),
                              num_clamped.data_ptr<int64_t>(), flags.data_ptr<int32_t>(), b, n, stream);

  // the one synchronization: per-matrix flags to the host
  const at::Tensor host_flags = flags.cpu();
  const int32_t* f = host_flags.const_data_ptr<int32_t>();
  const bool forced = force_retry() && std::is_same<T, float>::value;
  std::vector<int32_t> status(b, kOk);
  std::vector<int64_t> retry;
  int64_t first_error = b;
  for (int64_t i = 0; i < b && i < first_error; ++i) {
    if (f[i] & kFlagNonFinite) {
      status[i] = kNonFinite;
    } else if (!(f[i] & kFlagNonZero)) {
      status[i] = kAllZero;
    } else if ((f[i] & (kFlagSolverFailed | kFlagBadResult)) || forced) {
      status[i] = kRetried;
      retry.push_back(i);
    } else if (f[i] & kFlagNoPositive) {
      status[i] = kNoPositive;
    }
    if (status[i] >= kNonFinite) first_error = i;
  }

  if (!retry.empty()) {
    // float64 Xsyevd on the matrices that failed (for float64 input from a batched solver, a
    // second algorithm)
    at::Tensor idx = at::tensor(retry, at::TensorOptions().dtype(at::kLong)).to(H.device(), /*non_blocking=*/false);
    const int64_t r = static_cast<int64_t>(retry.size());
    at::Tensor Hr = H.index_select(0, idx).contiguous();
    at::Tensor a64 = at::empty({r, n, n}, H.options().dtype(at::kDouble));
    at::Tensor w64 = at::empty({r, n}, H.options().dtype(at::kDouble));
    at::Tensor root64 = at::empty({r, n}, H.options().dtype(at::kDouble));
    at::Tensor info64 = at::zeros({r}, H.options().dtype(at::kInt));
    at::Tensor flags64 = at::full({r}, kFlagNonZero, H.options().dtype(at::kInt));
    at::Tensor Lr = at::empty({r, n, n}, H.options()), Linvr = at::empty({r, n, n}, H.options());
    at::Tensor er = at::empty({r, n}, H.options()), cr = at::empty({r, n}, H.options());
    at::Tensor nr = at::zeros({r}, H.options().dtype(at::kLong));
    launch_prepare<T, double>(Hr.const_data_ptr<T>(), a64.data_ptr<double>(), nullptr, r, n, stream);
    {
      std::lock_guard<std::mutex> guard(pool.mutex);
      std::vector<int64_t> all(r);
      for (int64_t k = 0; k < r; ++k) all[k] = k;
      eigh_syevd<double>(pool, a64.data_ptr<double>(), w64.data_ptr<double>(), info64.data_ptr<int>(), all, n, H,
                         {a64, w64, info64});
    }
    launch_clamp_and_form<double, T>(a64.data_ptr<double>(), w64.data_ptr<double>(), info64.data_ptr<int>(),
                                     eps_rel, root64.data_ptr<double>(), Lr.data_ptr<T>(), Linvr.data_ptr<T>(),
                                     er.data_ptr<T>(), cr.data_ptr<T>(), nr.data_ptr<int64_t>(),
                                     flags64.data_ptr<int32_t>(), r, n, stream);
    L.index_copy_(0, idx, Lr);
    L_inv.index_copy_(0, idx, Linvr);
    evals.index_copy_(0, idx, er);
    clamped.index_copy_(0, idx, cr);
    num_clamped.index_copy_(0, idx, nr);
    info.index_fill_(0, idx, 1);
    const at::Tensor host_flags64 = flags64.cpu();
    const int32_t* f64 = host_flags64.const_data_ptr<int32_t>();
    for (int64_t k = 0; k < r; ++k) {
      const int64_t i = retry[k];
      if (f64[k] & (kFlagSolverFailed | kFlagBadResult)) {
        status[i] = kNoConverge;
      } else if (f64[k] & kFlagNoPositive) {
        status[i] = kNoPositive;
      }
    }
  }
  for (int64_t i = 0; i < b; ++i)
    if (status[i] >= kNonFinite) throw_whiten_error(i, status[i]);
  return {L, L_inv, evals, clamped, num_clamped, info};
}

}  // namespace

WhitenExResult whiten_ex_cuda(const at::Tensor& H_in, double eps_rel) {
  check_whiten_input(H_in);
  TORCH_CHECK(H_in.is_cuda(), "whiten_ex_cuda: expected a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(H_in.device());
  const at::Tensor H = H_in.contiguous();
  if (H.scalar_type() == at::kFloat) return whiten_cuda_typed<float>(H, eps_rel);
  return whiten_cuda_typed<double>(H, eps_rel);
}

}  // namespace lowrank_engine
