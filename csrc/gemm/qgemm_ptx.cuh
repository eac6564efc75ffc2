// Thin PTX wrappers used by the int8 tensor-core GEMMs (sm80+): cp.async, ldmatrix, mma.sync m16n8k32 s8.
// Kept in one place so that every kernel spells the instructions the same way and the asm constraints are
// reviewed once.
#pragma once

#include <cstdint>

namespace qserve {
namespace gemm {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1 (.cg: every operand tile is used once per CTA).  When `pred`
// is false the source size is 0, so the 16 destination bytes are zero-filled and nothing is read: this is how
// rows past M and k/n tiles past K/N are neutralised (a zero activation contributes nothing to any sum).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices (= four 8-row x 16-byte int8 blocks).  Lane l supplies the row address of matrix l/8;
// register i of every lane receives row (lane/4), bytes 4*(lane%4)..+3 of matrix i -- exactly the A (and the
// row-major-[N,K] B) fragment layout of mma.m16n8k32 s8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// D = A(16x32, row) * B(32x8, col) + D with s8 inputs and s32 accumulation.
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte-wise a + b mod 256 (no carry between the four byte lanes), the arithmetic of __vadd4 written so that
// the compiler emits LOP3/IADD only: add the low 7 bits of each byte (cannot carry out of the byte), then fix
// the top bit with an XOR.  `b_lo` = b & 0x7f7f7f7f and `b_hi` = b & 0x80808080 are precomputed per group.
__device__ __forceinline__ uint32_t add_bytes(uint32_t a, uint32_t b_lo, uint32_t b_hi) {
  const uint32_t s = (a & 0x7f7f7f7fu) + b_lo;
  return s ^ ((a & 0x80808080u) ^ b_hi);
}

}  // namespace gemm
}  // namespace qserve
