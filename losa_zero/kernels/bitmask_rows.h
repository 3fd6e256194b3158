// The row loop of the bitmask sparse linear, written once for every instruction set.
//
// Each instruction set is a "vector traits" class V with `lanes` fp32 lanes (8 for AVX2, 16
// for AVX-512 and the portable scalar path) and a handful of primitives: load x, expand the
// next packed values into the lanes whose mask bit is set (zeros elsewhere), FMA, horizontal
// sum.  One step of the loop consumes `lanes / 8` mask bytes of each row; the loop itself
// (row blocking, token tiling, tail, pointer walk) is the same template for all,
// so a path the test machine cannot execute is the same code as the one it tests, with
// different primitives.
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

// R rows x B tokens at once: each x vector loaded serves R rows, each expanded weight vector
// serves B tokens, and the R*B accumulators are independent FMA chains.
template <class V, lz::VKind K, int B, int R>
LZ_TARGET void rows_rb(const lz::RowsArgs& a, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int L = V::lanes;
  constexpr int MB = L / 8;  // mask bytes per step
  const int64_t mbytes = a.mbytes, ldx = a.ldx, ldy = a.ldy;
  const int64_t steps = mbytes / MB;  // full steps; an odd last byte (MB = 2) is the tail
  const void* values = a.values;
  constexpr int VS = V::template value_size<K>();
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    // per row: its mask bytes and a pointer to its next packed value, advanced by the
    // number of set bits consumed
    const uint8_t* m[R];
    const char* v[R];
    typename V::vec acc[R][B];
    for (int i = 0; i < R; ++i) {
      m[i] = a.mask + (r + i) * mbytes;
      v[i] = static_cast<const char*>(values) + a.row_offsets[r + i] * VS;
      for (int b = 0; b < B; ++b) acc[i][b] = V::zero();
    }
    for (int64_t s = 0; s < steps; ++s) {
      const float* xk = x + L * s;
      typename V::vec xv[B];
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) xv[b] = V::load(xk + b * ldx);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const uint32_t mk = V::mask_bits(m[i] + MB * s);
        const typename V::vec w = V::template expand<K>(v[i], mk);
        v[i] += V::popcount(mk) * VS;
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) acc[i][b] = V::fma(w, xv[b], acc[i][b]);
      }
    }
    if (MB * steps < mbytes) {  // one mask byte left: 8 columns, the lanes above them stay zero
      const float* xk = x + L * steps;
      for (int i = 0; i < R; ++i) {
        const uint32_t mk = m[i][mbytes - 1];
        const typename V::vec w = V::template expand<K>(v[i], mk);
        for (int b = 0; b < B; ++b) acc[i][b] = V::fma(w, V::load8(xk + b * ldx), acc[i][b]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int b = 0; b < B; ++b) y[b * ldy + r + i] = V::hsum(acc[i][b]);
  }
  if constexpr (R > 1) {
    if (r < r1) rows_rb<V, K, B, 1>(a, x, y, r, r1);
  }
}

// Rows per block for B tokens: enough independent chains and x reuse, within 16 registers.
template <class V, lz::VKind K, int B>
LZ_TARGET void rows_b(const lz::RowsArgs& a, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int R = B <= 2 ? 4 : (B <= 4 ? 2 : 1);
  rows_rb<V, K, B, R>(a, x, y, r0, r1);
}

template <class V, lz::VKind K>
LZ_TARGET void rows_k(const lz::RowsArgs& a, int64_t r0, int64_t r1) {
  // tiles of at most 8 tokens; each tile streams the rows once
  for (int64_t b0 = 0; b0 < a.batch; b0 += 8) {
    const int64_t nb = a.batch - b0 < 8 ? a.batch - b0 : 8;
    const float* xb = a.x + b0 * a.ldx;
    float* yb = a.y + b0 * a.ldy;
    switch (nb) {
#define LZ_CASE(N) \
  case N: rows_b<V, K, N>(a, xb, yb, r0, r1); break;
      LZ_CASE(1) LZ_CASE(2) LZ_CASE(3) LZ_CASE(4) LZ_CASE(5) LZ_CASE(6) LZ_CASE(7) LZ_CASE(8)
#undef LZ_CASE
    }
  }
}

template <class V>
LZ_TARGET void lz_rows_impl(const lz::RowsArgs& a, int64_t r0, int64_t r1) {
  switch (a.kind) {
    case lz::VKind::BF16: rows_k<V, lz::VKind::BF16>(a, r0, r1); break;
    case lz::VKind::FP16: rows_k<V, lz::VKind::FP16>(a, r0, r1); break;
    case lz::VKind::FP32: rows_k<V, lz::VKind::FP32>(a, r0, r1); break;
  }
}

}  // namespace
