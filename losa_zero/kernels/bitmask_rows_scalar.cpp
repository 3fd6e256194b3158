// Portable row kernel (any CPU): 16 lanes of plain floats holding two rows, the same
// shape as the AVX-512 path, so the tests of this path also check that path's two-rows-per-
// vector stepping on machines without AVX-512.  With 16 "registers" it also takes the
// several-passes-per-block route at large batches that the AVX2 path takes.
#include <cstdint>
#include <cstring>

#define LZ_TARGET

#include "bitmask_rows_api.h"

namespace {

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half to float, all cases (normal, subnormal, zero, inf, nan).
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Scalar16 {
  static constexpr int rows = 2;
  static constexpr int registers = 16;
  struct vec {
    float v[16];
  };
  template <lz::VKind K>
  static constexpr int value_size() {
    return K == lz::VKind::FP32 ? 4 : 2;
  }
  static vec zero() {
    vec r;
    for (int j = 0; j < 16; ++j) r.v[j] = 0.f;
    return r;
  }
  static vec load_x(const float* p) {  // 8 columns, in both rows' lanes
    vec r;
    for (int j = 0; j < 16; ++j) r.v[j] = p[j % 8];
    return r;
  }
  static int64_t popcount(uint64_t m) { return __builtin_popcountll(m); }
  template <lz::VKind K>
  static float value(const void* values, int64_t i) {
    if constexpr (K == lz::VKind::BF16) return bf16_to_float(static_cast<const uint16_t*>(values)[i]);
    else if constexpr (K == lz::VKind::FP16) return fp16_to_float(static_cast<const uint16_t*>(values)[i]);
    else return static_cast<const float*>(values)[i];
  }
  template <lz::VKind K>
  static vec expand(const void* v, uint32_t m) {
    vec r;
    int64_t p = 0;
    for (int j = 0; j < 16; ++j) r.v[j] = ((m >> j) & 1) ? value<K>(v, p++) : 0.f;
    return r;
  }
  static vec fma(const vec& w, const vec& x, vec acc) {
    for (int j = 0; j < 16; ++j) acc.v[j] += w.v[j] * x.v[j];
    return acc;
  }
  static void hsum_rows(const vec& a, float* out) {
    for (int i = 0; i < 2; ++i) {
      float s = 0.f;
      for (int j = 0; j < 8; ++j) s += a.v[8 * i + j];
      out[i] = s;
    }
  }
};

}  // namespace

#include "bitmask_rows.h"

namespace lz {
void rows_scalar(const RowsArgs& a, int64_t blk0, int64_t blk1) { lz_rows_impl<Scalar16>(a, blk0, blk1); }
}  // namespace lz
