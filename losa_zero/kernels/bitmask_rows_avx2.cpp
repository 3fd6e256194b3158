// AVX2 + FMA + F16C row kernel: one row per vector (8 fp32 lanes, one mask byte).  Chosen at run time
// (bitmask_linear.cpp) only on CPUs that have these instructions.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

#define LZ_TARGET __attribute__((target("avx2,fma,f16c,popcnt,bmi,bmi2")))

#include "bitmask_rows_api.h"

namespace {

// For mask byte m, the shuffle controls that move packed element s (the s-th set bit) to
// lane j of its bit, zeroing the lanes whose bit is clear (control byte 0x80).
struct Tables {
  // bf16 -> fp32 in one vpshufb: 32-bit lane j gets bytes [0, 0, lo(s), hi(s)] of the 8
  // packed values broadcast to both 128-bit halves (bf16 bits in the upper half = fp32).
  alignas(32) uint8_t bf16_to_f32[256][32];
  // 16-bit lane j gets element s (fp16, widened afterwards by vcvtph2ps).
  alignas(16) uint8_t expand16[256][16];
  // fp32: vpermd index of element s for lane j, and an all-ones lane mask for set bits.
  alignas(32) int32_t perm32[256][8];
  alignas(32) int32_t keep32[256][8];
  Tables() {
    for (int m = 0; m < 256; ++m) {
      int s = 0;
      for (int j = 0; j < 8; ++j) {
        const bool on = (m >> j) & 1;
        uint8_t* c = bf16_to_f32[m] + 4 * (j & 3) + 16 * (j >> 2);
        c[0] = c[1] = 0x80;
        c[2] = on ? static_cast<uint8_t>(2 * s) : 0x80;
        c[3] = on ? static_cast<uint8_t>(2 * s + 1) : 0x80;
        expand16[m][2 * j] = on ? static_cast<uint8_t>(2 * s) : 0x80;
        expand16[m][2 * j + 1] = on ? static_cast<uint8_t>(2 * s + 1) : 0x80;
        perm32[m][j] = on ? s : 0;
        keep32[m][j] = on ? -1 : 0;
        if (on) ++s;
      }
    }
  }
};

const Tables kTables;

struct Avx2 {
  static constexpr int rows = 1;        // rows per vector
  static constexpr int registers = 16;  // ymm registers
  using vec = __m256;
  template <lz::VKind K>
  static constexpr int value_size() {
    return K == lz::VKind::FP32 ? 4 : 2;
  }
  LZ_TARGET static inline vec zero() { return _mm256_setzero_ps(); }
  LZ_TARGET static inline vec load_x(const float* p) { return _mm256_loadu_ps(p); }
  LZ_TARGET static inline int64_t popcount(uint64_t m) { return __builtin_popcountll(m); }  // 64-bit: no sign extension in address arithmetic
  template <lz::VKind K>
  LZ_TARGET static inline vec expand(const void* v, uint32_t m) {
    if constexpr (K == lz::VKind::BF16) {
      const __m256i packed = _mm256_broadcastsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v))));
      const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.bf16_to_f32[m]));
      return _mm256_castsi256_ps(_mm256_shuffle_epi8(packed, ctl));
    } else if constexpr (K == lz::VKind::FP16) {
      const __m128i packed =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v)));
      const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.expand16[m]));
      return _mm256_cvtph_ps(_mm_shuffle_epi8(packed, ctl));  // fp16 zero bits widen to +0.0f
    } else {
      const __m256 packed = _mm256_loadu_ps(static_cast<const float*>(v));
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.perm32[m]));
      const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.keep32[m])));
      return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, idx), keep);
    }
  }
  LZ_TARGET static inline vec fma(vec w, vec x, vec acc) { return _mm256_fmadd_ps(w, x, acc); }
  LZ_TARGET static inline void hsum_rows(vec v, float* out) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    out[0] = _mm_cvtss_f32(s);
  }
};

}  // namespace

#include "bitmask_rows.h"

namespace lz {
void rows_avx2(const RowsArgs& a, int64_t blk0, int64_t blk1) { lz_rows_impl<Avx2>(a, blk0, blk1); }
}  // namespace lz
#endif
