// PTX wrappers and code-unpacking helpers of the KV-cache attention kernels (sm80+).
//
// Codes become fp16 with the magic-number trick: OR-ing a 4- or 8-bit code c into the mantissa of 1024.0 (0x6400,
// whose mantissa unit is exactly 1) gives the fp16 value 1024 + c; subtracting 1024 leaves c exactly.  A high
// nibble (bits 4..7) gives 1024 + 16c, and (1024 + 16c) / 16 - 64 = c is one exact f16x2 FMA.  All code values are
// small integers, exact in fp16, so the tensor cores see the codes themselves and the per-token scale and zero are
// applied outside the MMA in fp32 (kv_decode.cuh explains why).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace qserve {
namespace kv {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy, L1 bypassed (.cg: the KV stream is read once).  pred == false: nothing is read
// and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l supplies the address of row (l % 8) of matrix (l / 8).
// Plain: register i of lane l = row l/4, b16 columns 2(l%4), 2(l%4)+1 of matrix i (4 consecutive bytes of a row).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// Transposed: register i of lane l = {row 2(l%4), row 2(l%4)+1} of b16 column l/4 of matrix i, i.e. the same two
// bytes of two consecutive rows: bytes [row0.b(2c), row0.b(2c+1), row1.b(2c), row1.b(2c+1)] with c = l/4.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A(16x16, row) * B(16x8, col) + D, fp16 inputs, fp32 accumulation.  Fragments (g = lane/4, t = lane%4):
// A regs {row g, k 2t..2t+1}, {row g+8, k 2t..}, {row g, k 2t+8..}, {row g+8, k 2t+8..};
// B regs {k 2t..2t+1, n g}, {k 2t+8..2t+9, n g};  C/D {row g, n 2t}, {row g, n 2t+1}, {row g+8, n 2t}, {.., 2t+1}.
__device__ __forceinline__ void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Transpose of an 8x8 b16 matrix held one 32-bit register per lane (row l/4, columns 2(l%4), 2(l%4)+1).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t hsub2_u32(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ uint32_t hfma2_u32(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

constexpr uint32_t kMagic1024x2 = 0x64006400u;  // half2(1024, 1024)
constexpr uint32_t kSixteenthx2 = 0x2C002C00u;  // half2(1/16, 1/16)
constexpr uint32_t kMinus64x2 = 0xD400D400u;    // half2(-64, -64)

// Nibbles at bits 0-3 and 16-19 of w -> half2 (low half from bits 0-3).
__device__ __forceinline__ uint32_t nib_lo(uint32_t w) {
  return hsub2_u32((w & 0x000F000Fu) | kMagic1024x2, kMagic1024x2);
}
// Nibbles at bits 4-7 and 20-23 of w -> half2.
__device__ __forceinline__ uint32_t nib_hi(uint32_t w) {
  return hfma2_u32((w & 0x00F000F0u) | kMagic1024x2, kSixteenthx2, kMinus64x2);
}
// Two code bytes of w -> half2 of their values.  kSel is a __byte_perm selector that places the two code bytes
// at byte positions 0 and 2 and 0x64 (selector value 4: byte 0 of 0x64646464) at positions 1 and 3, e.g. 0x4140
// for bytes 0 and 1, 0x4342 for bytes 2 and 3.
template <uint32_t kSel>
__device__ __forceinline__ uint32_t byte_pair(uint32_t w) {
  return hsub2_u32(__byte_perm(w, 0x64646464u, kSel), kMagic1024x2);
}

}  // namespace kv
}  // namespace qserve
