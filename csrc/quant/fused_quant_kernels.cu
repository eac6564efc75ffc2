// Fused activation quantization: RMSNorm / residual-add + RMSNorm / SiLU-and-mul, then dynamic per-token
// symmetric int8 quantization, in one pass over the row.  The contract is vllm_qserve/reference/activation.py:
// every intermediate the reference rounds to the activation dtype is rounded here too, so the fused op computes
// the unfused composition's numbers (up to the fp32 reduction order of the RMS statistic).
//
// One CTA per token.  The row is read from global memory once; the operand of the quantizer (y, already rounded
// to the activation dtype) is kept in shared memory between the three phases (statistic, amax/sum, quantize).
// Rows too wide for the cache are recomputed from global memory instead (they are then L2 hits).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fused_quant_params.h"

namespace qserve {
namespace fused_quant {
namespace {

// Rows up to this many bytes (in the activation dtype) stay in shared memory: below the 48 KB that needs no
// opt-in, with room for several CTAs per SM.  fp16/bf16: K <= 20480 (every 7B-14B MLP), fp32: K <= 10240.
constexpr size_t kMaxCachedRowBytes = 40 * 1024;
constexpr int kMaxThreads = 1024;

template <typename T> struct Num;
template <> struct Num<half> {
  static __device__ __forceinline__ float to_f(half v) { return __half2float(v); }
  static __device__ __forceinline__ half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Num<nv_bfloat16> {
  static __device__ __forceinline__ float to_f(nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Num<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};

// The reference rounds to the activation dtype between steps; so do we.
template <typename T> __device__ __forceinline__ float round_to(float v) { return Num<T>::to_f(Num<T>::from_f(v)); }

// kVec elements loaded / stored as one access (16 bytes when vectorized, one element otherwise).
template <typename T, int kVec> struct alignas(sizeof(T) * kVec) Vec { T v[kVec]; };
template <int kVec> struct alignas(kVec) QVec { int8_t v[kVec]; };

template <typename T, int kVec> __device__ __forceinline__ Vec<T, kVec> load(const T* p, int i) {
  return reinterpret_cast<const Vec<T, kVec>*>(p)[i];
}
template <typename T, int kVec> __device__ __forceinline__ void store(T* p, int i, const Vec<T, kVec>& v) {
  reinterpret_cast<Vec<T, kVec>*>(p)[i] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions for any blockDim.x that is a multiple of 32 (chosen at run time from K).  Every thread
// gets the result; the order is fixed, so results are deterministic.  The xor butterfly gives all lanes the same
// value.  The trailing barrier lets `red` be reused immediately.
__device__ float block_sum(float v, float2* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp].x = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? red[lane].x : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}
__device__ int block_sum_int(int v, float2* red) {  // integers: exact in any order
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) red[warp].x = __int_as_float(v);
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? __float_as_int(red[lane].x) : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}
__device__ void block_max_and_sum(float& amax, float& sum, float2* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  amax = warp_max(amax);
  sum = warp_sum(sum);
  if (lane == 0) red[warp] = make_float2(amax, sum);
  __syncthreads();
  const float2 part = lane < int(blockDim.x >> 5) ? red[lane] : make_float2(0.f, 0.f);
  amax = warp_max(part.x);
  sum = warp_sum(part.y);
  __syncthreads();
}

// rms_norm's second half for one vector: n = (x * r) rounded, y = (n * w) rounded (vLLM's RMSNorm order).
template <typename T, int kVec>
__device__ __forceinline__ Vec<T, kVec> normalize(const Vec<T, kVec>& a, const T* weight, int i, float r) {
  const Vec<T, kVec> w = load<T, kVec>(weight, i);
  Vec<T, kVec> y;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float n = round_to<T>(__fmul_rn(Num<T>::to_f(a.v[j]), r));
    y.v[j] = Num<T>::from_f(__fmul_rn(n, Num<T>::to_f(w.v[j])));
  }
  return y;
}

// silu(gate) rounded, times up, rounded (F.silu(g) * u in the activation dtype).  IEEE division and the
// accurate expf, as PyTorch's silu kernel.
template <typename T, int kVec>
__device__ __forceinline__ Vec<T, kVec> silu_mul(const Vec<T, kVec>& g, const Vec<T, kVec>& u) {
  Vec<T, kVec> y;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float gv = Num<T>::to_f(g.v[j]);
    const float s = round_to<T>(gv / (1.f + expf(-gv)));
    y.v[j] = Num<T>::from_f(__fmul_rn(s, Num<T>::to_f(u.v[j])));
  }
  return y;
}

// gelu_tanh(gate) rounded, times up, rounded (F.gelu(g, approximate="tanh") * u in the activation dtype, and
// vLLM's GeluAndMul("tanh")): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) in fp32 with PyTorch's operation
// order and the accurate tanhf; explicit _rn intrinsics keep nvcc from contracting to FMAs.
template <typename T, int kVec>
__device__ __forceinline__ Vec<T, kVec> gelu_tanh_mul(const Vec<T, kVec>& g, const Vec<T, kVec>& u) {
  constexpr float kBeta = 0.7978845608028654f;  // M_SQRT2 * M_2_SQRTPI * 0.5
  constexpr float kKappa = 0.044715f;
  Vec<T, kVec> y;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float gv = Num<T>::to_f(g.v[j]);
    const float cube = __fmul_rn(__fmul_rn(gv, gv), gv);
    const float inner = __fmul_rn(kBeta, __fadd_rn(gv, __fmul_rn(kKappa, cube)));
    const float a = round_to<T>(__fmul_rn(__fmul_rn(0.5f, gv), __fadd_rn(1.f, tanhf(inner))));
    y.v[j] = Num<T>::from_f(__fmul_rn(a, Num<T>::to_f(u.v[j])));
  }
  return y;
}

// The gated-activation prologues (x = [gate | up]).
template <typename T, int kVec, Prologue kP>
__device__ __forceinline__ Vec<T, kVec> gated(const Vec<T, kVec>& g, const Vec<T, kVec>& u) {
  if constexpr (kP == Prologue::kGeluTanhMul) return gelu_tanh_mul<T, kVec>(g, u);
  else return silu_mul<T, kVec>(g, u);
}
template <typename T, int kVec, Prologue kP>
__device__ __forceinline__ Vec<T, kVec> gated(const T* row, int k, int i) {
  return gated<T, kVec, kP>(load<T, kVec>(row, i), load<T, kVec>(row + k, i));
}

// SiLU-gated rows of long prompts (M >= kBatchedMinRows) are read kBatch vectors per thread at a time (all loads
// first, then the math) by small CTAs.  Why: the exp and the IEEE division per element make this prologue about
// as heavy in instructions as in bytes, so it reaches memory speed only if some CTAs load while others compute
// or reduce.  Version 1 (kBatch = 1: a 14336-wide bf16 row on 1024 threads x 36 registers) fits ONE CTA per SM
// by registers, whose three phases then run one after the other.  With 256 threads (kBatch = 2, <= 64
// registers) or 128 (kBatch = 4) per CTA, four or more CTAs share an SM.  Decode-sized M keeps version 1: few
// rows need many threads per row for latency.  launch()'s gated_batch (the op reads QSERVE_FUSED_QUANT_GATED_BATCH =
// 1, 2 or 4 per call) is the benchmark's A/B switch; docs/kernels/fused_quant.md has the measured versions.
constexpr int kDefaultGatedBatch = 2;
constexpr int64_t kBatchedMinRows = 1024;

template <int kBatch>
constexpr int max_threads() {
  return kBatch == 1 ? kMaxThreads : kBatch == 2 ? 256 : 128;
}
template <int kBatch>
constexpr int min_blocks() {
  return kBatch == 1 ? 1 : 4;
}

template <typename T, int kVec>
__device__ __forceinline__ void accumulate(const Vec<T, kVec>& y, float& amax, float& sum) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float v = Num<T>::to_f(y.v[j]);
    amax = fmaxf(amax, fabsf(v));
    sum += v;
  }
}

template <typename T, int kVec, Prologue kP, int kBatch>
__global__ void __launch_bounds__(max_threads<kBatch>(), min_blocks<kBatch>()) fused_quant_kernel(const Params p, const bool cache_row) {
  using V = Vec<T, kVec>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  V* cache = reinterpret_cast<V*>(smem_raw);  // the row's quantizer operand (cache_row only)
  __shared__ float2 red[32];

  const int64_t row = blockIdx.x;
  const int nv = p.k / kVec;
  const T* xr = static_cast<const T*>(p.x) + row * p.x_row_stride;
  const T* weight = static_cast<const T*>(p.weight);
  // Rows that rms_norm normalizes: x, or the new residual (re-read by this same thread when not cached; no
  // __restrict__ / __ldg on it, since this kernel writes it).
  const T* src = xr;
  float r = 0.f;  // 1 / rms of the row (rms kinds)
  float amax = 0.f, sum = 0.f;

  if constexpr (kP == Prologue::kSiluMul || kP == Prologue::kGeluTanhMul) {
    for (int i0 = threadIdx.x; i0 < nv; i0 += kBatch * blockDim.x) {
      V g[kBatch], u[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int i = i0 + j * blockDim.x;
        if (i < nv) {
          g[j] = load<T, kVec>(xr, i);
          u[j] = load<T, kVec>(xr + p.k, i);
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int i = i0 + j * blockDim.x;
        if (i < nv) {
          const V y = gated<T, kVec, kP>(g[j], u[j]);
          accumulate<T, kVec>(y, amax, sum);
          if (cache_row) cache[i] = y;
        }
      }
    }
  } else {
    float ss = 0.f;
    if constexpr (kP == Prologue::kAddRmsNorm) {
      const T* rr = static_cast<const T*>(p.residual) + row * p.residual_row_stride;
      T* ro = static_cast<T*>(p.residual_out) + row * p.k;
      for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        const V a = load<T, kVec>(xr, i), b = load<T, kVec>(rr, i);
        V s;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          s.v[j] = Num<T>::from_f(Num<T>::to_f(a.v[j]) + Num<T>::to_f(b.v[j]));
          const float v = Num<T>::to_f(s.v[j]);
          ss += v * v;
        }
        store<T, kVec>(ro, i, s);
        if (cache_row) cache[i] = s;
      }
      src = ro;
    } else {
      for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        const V a = load<T, kVec>(xr, i);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float v = Num<T>::to_f(a.v[j]);
          ss += v * v;
        }
        if (cache_row) cache[i] = a;
      }
    }
    ss = block_sum(ss, red);
    // mean as PyTorch's CUDA mean computes it (sum times 1/K), then rsqrtf like torch.rsqrt.
    r = rsqrtf(__fmul_rn(ss, 1.f / float(p.k)) + p.eps);
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
      const V a = cache_row ? cache[i] : load<T, kVec>(src, i);
      const V y = normalize<T, kVec>(a, weight, i, r);
      accumulate<T, kVec>(y, amax, sum);
      if (cache_row) cache[i] = y;
    }
  }

  block_max_and_sum(amax, sum, red);
  const float inv = 127.f / fmaxf(amax, 1e-30f);  // IEEE division: the reference's rounding boundaries
  const bool sum_codes = p.xsum != nullptr && p.xsum_of_quantized;  // the same for every thread of the CTA
  if (threadIdx.x == 0) {
    p.scale[row] = amax / 127.f;
    if (p.xsum != nullptr && !sum_codes) p.xsum[row] = sum;
  }
  int8_t* qr = p.xq + row * p.k;
  int qsum = 0;  // sum_codes: |sum| <= 127 * K < 2^31 (the op checks K)
  for (int i = threadIdx.x; i < nv; i += blockDim.x) {
    V y;
    if (cache_row) {
      y = cache[i];
    } else if constexpr (kP == Prologue::kSiluMul || kP == Prologue::kGeluTanhMul) {
      y = gated<T, kVec, kP>(xr, p.k, i);
    } else {
      // recompute the operand exactly as in the previous phase (same inputs, same operations)
      y = normalize<T, kVec>(load<T, kVec>(src, i), weight, i, r);
    }
    QVec<kVec> q;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float t = rintf(__fmul_rn(Num<T>::to_f(y.v[j]), inv));  // __fmul_rn: no FMA contraction
      q.v[j] = static_cast<int8_t>(fminf(fmaxf(t, -127.f), 127.f));
      qsum += q.v[j];
    }
    reinterpret_cast<QVec<kVec>*>(qr)[i] = q;
  }
  if (sum_codes) {
    qsum = block_sum_int(qsum, red);
    // the reference's float(sum(xq)) * scale: one rounding of the integer, one fp32 product
    if (threadIdx.x == 0) p.xsum[row] = __fmul_rn(__int2float_rn(qsum), amax / 127.f);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, Prologue kP, int kBatch>
cudaError_t launch_batch(const Params& p, bool vectorize, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int nv = p.k / (vectorize ? kVec : 1);
  // Enough threads for one batch of kBatch vectors each, capped (the RMS kinds and decode use kBatch = 1).
  const int lanes = (nv + kBatch - 1) / kBatch;
  const int threads = std::min(max_threads<kBatch>(), std::max(32, (lanes + 31) / 32 * 32));
  const size_t row_bytes = size_t(p.k) * sizeof(T);
  const bool cache_row = row_bytes <= kMaxCachedRowBytes;
  const size_t smem = cache_row ? row_bytes : 0;
  const dim3 grid(static_cast<unsigned>(p.m));
  if (vectorize)
    fused_quant_kernel<T, kVec, kP, kBatch><<<grid, threads, smem, stream>>>(p, cache_row);
  else
    fused_quant_kernel<T, 1, kP, kBatch><<<grid, threads, smem, stream>>>(p, cache_row);
  return cudaGetLastError();
}

template <typename T, Prologue kP>
cudaError_t launch_typed(const Params& p, cudaStream_t stream, int gated_batch) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorize = p.k % kVec == 0 && aligned16(p.x) && p.x_row_stride % kVec == 0 &&
                         (kP == Prologue::kSiluMul || kP == Prologue::kGeluTanhMul || aligned16(p.weight)) &&
                         (kP != Prologue::kAddRmsNorm ||
                          (aligned16(p.residual) && p.residual_row_stride % kVec == 0 && aligned16(p.residual_out))) &&
                         reinterpret_cast<uintptr_t>(p.xq) % kVec == 0;
  // SiLU only: GeLU-tanh rows (Gemma) keep version 1 at every M until the batched launch has run on the GPU for them.
  if constexpr (kP == Prologue::kSiluMul) {
    if (p.m < kBatchedMinRows) return launch_batch<T, kP, 1>(p, vectorize, stream);
    switch (gated_batch == 0 ? kDefaultGatedBatch : gated_batch) {
      case 1: return launch_batch<T, kP, 1>(p, vectorize, stream);
      case 4: return launch_batch<T, kP, 4>(p, vectorize, stream);
      default: return launch_batch<T, kP, 2>(p, vectorize, stream);
    }
  } else {
    return launch_batch<T, kP, 1>(p, vectorize, stream);
  }
}

template <typename T>
cudaError_t launch_prologue(Prologue prologue, const Params& p, cudaStream_t stream, int gated_batch) {
  switch (prologue) {
    case Prologue::kRmsNorm: return launch_typed<T, Prologue::kRmsNorm>(p, stream, gated_batch);
    case Prologue::kAddRmsNorm: return launch_typed<T, Prologue::kAddRmsNorm>(p, stream, gated_batch);
    case Prologue::kSiluMul: return launch_typed<T, Prologue::kSiluMul>(p, stream, gated_batch);
    case Prologue::kGeluTanhMul: return launch_typed<T, Prologue::kGeluTanhMul>(p, stream, gated_batch);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch(Prologue prologue, Dtype dtype, const Params& p, cudaStream_t stream, int gated_batch) {
  if (p.m == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kHalf: return launch_prologue<half>(prologue, p, stream, gated_batch);
    case Dtype::kBFloat16: return launch_prologue<nv_bfloat16>(prologue, p, stream, gated_batch);
    case Dtype::kFloat: return launch_prologue<float>(prologue, p, stream, gated_batch);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fused_quant
}  // namespace qserve
