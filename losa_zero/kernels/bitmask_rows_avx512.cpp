// AVX-512 row kernel: two rows per vector (16 fp32 lanes: 8 columns of row i, then the same
// 8 columns of row i+1, whose mask bytes are adjacent in the layout and whose values follow
// each other), the packed values moved into their lanes by vexpandps under the 16-bit mask.
// Chosen at run time (bitmask_linear.cpp) only on CPUs (and operating systems) with
// AVX-512F; same loop as the AVX2 and scalar paths (bitmask_rows.h), only the primitives
// below differ.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

#define LZ_TARGET __attribute__((target("avx512f,avx2,fma,f16c,popcnt,bmi,bmi2")))

#include "bitmask_rows_api.h"

namespace {

struct Avx512 {
  static constexpr int rows = 2;        // rows per vector
  static constexpr int registers = 32;  // zmm registers
  using vec = __m512;
  template <lz::VKind K>
  static constexpr int value_size() {
    return K == lz::VKind::FP32 ? 4 : 2;
  }
  LZ_TARGET static inline vec zero() { return _mm512_setzero_ps(); }
  // 8 columns of x in both rows' lanes
  LZ_TARGET static inline vec load_x(const float* p) {
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
  }
  LZ_TARGET static inline int64_t popcount(uint64_t m) { return __builtin_popcountll(m); }  // 64-bit: no sign extension in address arithmetic
  // The next 16 packed values widened to fp32, then lane j of each set bit j gets the next one.
  template <lz::VKind K>
  LZ_TARGET static inline vec expand(const void* v, uint32_t m) {
    const __mmask16 k = static_cast<__mmask16>(m);
    if constexpr (K == lz::VKind::BF16) {
      const __m256i packed =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v)));
      const __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16);  // bf16 bits on top = fp32
      return _mm512_maskz_expand_ps(k, _mm512_castsi512_ps(widened));
    } else if constexpr (K == lz::VKind::FP16) {
      const __m256i packed =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v)));
      return _mm512_maskz_expand_ps(k, _mm512_cvtph_ps(packed));
    } else {
      return _mm512_maskz_expand_ps(k, _mm512_loadu_ps(static_cast<const float*>(v)));
    }
  }
  LZ_TARGET static inline vec fma(vec w, vec x, vec acc) { return _mm512_fmadd_ps(w, x, acc); }
  LZ_TARGET static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  LZ_TARGET static inline void hsum_rows(vec v, float* out) {
    out[0] = hsum8(_mm512_castps512_ps256(v));
    out[1] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
};

}  // namespace

#include "bitmask_rows.h"

namespace lz {
void rows_avx512(const RowsArgs& a, int64_t blk0, int64_t blk1) { lz_rows_impl<Avx512>(a, blk0, blk1); }
}  // namespace lz
#endif
