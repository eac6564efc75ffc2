// KV-cache write (quantize + scatter to slots) and gather (dequantize a sequence's context) kernels.
//
// Both use one warp per (token, KV head, K|V): lane l owns channels l*D/32 .. +D/32 (2, 4 or 8).  The write
// performs the reference's fp32 operations in its order with IEEE division and round-half-even
// (vllm_qserve/reference/kv.py::quantize_kv):
//     scale = (max - min) / L  (1 if that is 0), rounded to fp16;  zero = fp16(-min / scale)
//     q = clamp(rint(x / scale + zero), 0, L)
// so codes, scales and zeros are bit-identical to the reference.  The gather computes (q - zero) * scale in fp32
// (the reference's dequantize_kv) and rounds once to the output dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "kv_params.h"

namespace qserve {
namespace kv {
namespace {

constexpr int kIoWarps = 4;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<half>(half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<nv_bfloat16>(nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ half from_f<half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ nv_bfloat16 from_f<nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }

// N consecutive elements of T as one aligned vector access (N * sizeof(T) in {4, 8, 16, 32} bytes).
template <int BYTES> struct VecT;
template <> struct VecT<1> { using type = uint8_t; };
template <> struct VecT<2> { using type = uint16_t; };
template <> struct VecT<4> { using type = uint32_t; };
template <> struct VecT<8> { using type = uint2; };
template <> struct VecT<16> { using type = uint4; };

template <typename T, int N>
__device__ __forceinline__ void load_n(const T* src, bool vec, T (&v)[N]) {
  constexpr int kBytes = N * (int)sizeof(T);
  if constexpr (kBytes <= 16) {
    if (vec) {
      using V = typename VecT<kBytes>::type;
      const V x = *reinterpret_cast<const V*>(src);
      memcpy(&v, &x, kBytes);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = src[i];
}

template <typename T, int N>
__device__ __forceinline__ void store_n(T* dst, bool vec, const T (&v)[N]) {
  constexpr int kBytes = N * (int)sizeof(T);
  if constexpr (kBytes <= 16) {
    if (vec) {
      using V = typename VecT<kBytes>::type;
      V x;
      memcpy(&x, &v, kBytes);
      *reinterpret_cast<V*>(dst) = x;
      return;
    }
  } else {
    if (vec) {  // 32 bytes (8 fp32): two 16-byte stores
      uint4 x[2];
      memcpy(&x, &v, kBytes);
      reinterpret_cast<uint4*>(dst)[0] = x[0];
      reinterpret_cast<uint4*>(dst)[1] = x[1];
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = v[i];
}

template <typename T, int D, int BITS>
__global__ void __launch_bounds__(32 * kIoWarps) kv_cache_write_kernel(const WriteParams p) {
  constexpr int E = D / 32;            // channels per lane
  constexpr int kLevels = (1 << BITS) - 1;
  constexpr int kRowBytes = D * BITS / 8;
  constexpr int kLaneBytes = E * BITS / 8;
  const int64_t gw = (int64_t)blockIdx.x * kIoWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (gw >= (int64_t)p.num_tokens * p.num_kv_heads * 2) return;
  const int kvi = (int)(gw & 1);
  const int64_t th = gw >> 1;
  const int tok = (int)(th / p.num_kv_heads);
  const int h = (int)(th - (int64_t)tok * p.num_kv_heads);
  const int64_t slot = p.slots_int64 ? static_cast<const int64_t*>(p.slot_mapping)[tok]
                                     : (int64_t) static_cast<const int*>(p.slot_mapping)[tok];
  if (slot < 0 || slot >= (int64_t)p.num_blocks * p.block_size) return;  // -1 = padding; never write outside
  const int64_t blk = slot / p.block_size;
  const int off = (int)(slot - blk * p.block_size);

  const T* x = static_cast<const T*>(kvi ? p.value : p.key) +
               (int64_t)tok * (kvi ? p.value_stride0 : p.key_stride0) +
               (int64_t)h * (kvi ? p.value_stride1 : p.key_stride1) + lane * E;
  T raw[E];
  load_n<T, E>(x, p.vector_loads, raw);
  float v[E];
  float mn = INFINITY, mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < E; ++i) {
    v[i] = to_f(raw[i]);
    mn = fminf(mn, v[i]);
    mx = fmaxf(mx, v[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  float scale = __fdiv_rn(__fsub_rn(mx, mn), (float)kLevels);
  if (scale == 0.f) scale = 1.f;  // constant vector: scale 1, zero -min reproduces it
  const half scale_h = __float2half_rn(scale);
  const float sf = __half2float(scale_h);
  const half zero_h = __float2half_rn(__fdiv_rn(-mn, sf));
  const float zf = __half2float(zero_h);

  uint32_t codes[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float q = rintf(__fadd_rn(__fdiv_rn(v[i], sf), zf));
    codes[i] = (uint32_t)fminf(fmaxf(q, 0.f), (float)kLevels);
  }

  uint8_t* page = p.cache + blk * p.block_stride + kvi * p.page_bytes;
  const int64_t row = (int64_t)h * p.block_size + off;
  uint8_t* dst = page + row * kRowBytes + lane * kLaneBytes;
  if constexpr (BITS == 4) {
    uint8_t packed[kLaneBytes];
#pragma unroll
    for (int i = 0; i < kLaneBytes; ++i) packed[i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));
    store_n<uint8_t, kLaneBytes>(dst, true, packed);
  } else {
    uint8_t packed[kLaneBytes];
#pragma unroll
    for (int i = 0; i < kLaneBytes; ++i) packed[i] = (uint8_t)codes[i];
    store_n<uint8_t, kLaneBytes>(dst, true, packed);
  }
  if (lane == 0) {
    const int64_t scales_off = (int64_t)p.num_kv_heads * p.block_size * kRowBytes;
    *reinterpret_cast<half*>(page + scales_off + row * 2) = scale_h;
    *reinterpret_cast<half*>(page + scales_off + (int64_t)p.num_kv_heads * p.block_size * 2 + row * 2) = zero_h;
  }
}

template <typename O, int D, int BITS>
__global__ void __launch_bounds__(32 * kIoWarps) kv_gather_kernel(const GatherParams p) {
  constexpr int E = D / 32;
  constexpr int kRowBytes = D * BITS / 8;
  constexpr int kLaneBytes = E * BITS / 8;
  const int64_t gw = (int64_t)blockIdx.x * kIoWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int H = p.g.num_kv_heads;
  if (gw >= (int64_t)p.rows * H * 2) return;
  const int kvi = (int)(gw & 1);
  const int64_t th = gw >> 1;
  const int row = (int)(th / H);
  const int h = (int)(th - (int64_t)row * H);
  // The sequence of this output row: the last b with cu_seqlens_k[b] <= row (cu_seqlens_k is non-decreasing).
  if (p.batch <= 0 || p.cu_seqlens_k[0] > row) return;
  int lo = 0, hi = p.batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.cu_seqlens_k[mid] <= row) lo = mid; else hi = mid - 1;
  }
  const int b = lo;
  const int pos = row - p.cu_seqlens_k[b];
  const int seq_len = min(max(p.seq_lens[b], 0), p.max_blocks * p.g.block_size);
  if (pos >= seq_len) return;  // a row no sequence covers: left untouched
  const int bs = p.g.block_size;
  const int blk = p.block_table[(int64_t)b * p.bt_stride0 + pos / bs];
  if ((unsigned)blk >= (unsigned)p.g.num_blocks) return;
  const int64_t hrow = (int64_t)h * bs + (pos - (pos / bs) * bs);
  const uint8_t* page = p.g.cache + (int64_t)blk * p.g.block_stride + kvi * p.g.page_bytes;
  const int64_t scales_off = (int64_t)H * bs * kRowBytes;
  const float s = __half2float(*reinterpret_cast<const half*>(page + scales_off + hrow * 2));
  const float z = __half2float(*reinterpret_cast<const half*>(page + scales_off + (int64_t)H * bs * 2 + hrow * 2));
  uint8_t bytes[kLaneBytes];
  load_n<uint8_t, kLaneBytes>(page + hrow * kRowBytes + lane * kLaneBytes, true, bytes);
  O out[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const uint32_t c = BITS == 4 ? ((bytes[i >> 1] >> ((i & 1) * 4)) & 0xF) : bytes[i];
    out[i] = from_f<O>(__fmul_rn(__fsub_rn((float)c, z), s));
  }
  O* dst = static_cast<O*>(kvi ? p.value_out : p.key_out) + (int64_t)row * (kvi ? p.value_stride0 : p.key_stride0) +
           (int64_t)h * (kvi ? p.value_stride1 : p.key_stride1) + lane * E;
  store_n<O, E>(dst, p.vector_stores, out);
}

template <typename T, int BITS>
cudaError_t launch_write_t(const WriteParams& p, int head_dim, cudaStream_t stream) {
  const int64_t warps = (int64_t)p.num_tokens * p.num_kv_heads * 2;
  const int64_t blocks = (warps + kIoWarps - 1) / kIoWarps;
  if (blocks == 0) return cudaSuccess;
  switch (head_dim) {
    case 64: kv_cache_write_kernel<T, 64, BITS><<<blocks, 32 * kIoWarps, 0, stream>>>(p); break;
    case 128: kv_cache_write_kernel<T, 128, BITS><<<blocks, 32 * kIoWarps, 0, stream>>>(p); break;
    case 256: kv_cache_write_kernel<T, 256, BITS><<<blocks, 32 * kIoWarps, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename O, int BITS>
cudaError_t launch_gather_t(const GatherParams& p, int head_dim, cudaStream_t stream) {
  const int64_t warps = (int64_t)p.rows * p.g.num_kv_heads * 2;
  const int64_t blocks = (warps + kIoWarps - 1) / kIoWarps;
  if (blocks == 0) return cudaSuccess;
  switch (head_dim) {
    case 64: kv_gather_kernel<O, 64, BITS><<<blocks, 32 * kIoWarps, 0, stream>>>(p); break;
    case 128: kv_gather_kernel<O, 128, BITS><<<blocks, 32 * kIoWarps, 0, stream>>>(p); break;
    case 256: kv_gather_kernel<O, 256, BITS><<<blocks, 32 * kIoWarps, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kv_cache_write(const WriteParams& p, int head_dim, int bits, int dtype, cudaStream_t stream) {
  if (dtype == 0) return bits == 4 ? launch_write_t<half, 4>(p, head_dim, stream) : launch_write_t<half, 8>(p, head_dim, stream);
  if (dtype == 1)
    return bits == 4 ? launch_write_t<nv_bfloat16, 4>(p, head_dim, stream)
                     : launch_write_t<nv_bfloat16, 8>(p, head_dim, stream);
  return cudaErrorInvalidValue;
}

cudaError_t launch_kv_gather(const GatherParams& p, int head_dim, int bits, int dtype, cudaStream_t stream) {
  switch (dtype) {
    case 0: return bits == 4 ? launch_gather_t<half, 4>(p, head_dim, stream) : launch_gather_t<half, 8>(p, head_dim, stream);
    case 1:
      return bits == 4 ? launch_gather_t<nv_bfloat16, 4>(p, head_dim, stream)
                       : launch_gather_t<nv_bfloat16, 8>(p, head_dim, stream);
    case 2: return bits == 4 ? launch_gather_t<float, 4>(p, head_dim, stream) : launch_gather_t<float, 8>(p, head_dim, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kv
}  // namespace qserve
