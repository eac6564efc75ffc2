// torch ops of the KV4/KV8 cache (csrc/attention/): schemas, every argument check (messages name the problem),
// workspace allocation and the launch on the current stream.  Host C++ only (g++); the CUDA launchers never throw.
// Fakes (for Dynamo / CUDA-graph capture): vllm_qserve/attention_ops.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "kv_params.h"

#define KCHECK(cond, ...) TORCH_CHECK(cond, "qserve: ", op, ": ", __VA_ARGS__)

namespace qserve {
namespace kv {
namespace {

// Integers reach messages through std::to_string, never ostream::operator<<(int64_t): that operator crashed on
// the GPU image (csrc/gemm/gemm_ops.cpp explains).
std::string S(int64_t v) { return std::to_string(v); }
std::string shape(const at::Tensor& t) {
  std::string r = "[";
  for (int64_t i = 0; i < t.dim(); ++i) r += (i ? ", " : "") + std::to_string(t.size(i));
  return r + "]";
}
std::string strides(const at::Tensor& t) {
  std::string r = "[";
  for (int64_t i = 0; i < t.dim(); ++i) r += (i ? ", " : "") + std::to_string(t.stride(i));
  return r + "]";
}
bool aligned(const at::Tensor& t, int64_t bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }
int dtype_code(at::ScalarType s) { return s == at::kHalf ? 0 : s == at::kBFloat16 ? 1 : s == at::kFloat ? 2 : -1; }

void check_on(const char* op, const char* name, const at::Tensor& t, const at::Device& dev) {
  KCHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  KCHECK(t.device() == dev, name, " is on ", t.device(), " but kv_cache on ", dev);
}

void check_head_dim(const char* op, int64_t d) {
  KCHECK(d == 64 || d == 128 || d == 256, "head_dim must be 64, 128 or 256, got ", S(d));
}

// kv_cache [num_blocks, 2, page_bytes] (uint8, or int8 as vLLM allocates KV8) -> geometry; block_size follows
// from page_bytes = H * block_size * (D * bits / 8 + 4).
CacheGeometry check_cache(const char* op, const at::Tensor& cache, int64_t num_kv_heads, int64_t head_dim,
                          int64_t bits) {
  KCHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", S(bits));
  KCHECK(num_kv_heads > 0, "num_kv_heads must be positive, got ", S(num_kv_heads));
  check_head_dim(op, head_dim);
  KCHECK(cache.is_cuda(), "kv_cache must be a CUDA tensor, got ", cache.device());
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(cache.device().index());
  KCHECK(prop->major >= 8, "the KV-cache kernels need compute capability 8.0 or newer (sm80+: cp.async, mma.sync ",
         "f16), this GPU is ", S(prop->major), ".", S(prop->minor));
  KCHECK(cache.scalar_type() == at::kByte || cache.scalar_type() == at::kChar,
         "kv_cache must be uint8 (or int8), got ", cache.scalar_type());
  KCHECK(cache.dim() == 3 && cache.size(1) == 2, "kv_cache must be [num_blocks, 2, page_bytes], got shape ",
         shape(cache));
  const int64_t page = cache.size(2);
  KCHECK(cache.stride(2) == 1 && cache.stride(1) == page,
         "the K and V pages of a kv_cache block must be contiguous (strides [*, page_bytes, 1]), got strides ",
         strides(cache));
  const int64_t per_token = num_kv_heads * (head_dim * bits / 8 + 4);
  KCHECK(page > 0 && page % per_token == 0, "kv_cache page of ", S(page), " bytes is not a multiple of num_kv_heads",
         " * (head_dim * bits / 8 + 4) = ", S(num_kv_heads), " * (", S(head_dim), " * ", S(bits), " / 8 + 4) = ",
         S(per_token), " (num_kv_heads, head_dim or bits do not match the cache)");
  KCHECK(aligned(cache, 16) && (cache.size(0) <= 1 || cache.stride(0) % 16 == 0), "kv_cache must be 16-byte ",
         "aligned (data pointer and block stride), got block stride ", S(cache.stride(0)));
  KCHECK(cache.size(0) <= 1 || cache.stride(0) >= 2 * page, "kv_cache blocks overlap: block stride ",
         S(cache.stride(0)), " < 2 * page_bytes = ", S(2 * page));
  KCHECK(cache.size(0) < (int64_t(1) << 31), "kv_cache has too many blocks (", S(cache.size(0)), ")");
  CacheGeometry g;
  g.cache = static_cast<const uint8_t*>(cache.data_ptr());
  g.block_stride = cache.stride(0);
  g.page_bytes = page;
  g.num_blocks = static_cast<int>(cache.size(0));
  g.block_size = static_cast<int>(page / per_token);
  g.block_size_log2 = -1;
  for (int sh = 0; sh < 31; ++sh)
    if ((1 << sh) == g.block_size) g.block_size_log2 = sh;
  g.num_kv_heads = static_cast<int>(num_kv_heads);
  return g;
}

void check_int32_vec(const char* op, const char* name, const at::Tensor& t, int64_t min_len, const at::Device& dev) {
  check_on(op, name, t, dev);
  KCHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  KCHECK(t.dim() == 1 && t.stride(0) == 1, name, " must be a contiguous 1-D tensor, got shape ", shape(t),
         " strides ", strides(t));
  KCHECK(t.size(0) >= min_len, name, " has ", S(t.size(0)), " entries, need at least ", S(min_len));
}

void check_block_table(const char* op, const at::Tensor& bt, int64_t batch, const CacheGeometry& g,
                       const at::Device& dev) {
  check_on(op, "block_table", bt, dev);
  KCHECK(bt.scalar_type() == at::kInt, "block_table must be int32, got ", bt.scalar_type());
  KCHECK(bt.dim() == 2 && (bt.size(1) <= 1 || bt.stride(1) == 1),
         "block_table must be 2-D [batch, max_blocks] with contiguous rows, got shape ", shape(bt), " strides ",
         strides(bt));
  KCHECK(bt.size(0) >= batch, "block_table has ", S(bt.size(0)), " rows, need at least batch = ", S(batch));
  KCHECK(bt.size(1) * g.block_size <= (int64_t(1) << 30), "block_table covers ", S(bt.size(1)), " blocks of ",
         S(g.block_size), " tokens: more than 2^30 tokens per sequence");
}

// [rows, H, D] fp16/bf16 (fp32 where allowed) with a contiguous last dim.
void check_heads_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& dev, bool allow_fp32) {
  check_on(op, name, t, dev);
  const auto s = t.scalar_type();
  KCHECK(s == at::kHalf || s == at::kBFloat16 || (allow_fp32 && s == at::kFloat), name, " must be float16 or ",
         "bfloat16", allow_fp32 ? " (or float32)" : "", ", got ", s);
  KCHECK(t.dim() == 3, name, " must be 3-D [tokens, heads, head_dim], got shape ", shape(t));
  KCHECK(t.size(2) <= 1 || t.stride(2) == 1, name, "'s last dim must be contiguous, got strides ", strides(t));
  KCHECK(t.size(0) < (int64_t(1) << 31), name, " has too many rows (", S(t.size(0)), ")");
}

// Row starts of t aligned for `elems`-element vector accesses?
bool vector_ok(const at::Tensor& t, int64_t elems) {
  return aligned(t, elems * t.element_size()) && t.stride(0) % elems == 0 && t.stride(1) % elems == 0;
}

void check_launch(const char* op, cudaError_t e) {
  KCHECK(e == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(e));
}

// ------------------------------------------------------------------------------------------------------------
void kv_cache_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& kv_cache,
                    const at::Tensor& slot_mapping, int64_t num_kv_heads, int64_t bits) {
  constexpr const char* op = "kv_cache_write";
  KCHECK(key.dim() == 3, "key must be 3-D [tokens, num_kv_heads, head_dim], got shape ", shape(key));
  const CacheGeometry g = check_cache(op, kv_cache, num_kv_heads, key.size(2), bits);
  const at::Device dev = kv_cache.device();
  check_heads_tensor(op, "key", key, dev, false);
  check_heads_tensor(op, "value", value, dev, false);
  KCHECK(value.sizes() == key.sizes(), "value ", shape(value), " and key ", shape(key), " must have the same shape");
  KCHECK(value.scalar_type() == key.scalar_type(), "value (", value.scalar_type(), ") and key (", key.scalar_type(),
         ") must have the same dtype");
  KCHECK(key.size(1) == num_kv_heads, "key has ", S(key.size(1)), " heads but num_kv_heads = ", S(num_kv_heads));
  check_on(op, "slot_mapping", slot_mapping, dev);
  KCHECK(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
         "slot_mapping must be int64 (or int32), got ", slot_mapping.scalar_type());
  KCHECK(slot_mapping.dim() == 1 && slot_mapping.stride(0) == 1, "slot_mapping must be a contiguous 1-D tensor, ",
         "got shape ", shape(slot_mapping));
  KCHECK(slot_mapping.size(0) >= key.size(0), "slot_mapping has ", S(slot_mapping.size(0)), " entries for ",
         S(key.size(0)), " tokens");
  const at::cuda::CUDAGuard guard(dev);
  if (key.size(0) == 0) return;
  const int64_t d = key.size(2);
  WriteParams p;
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_stride0 = key.stride(0), p.key_stride1 = key.stride(1);
  p.value_stride0 = value.stride(0), p.value_stride1 = value.stride(1);
  p.slot_mapping = slot_mapping.data_ptr();
  p.slots_int64 = slot_mapping.scalar_type() == at::kLong;
  p.vector_loads = vector_ok(key, d / 32) && vector_ok(value, d / 32);
  p.cache = static_cast<uint8_t*>(kv_cache.data_ptr());
  p.block_stride = g.block_stride, p.page_bytes = g.page_bytes;
  p.num_blocks = g.num_blocks, p.block_size = g.block_size, p.num_kv_heads = g.num_kv_heads;
  p.num_tokens = static_cast<int>(key.size(0));
  check_launch(op, launch_kv_cache_write(p, static_cast<int>(d), static_cast<int>(bits), dtype_code(key.scalar_type()),
                                         at::cuda::getCurrentCUDAStream()));
}

// ------------------------------------------------------------------------------------------------------------
void kv_gather_dequant(const at::Tensor& kv_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                       const at::Tensor& cu_seqlens_k, at::Tensor& key_out, at::Tensor& value_out, int64_t num_kv_heads,
                       int64_t bits) {
  constexpr const char* op = "kv_gather_dequant";
  KCHECK(key_out.dim() == 3, "key_out must be 3-D [tokens, num_kv_heads, head_dim], got shape ", shape(key_out));
  const CacheGeometry g = check_cache(op, kv_cache, num_kv_heads, key_out.size(2), bits);
  const at::Device dev = kv_cache.device();
  check_heads_tensor(op, "key_out", key_out, dev, true);
  check_heads_tensor(op, "value_out", value_out, dev, true);
  KCHECK(value_out.sizes() == key_out.sizes(), "value_out ", shape(value_out), " and key_out ", shape(key_out),
         " must have the same shape");
  KCHECK(value_out.scalar_type() == key_out.scalar_type(), "value_out and key_out must have the same dtype");
  KCHECK(key_out.size(1) == num_kv_heads, "key_out has ", S(key_out.size(1)), " heads but num_kv_heads = ",
         S(num_kv_heads));
  KCHECK(seq_lens.dim() == 1, "seq_lens must be 1-D, got shape ", shape(seq_lens));
  const int64_t batch = seq_lens.size(0);
  check_int32_vec(op, "seq_lens", seq_lens, batch, dev);
  check_int32_vec(op, "cu_seqlens_k", cu_seqlens_k, batch, dev);
  check_block_table(op, block_table, batch, g, dev);
  const at::cuda::CUDAGuard guard(dev);
  if (batch == 0 || key_out.size(0) == 0) return;
  const int64_t d = key_out.size(2);
  GatherParams p;
  p.g = g;
  p.block_table = block_table.data_ptr<int>();
  p.bt_stride0 = block_table.stride(0);
  p.max_blocks = static_cast<int>(block_table.size(1));
  p.seq_lens = seq_lens.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  p.batch = static_cast<int>(batch);
  p.key_out = key_out.data_ptr();
  p.value_out = value_out.data_ptr();
  p.key_stride0 = key_out.stride(0), p.key_stride1 = key_out.stride(1);
  p.value_stride0 = value_out.stride(0), p.value_stride1 = value_out.stride(1);
  p.vector_stores = vector_ok(key_out, d / 32) && vector_ok(value_out, d / 32);
  p.rows = static_cast<int>(key_out.size(0));
  check_launch(op, launch_kv_gather(p, static_cast<int>(d), static_cast<int>(bits), dtype_code(key_out.scalar_type()),
                                    at::cuda::getCurrentCUDAStream()));
}

// ------------------------------------------------------------------------------------------------------------
struct DecodeSetup {
  DecodeParams p;
  int64_t head_dim;
};

// Number of splits of the sequence: from shapes only (so one CUDA graph serves every seq_lens).  Enough CTAs to
// give every SM ~3 (with 4 resident per SM, one wave), never splits shorter than kMinSplitTokens of the
// block table's capacity.
int heuristic_splits(int64_t ctas, int64_t max_tokens, int num_sms) {
  const int64_t want = (3 * int64_t(num_sms) + ctas - 1) / ctas;
  const int64_t by_len = std::max<int64_t>(1, max_tokens / kMinSplitTokens);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, by_len, int64_t(kMaxSplits)})));
}

DecodeSetup check_decode(const char* op, const at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                         const at::Tensor& block_table, const at::Tensor& seq_lens, double softmax_scale,
                         int64_t num_kv_heads, int64_t bits, int64_t num_splits, int64_t sliding_window) {
  KCHECK(query.dim() == 3, "query must be 3-D [batch, num_q_heads, head_dim], got shape ", shape(query));
  const CacheGeometry g = check_cache(op, kv_cache, num_kv_heads, query.size(2), bits);
  const at::Device dev = kv_cache.device();
  check_heads_tensor(op, "query", query, dev, false);
  check_heads_tensor(op, "out", out, dev, false);
  KCHECK(out.sizes() == query.sizes(), "out ", shape(out), " and query ", shape(query), " must have the same shape");
  KCHECK(out.scalar_type() == query.scalar_type(), "out (", out.scalar_type(), ") and query (", query.scalar_type(),
         ") must have the same dtype");
  const int64_t batch = query.size(0), hq = query.size(1), d = query.size(2);
  KCHECK(hq > 0 && hq % num_kv_heads == 0, "num_q_heads (", S(hq), ") must be a positive multiple of num_kv_heads (",
         S(num_kv_heads), ")");
  for (const at::Tensor* t : {&query, &out}) {
    const char* name = t == &query ? "query" : "out";
    KCHECK(aligned(*t, 16) && t->stride(0) % 8 == 0 && t->stride(1) % 8 == 0, name,
           " must be 16-byte aligned with strides that are multiples of 8 elements, got strides ", strides(*t));
  }
  KCHECK(g.block_size % 16 == 0, "decode needs a block_size that is a multiple of 16, the cache has ",
         S(g.block_size));
  check_int32_vec(op, "seq_lens", seq_lens, batch, dev);
  check_block_table(op, block_table, batch, g, dev);
  KCHECK(std::isfinite(softmax_scale), "softmax_scale must be finite");
  KCHECK(num_splits <= 256, "num_splits must be <= 256 (or <= 0 for automatic), got ", S(num_splits));
  KCHECK(sliding_window >= 0 && sliding_window <= INT32_MAX, "sliding_window must be >= 0 (0 = no window), got ",
         S(sliding_window));

  DecodeSetup s;
  DecodeParams& p = s.p;
  s.head_dim = d;
  p.g = g;
  p.block_table = block_table.data_ptr<int>();
  p.bt_stride0 = block_table.stride(0);
  p.max_blocks = static_cast<int>(block_table.size(1));
  p.seq_lens = seq_lens.data_ptr<int>();
  p.query = query.data_ptr();
  p.q_stride0 = query.stride(0), p.q_stride1 = query.stride(1);
  p.out = out.data_ptr();
  p.o_stride0 = out.stride(0), p.o_stride1 = out.stride(1);
  p.ws_o = nullptr, p.ws_ml = nullptr;
  p.batch = static_cast<int>(batch);
  p.num_q_heads = static_cast<int>(hq);
  p.group = static_cast<int>(hq / num_kv_heads);
  // 16 query heads per CTA (two n8 tiles) for large groups, except D = 256 (registers); more heads -> chunks.
  p.heads_per_cta = (p.group > 8 && d <= 128) ? 16 : 8;
  p.head_chunks = (p.group + p.heads_per_cta - 1) / p.heads_per_cta;
  KCHECK(num_kv_heads * p.head_chunks <= 65535, "too many KV heads x head chunks for the grid (",
         S(num_kv_heads * p.head_chunks), ")");
  if (num_splits <= 0) {
    const int sms = at::cuda::getDeviceProperties(dev.index())->multiProcessorCount;
    // With a window a split never sees more than window + one tile of positions, whatever the table's capacity.
    int64_t max_tokens = int64_t(p.max_blocks) * g.block_size;
    if (sliding_window > 0) max_tokens = std::min<int64_t>(max_tokens, sliding_window + kDecodeTileTokens);
    num_splits = heuristic_splits(batch * num_kv_heads * p.head_chunks, max_tokens, sms);
  }
  p.num_splits = static_cast<int>(num_splits);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.sliding_window = static_cast<int>(sliding_window);
  return s;
}

void kv_paged_decode_splits(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                            const at::Tensor& block_table, const at::Tensor& seq_lens, double softmax_scale,
                            int64_t num_kv_heads, int64_t bits, int64_t num_splits, int64_t sliding_window) {
  constexpr const char* op = "kv_paged_decode";
  DecodeSetup s = check_decode(op, out, query, kv_cache, block_table, seq_lens, softmax_scale, num_kv_heads, bits,
                               num_splits, sliding_window);
  DecodeParams& p = s.p;
  const at::cuda::CUDAGuard guard(kv_cache.device());
  if (p.batch == 0) return;
  at::Tensor ws;
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.num_splits) * p.batch * p.num_q_heads;
    ws = at::empty({rows * (s.head_dim + 2)}, query.options().dtype(at::kFloat));
    p.ws_o = ws.data_ptr<float>();
    p.ws_ml = p.ws_o + rows * s.head_dim;
  }
  const int dt = dtype_code(query.scalar_type());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int d = static_cast<int>(s.head_dim);
  check_launch(op, bits == 4 ? launch_kv_decode_kv4(p, d, dt, stream) : launch_kv_decode_kv8(p, d, dt, stream));
}

void kv_paged_decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& kv_cache,
                     const at::Tensor& block_table, const at::Tensor& seq_lens, double softmax_scale,
                     int64_t num_kv_heads, int64_t bits, int64_t sliding_window) {
  kv_paged_decode_splits(out, query, kv_cache, block_table, seq_lens, softmax_scale, num_kv_heads, bits, -1,
                         sliding_window);
}

int64_t kv_decode_num_splits(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_table,
                             int64_t num_kv_heads, int64_t bits, int64_t sliding_window) {
  constexpr const char* op = "kv_decode_num_splits";
  const at::Tensor seq_lens = at::empty({query.size(0)}, block_table.options());
  return check_decode(op, query, query, kv_cache, block_table, seq_lens, 1.0, num_kv_heads, bits, -1, sliding_window)
      .p.num_splits;
}

}  // namespace
}  // namespace kv
}  // namespace qserve

TORCH_LIBRARY_FRAGMENT(qserve, m) {
  // KV4/KV8 paged cache (layout: vllm_qserve/reference/kv.py).  kv_cache uint8 (or int8) [num_blocks, 2,
  // page_bytes]; block_size = page_bytes / (num_kv_heads * (head_dim * bits / 8 + 4)).
  //   key/value [T, H, D] fp16/bf16 (strided rows allowed); slot_mapping int64 [>= T]: block * block_size +
  //   offset, -1 = padding (skipped).  Codes, scales and zeros are bit-identical to the reference.
  m.def("kv_cache_write(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, int num_kv_heads, "
        "int bits) -> ()");
  //   One query token per sequence: query/out [B, Hq, D] fp16/bf16, block_table int32 [>= B, max_blocks],
  //   seq_lens int32 [>= B] (including the new token, already in the cache).  D in {64, 128, 256}, any Hq/H,
  //   block_size % 16 == 0.  Splits over the sequence chosen from shapes (CUDA-graph capturable).
  //   sliding_window > 0: the query (position seq_len - 1) attends to positions >= seq_len - sliding_window only
  //   (vLLM's / FlashAttention's window_size = (sliding_window - 1, 0)); older pages are never read.
  m.def("kv_paged_decode(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
        "float softmax_scale, int num_kv_heads, int bits, int sliding_window=0) -> ()");
  //   The same with an explicit number of splits (<= 0: automatic), for tuning and tests.
  m.def("kv_paged_decode_splits(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_table, "
        "Tensor seq_lens, float softmax_scale, int num_kv_heads, int bits, int num_splits, "
        "int sliding_window=0) -> ()");
  //   The number of splits kv_paged_decode uses for these shapes.
  m.def("kv_decode_num_splits(Tensor query, Tensor kv_cache, Tensor block_table, int num_kv_heads, int bits, "
        "int sliding_window=0) -> int");
  //   Rows cu_seqlens_k[b] .. + seq_lens[b] of key_out/value_out [rows, H, D] (fp16/bf16/fp32) receive the
  //   dequantized K/V of positions 0 .. seq_lens[b] - 1 of sequence b; other rows are not touched.
  m.def("kv_gather_dequant(Tensor kv_cache, Tensor block_table, Tensor seq_lens, Tensor cu_seqlens_k, "
        "Tensor(a!) key_out, Tensor(a!) value_out, int num_kv_heads, int bits) -> ()");
}

TORCH_LIBRARY_IMPL(qserve, CUDA, m) {
  m.impl("kv_cache_write", &qserve::kv::kv_cache_write);
  m.impl("kv_paged_decode", &qserve::kv::kv_paged_decode);
  m.impl("kv_paged_decode_splits", &qserve::kv::kv_paged_decode_splits);
  m.impl("kv_decode_num_splits", &qserve::kv::kv_decode_num_splits);
  m.impl("kv_gather_dequant", &qserve::kv::kv_gather_dequant);
}
