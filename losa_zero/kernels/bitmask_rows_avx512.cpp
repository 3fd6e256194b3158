// AVX-512 row kernel: 16 fp32 lanes, two mask bytes per step, the packed values moved into
// their lanes by vexpandps under the 16-bit mask.  Chosen at run time (bitmask_linear.cpp)
// only on CPUs (and operating systems) with AVX-512F; same loop as the AVX2 and scalar paths
// (bitmask_rows.h), only the primitives below differ.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

#define LZ_TARGET __attribute__((target("avx512f,avx2,fma,f16c,popcnt,bmi,bmi2")))

#include "bitmask_rows_api.h"

namespace {

struct Avx512 {
  static constexpr int lanes = 16;
  using vec = __m512;
  template <lz::VKind K>
  static constexpr int value_size() {
    return K == lz::VKind::FP32 ? 4 : 2;
  }
  LZ_TARGET static inline vec zero() { return _mm512_setzero_ps(); }
  LZ_TARGET static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  // the first 8 lanes only; masked-off lanes are not read (no fault past the end of x)
  LZ_TARGET static inline vec load8(const float* p) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>(0x00ff), p); }
  LZ_TARGET static inline uint32_t mask_bits(const uint8_t* m) { return m[0] | (static_cast<uint32_t>(m[1]) << 8); }
  LZ_TARGET static inline int popcount(uint32_t m) { return __builtin_popcount(m); }
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
  LZ_TARGET static inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

#include "bitmask_rows.h"

namespace lz {
void rows_avx512(const RowsArgs& a, int64_t r0, int64_t r1) { lz_rows_impl<Avx512>(a, r0, r1); }
}  // namespace lz
#endif
