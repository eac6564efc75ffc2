// Plain-C++ view of the KV-cache kernels (csrc/attention/): parameter blocks, the split rule shared by host and
// device, and the launcher prototypes.  Included by the .cu launchers and by kv_cache_ops.cpp (host C++: argument
// checks, workspace allocation).  Every exception lives in kv_cache_ops.cpp; launchers return a cudaError_t.
//
// Cache layout (vllm_qserve/reference/kv.py is the contract): the cache is uint8 [num_blocks, 2, page_bytes]
// (K page, then V page of each block); a page holds
//     data   [H][block_size][D * bits / 8]   (KV4: channel 2i in the low nibble of byte i, 2i+1 in the high)
//     scales [H][block_size] fp16
//     zeros  [H][block_size] fp16
// so page_bytes = H * block_size * (D * bits / 8 + 4).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#if defined(__CUDACC__)
#define QSERVE_HD __host__ __device__ __forceinline__
#else
#define QSERVE_HD inline
#endif

namespace qserve {
namespace kv {

// Tokens per split of the flash-decoding grid are a multiple of this (4 warps x 16-token tiles).
constexpr int kSplitAlign = 64;
// A split is never shorter than this (the per-split fixed cost -- Q load, combine, workspace row -- must stay
// small against the KV bytes it streams).
constexpr int kMinSplitTokens = 128;
constexpr int kMaxSplits = 64;
// Tokens per warp tile of the decode kernel (the M of its MMAs); a sliding window starts reading at a multiple.
constexpr int kDecodeTileTokens = 16;

// Tokens handled by each split of a sequence of `seq_len` tokens when the grid has `num_splits` splits.  Depends on
// seq_len (a device value) so that short sequences still spread over the splits; the number of splits itself
// depends on shapes only (CUDA-graph capturable).  The decode kernel and the split-reduce kernel both call this.
QSERVE_HD int split_tokens(int seq_len, int num_splits) {
  if (seq_len <= 0) return 0;
  int c = (seq_len + num_splits - 1) / num_splits;
  c = (c + kSplitAlign - 1) / kSplitAlign * kSplitAlign;
  if (num_splits > 1 && c < kMinSplitTokens) c = kMinSplitTokens;
  return c;
}

struct CacheGeometry {
  const uint8_t* cache;    // [num_blocks, 2, page_bytes]; K page at +0, V page at +page_bytes
  int64_t block_stride;    // bytes between blocks (cache.stride(0))
  int64_t page_bytes;
  int num_blocks;
  int block_size;
  int block_size_log2;     // log2(block_size) when it is a power of two (every block size vLLM uses), else -1
  int num_kv_heads;
};

struct WriteParams {
  const void* key;         // [T, H, D] fp16/bf16, last dim contiguous
  const void* value;
  int64_t key_stride0, key_stride1, value_stride0, value_stride1;  // elements
  const void* slot_mapping;  // int64 or int32 [>= T]
  bool slots_int64;
  bool vector_loads;       // every row start is aligned for (D/32)-element vector loads
  uint8_t* cache;
  int64_t block_stride, page_bytes;
  int num_blocks, block_size, num_kv_heads;
  int num_tokens;
};

struct GatherParams {
  CacheGeometry g;
  const int* block_table;  // [>= B, max_blocks]
  int64_t bt_stride0;
  int max_blocks;
  const int* seq_lens;     // [>= B]
  const int* cu_seqlens_k; // [>= B]
  int batch;
  void* key_out;           // [rows, H, D], last dim contiguous
  void* value_out;
  int64_t key_stride0, key_stride1, value_stride0, value_stride1;  // elements
  bool vector_stores;      // every output row start is aligned for (D/32)-element vector stores
  int rows;
};

struct DecodeParams {
  CacheGeometry g;
  const int* block_table;  // [>= B, max_blocks]
  int64_t bt_stride0;
  int max_blocks;
  const int* seq_lens;     // [>= B], total length including the new token
  const void* query;       // [B, Hq, D]
  int64_t q_stride0, q_stride1;  // elements
  void* out;               // [B, Hq, D]
  int64_t o_stride0, o_stride1;  // elements
  float* ws_o;             // [num_splits, B, Hq, D] fp32 (split partials, normalised), when num_splits > 1
  float* ws_ml;            // [num_splits, B, Hq, 2] fp32 (log2-domain max, sum of exp)
  int batch, num_q_heads, group;   // group = Hq / H
  int heads_per_cta;       // 8 or 16 query heads of one KV group per CTA
  int head_chunks;         // ceil(group / heads_per_cta)
  int num_splits;
  float scale_log2;        // softmax_scale * log2(e)
  int sliding_window;      // > 0: attend to the last sliding_window positions only (vLLM's convention); 0: all
};

// First position the query at seq_len - 1 attends to, and the tile-aligned position the decode kernel starts
// reading at.  Pages wholly older than the window are never read (vLLM's sliding-window manager may already have
// handed them to other requests); the few positions of the first tile that precede the window share a page with
// in-window positions and are masked.  Host and device (split kernel and split reduction) use the same rule.
QSERVE_HD int window_first(int seq_len, int sliding_window) {
  return (sliding_window > 0 && seq_len > sliding_window) ? seq_len - sliding_window : 0;
}
QSERVE_HD int window_read_start(int seq_len, int sliding_window, int tile) {
  return window_first(seq_len, sliding_window) / tile * tile;
}

// dtype codes: 0 = fp16, 1 = bf16, 2 = fp32 (gather output only).
cudaError_t launch_kv_cache_write(const WriteParams& p, int head_dim, int bits, int dtype, cudaStream_t stream);
cudaError_t launch_kv_gather(const GatherParams& p, int head_dim, int bits, int dtype, cudaStream_t stream);
// Decode: the per-split kernel and, when p.num_splits > 1, the split reduction.  Implemented per bit width
// (kv_decode_kv4.cu, kv_decode_kv8.cu) so that the two instantiation sets compile in parallel.
cudaError_t launch_kv_decode_kv4(const DecodeParams& p, int head_dim, int dtype, cudaStream_t stream);
cudaError_t launch_kv_decode_kv8(const DecodeParams& p, int head_dim, int dtype, cudaStream_t stream);

}  // namespace kv
}  // namespace qserve
