// The row loop of the bitmask sparse linear, written once for every instruction set.
//
// Each instruction set is a "vector traits" class V whose vector holds `rows` rows x 8
// columns in fp32 lanes (AVX2: 1 row, 8 lanes; AVX-512 and the portable scalar path: 2
// rows, 16 lanes), with a handful of primitives: load 8 columns of x into every row's
// lanes, expand the next packed values into the lanes whose mask bit is set (zeros
// elsewhere), FMA, per-row horizontal sums.  In the layout the mask bytes of a block's
// kRowBlock rows for one group of 8 columns are one 64-bit word and their values follow
// each other, so `rows` consecutive rows are `8 * rows` consecutive mask bits and one
// expand serves them all.  The loop (blocks, token tiling, pointer walk) is the same
// template for all, so a path the test machine cannot execute is the same code as the one
// it tests, with different primitives.
//
// A translation unit defines LZ_TARGET (the function attribute giving its instruction set)
// and LZ_VEC (its traits class) before including this file, then instantiates lz_rows_impl
// under a name of its own.  Everything here is in an anonymous namespace: each translation
// unit gets its own copy, compiled for its own instruction set, so no inline function
// compiled for AVX-512 can be picked by the linker for a caller on another CPU.
//
// This file includes no torch header (torch's inline functions must not be compiled with
// a wider instruction set than the CPU running them).
#pragma once

#include <cstdint>
#include <cstring>

#include "bitmask_rows_api.h"

namespace {

// Vectors per block (kRowBlock rows, V::rows per vector) that one pass over the block
// keeps in accumulators for B tokens: G*B accumulators, B x vectors and one weight vector
// within the register file.
template <class V, int B>
constexpr int vectors_per_pass() {
  constexpr int NV = lz::kRowBlock / V::rows;
  int g = NV;
  while (g > 1 && g * B + B + 1 > V::registers) g /= 2;
  return g;
}

// Column groups per chunk when a block takes several passes: the chunk's mask words and
// values (a few KiB at the densities worth packing) stay in L1 from the first pass to the
// last, instead of each pass fetching the whole block again from L2.
constexpr int64_t kPassChunkGroups = 32;

// One pass over column groups [s0, s1) of a block for B tokens: its vectors G0 .. G0+G-1
// (rows RW*G0 ..), then the next pass (a compile-time recursion, so every shift and mask
// below is a constant).  Each x vector loaded serves G vectors of rows, each expanded weight
// vector serves B tokens, the G*B accumulators are independent FMA chains, kept in
// registers through the walk and in `acc` (the block's accumulators) between chunks.  A
// pass walks the chunk's mask words and values sequentially from `v`, the chunk's first
// value; it returns the value after the chunk.
template <class V, lz::VKind K, int B, int G, int G0>
LZ_TARGET inline const char* block_pass(const lz::RowsArgs& a, const float* x, const uint8_t* m, const char* v,
                                        int64_t s0, int64_t s1, typename V::vec (*acc)[B]) {
  constexpr int RW = V::rows;
  constexpr int NV = lz::kRowBlock / RW;
  constexpr int BITS = 8 * RW;  // mask bits per vector
  static_assert(8 * lz::kRowBlock == 64, "one 64-bit mask word per block and column group");
  constexpr uint64_t LOW = (uint64_t(1) << BITS) - 1;
  constexpr int VS = V::template value_size<K>();
  // x vectors stay in registers when they fit beside the accumulators, else each FMA loads its own
  constexpr bool X_IN_REGS = G * B + B + 1 <= V::registers;
  const int64_t ldx = a.ldx;
  const char* const v0 = v;
  typename V::vec r[G][B];
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < B; ++b) r[g][b] = acc[G0 + g][b];
  for (int64_t s = s0; s < s1; ++s) {
    uint64_t word;
    std::memcpy(&word, m + lz::kRowBlock * s, 8);
    const float* xs = x + 8 * s;
    typename V::vec xv[X_IN_REGS ? B : 1];
    if constexpr (X_IN_REGS) {
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) xv[b] = V::load_x(xs + b * ldx);
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const int gv = G0 + g;  // vector index in the block
      const uint32_t bits = static_cast<uint32_t>((word >> (BITS * gv)) & LOW);
      const int64_t before = gv == 0 ? 0 : V::popcount(word & ((uint64_t(1) << (BITS * gv)) - 1));
      const typename V::vec w = V::template expand<K>(v + before * VS, bits);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
        if constexpr (X_IN_REGS) r[g][b] = V::fma(w, xv[b], r[g][b]);
        else r[g][b] = V::fma(w, V::load_x(xs + b * ldx), r[g][b]);
      }
    }
    v += V::popcount(word) * VS;
  }
  for (int g = 0; g < G; ++g)
    for (int b = 0; b < B; ++b) acc[G0 + g][b] = r[g][b];
  if constexpr (G0 + G < NV) block_pass<V, K, B, G, G0 + G>(a, x, m, v0, s0, s1, acc);
  return v;
}

// Block `blk` for B tokens: all its vectors' passes over one chunk of columns, then the
// next chunk (one chunk of all columns when a single pass holds every vector).
template <class V, lz::VKind K, int B>
LZ_TARGET void block_b(const lz::RowsArgs& a, const float* x, float* y, int64_t blk) {
  constexpr int RW = V::rows;
  constexpr int NV = lz::kRowBlock / RW;
  constexpr int G = vectors_per_pass<V, B>();
  constexpr int VS = V::template value_size<K>();
  const int64_t groups = a.groups;
  const int64_t chunk = G == NV ? groups : kPassChunkGroups;
  const uint8_t* m = a.mask + blk * groups * lz::kRowBlock;
  const char* v = static_cast<const char*>(a.values) + a.block_offsets[blk] * VS;
  typename V::vec acc[NV][B];
  for (int g = 0; g < NV; ++g)
    for (int b = 0; b < B; ++b) acc[g][b] = V::zero();
  for (int64_t s0 = 0; s0 < groups; s0 += chunk)
    v = block_pass<V, K, B, G, 0>(a, x, m, v, s0, s0 + chunk < groups ? s0 + chunk : groups, acc);
  for (int g = 0; g < NV; ++g) {
    const int64_t r = lz::kRowBlock * blk + RW * g;
    for (int b = 0; b < B; ++b) {
      float sums[RW];
      V::hsum_rows(acc[g][b], sums);
      for (int i = 0; i < RW; ++i)
        if (r + i < a.out) y[b * a.ldy + r + i] = sums[i];
    }
  }
}

template <class V, lz::VKind K, int B>
LZ_TARGET void blocks_b(const lz::RowsArgs& a, const float* x, float* y, int64_t blk0, int64_t blk1) {
  for (int64_t blk = blk0; blk < blk1; ++blk) block_b<V, K, B>(a, x, y, blk);
}

template <class V, lz::VKind K>
LZ_TARGET void rows_k(const lz::RowsArgs& a, int64_t blk0, int64_t blk1) {
  // tiles of at most 8 tokens; each tile streams the blocks once
  for (int64_t b0 = 0; b0 < a.batch; b0 += 8) {
    const int64_t nb = a.batch - b0 < 8 ? a.batch - b0 : 8;
    const float* xb = a.x + b0 * a.ldx;
    float* yb = a.y + b0 * a.ldy;
    switch (nb) {
#define LZ_CASE(N) \
  case N: blocks_b<V, K, N>(a, xb, yb, blk0, blk1); break;
      LZ_CASE(1) LZ_CASE(2) LZ_CASE(3) LZ_CASE(4) LZ_CASE(5) LZ_CASE(6) LZ_CASE(7) LZ_CASE(8)
#undef LZ_CASE
    }
  }
}

template <class V>
LZ_TARGET void lz_rows_impl(const lz::RowsArgs& a, int64_t blk0, int64_t blk1) {
  switch (a.kind) {
    case lz::VKind::BF16: rows_k<V, lz::VKind::BF16>(a, blk0, blk1); break;
    case lz::VKind::FP16: rows_k<V, lz::VKind::FP16>(a, blk0, blk1); break;
    case lz::VKind::FP32: rows_k<V, lz::VKind::FP32>(a, blk0, blk1); break;
  }
}

}  // namespace
