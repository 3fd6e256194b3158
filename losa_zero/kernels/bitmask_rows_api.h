// The interface between the torch binding (bitmask_linear.cpp) and the per-instruction-set
// row kernels (bitmask_rows_*.cpp): plain pointers only, so the kernel translation units
// need no torch header.
#pragma once

#include <cstdint>

namespace lz {

enum class VKind { BF16, FP16, FP32 };

// Rows interleaved per block in the layout (losa_zero.kernels.layout.ROW_BLOCK): the block's
// mask bytes for one group of 8 columns form one 64-bit word.  Eight rows rather than four:
// each load of x and each mask load then serve twice the weights, which is what a
// batch-1 product on AVX2 is short of (its loads, not its arithmetic, set its pace).
constexpr int kRowBlock = 8;

// y[b, r] = sum_c W[r, c] * x[b, c] for the rows of blocks [blk0, blk1), b < batch.
struct RowsArgs {
  const float* x;                // [batch, ldx] fp32, ldx = 8 * groups (zero-padded columns)
  int64_t ldx;
  int64_t batch;
  const uint8_t* mask;           // [blocks, groups, kRowBlock]: mask byte of each row per group
  int64_t groups;                // column groups of 8 (in_pad / 8)
  const void* values;            // packed nonzeros of `kind` in layout order, 16 zeros after the last
  VKind kind;
  const int64_t* block_offsets;  // [blocks + 1]
  float* y;                      // [batch, ldy] fp32
  int64_t ldy;
  int64_t out;                   // rows (the last block may be partial)
};

using RowsFn = void (*)(const RowsArgs&, int64_t blk0, int64_t blk1);

void rows_scalar(const RowsArgs& a, int64_t blk0, int64_t blk1);
#if defined(__x86_64__) || defined(_M_X64)
void rows_avx2(const RowsArgs& a, int64_t blk0, int64_t blk1);
void rows_avx512(const RowsArgs& a, int64_t blk0, int64_t blk1);
#endif

}  // namespace lz
