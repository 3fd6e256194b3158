// The interface between the torch binding (bitmask_linear.cpp) and the per-instruction-set
// row kernels (bitmask_rows_*.cpp): plain pointers only, so the kernel translation units
// need no torch header.
#pragma once

#include <cstdint>

namespace lz {

enum class VKind { BF16, FP16, FP32 };

// y[b, r] = sum_c W[r, c] * x[b, c] for rows r in [r0, r1), b < batch.
struct RowsArgs {
  const float* x;              // [batch, ldx] fp32, ldx = 8 * mbytes (zero-padded columns)
  int64_t ldx;
  int64_t batch;
  const uint8_t* mask;         // [out, mbytes]
  int64_t mbytes;
  const void* values;          // packed nonzeros of `kind`, 16 zeros after the last
  VKind kind;
  const int64_t* row_offsets;  // [out + 1]
  float* y;                    // [batch, ldy] fp32
  int64_t ldy;
};

using RowsFn = void (*)(const RowsArgs&, int64_t r0, int64_t r1);

void rows_scalar(const RowsArgs& a, int64_t r0, int64_t r1);
#if defined(__x86_64__) || defined(_M_X64)
void rows_avx2(const RowsArgs& a, int64_t r0, int64_t r1);
void rows_avx512(const RowsArgs& a, int64_t r0, int64_t r1);
#endif

}  // namespace lz
