// Bitmask-compressed sparse linear for small-batch (decode) inference on CPU.
//
// Layout of a weight W [out, in] (built by losa_zero.kernels.layout.pack_bitmask):
//   mask        uint8 [out, in_pad / 8]   bit j of byte k of row r  <=>  W[r, 8k + j] != 0
//                                        (in_pad = in rounded up to a multiple of 8)
//   values      [nnz + 16] of bf16, fp16 (stored as int16 bits) or fp32: the nonzeros of W
//               in row-major order, followed by 16 zeros so that the vector loads below,
//               which read a fixed width past the current position, stay in bounds
//   row_offsets int64 [out + 1]           index in `values` of each row's first nonzero
//
// Decode reads each weight once per token batch, so its speed is set by the bytes read:
// at 70% sparsity in bf16 that is 0.3 (values) + 1/16 (mask) of the dense bytes.  The work
// per 8 weights is: one mask byte, one load of the next 8 packed values, one table-driven
// shuffle that puts them into their 8 lanes (zeros elsewhere), one FMA per token.
//
// Instruction sets are chosen at run time, so one build runs on every x86-64 machine:
// an AVX2+FMA(+F16C) path where the CPU has it, portable scalar code otherwise.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define LZ_X86 1
#include <immintrin.h>
#endif

namespace {

enum class VKind { BF16, FP16, FP32 };

VKind value_kind(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kBFloat16: return VKind::BF16;
    case at::kHalf: return VKind::FP16;
    case at::kFloat: return VKind::FP32;
    default: TORCH_CHECK(false, "bitmask_linear: values must be bfloat16, float16 or float32");
  }
}

// ---------------------------------------------------------------------------------------
// Scalar reference path (any CPU).  Also the definition the vector paths must match.
// ---------------------------------------------------------------------------------------

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <VKind K>
inline float load_value(const void* values, int64_t i) {
  if constexpr (K == VKind::BF16) return bf16_to_float(static_cast<const uint16_t*>(values)[i]);
  else if constexpr (K == VKind::FP16) return static_cast<float>(static_cast<const c10::Half*>(values)[i]);
  else return static_cast<const float*>(values)[i];
}

template <VKind K>
void rows_scalar(const float* x, int64_t ldx, int64_t batch, const uint8_t* mask, int64_t mbytes,
                 const void* values, const int64_t* offs, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * mbytes;
    for (int64_t b = 0; b < batch; ++b) {
      int64_t p = offs[r];
      const float* xb = x + b * ldx;
      float acc = 0.f;
      for (int64_t k = 0; k < mbytes; ++k) {
        uint32_t mk = m[k];
        while (mk) {
          int j = __builtin_ctz(mk);
          acc += load_value<K>(values, p++) * xb[8 * k + j];
          mk &= mk - 1;
        }
      }
      y[b * ldy + r] = acc;
    }
  }
}

#ifdef LZ_X86
// ---------------------------------------------------------------------------------------
// AVX2 + FMA (+ F16C for fp16 values)
// ---------------------------------------------------------------------------------------

// For mask byte m, the vpshufb control that moves packed element s (the s-th set bit) to
// lane j of its bit, zeroing lanes whose bit is clear (control byte 0x80).
struct Tables {
  // bf16 -> fp32 lanes: 32-bit lane j gets bytes [zero, zero, lo(s), hi(s)] of a 16-byte
  // group broadcast to both 128-bit halves, i.e. the bf16 bits in the upper half = fp32.
  alignas(32) uint8_t bf16_to_f32[256][32];
  // 16-bit lanes: 16-bit lane j gets element s (for fp16, then widened by vcvtph2ps).
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

const Tables& tables() {
  static const Tables t;
  return t;
}

// The 8 weights of one mask byte as fp32 lanes (zeros where the bit is clear).
template <VKind K>
__attribute__((target("avx2,fma,f16c"))) inline __m256 expand8(const void* values, int64_t p, uint32_t mk,
                                                                const Tables& t) {
  if constexpr (K == VKind::BF16) {
    const __m256i packed = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + p)));
    const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.bf16_to_f32[mk]));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(packed, ctl));
  } else if constexpr (K == VKind::FP16) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + p));
    const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(t.expand16[mk]));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(packed, ctl));  // fp16 zero bits widen to +0.0f
  } else {
    const __m256 packed = _mm256_loadu_ps(static_cast<const float*>(values) + p);
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.perm32[mk]));
    const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t.keep32[mk])));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, idx), keep);
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows x B tokens at once: each x vector loaded serves R rows, each expanded weight vector
// serves B tokens, and the R*B accumulators are independent FMA chains (latency hidden).
template <VKind K, int B, int R>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2_rb(const float* x, int64_t ldx, const uint8_t* mask,
                                                           int64_t mbytes, const void* values, const int64_t* offs,
                                                           float* y, int64_t ldy, int64_t r0, int64_t r1) {
  const Tables& t = tables();
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    const uint8_t* m[R];
    int64_t p[R];
    __m256 acc[R][B];
    for (int i = 0; i < R; ++i) {
      m[i] = mask + (r + i) * mbytes;
      p[i] = offs[r + i];
      for (int b = 0; b < B; ++b) acc[i][b] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 4 <= mbytes; k += 4) {
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const float* xk = x + 8 * (k + j);
        __m256 xv[B];
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b) xv[b] = _mm256_loadu_ps(xk + b * ldx);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          const uint32_t mk = m[i][k + j];
          const __m256 w = expand8<K>(values, p[i], mk, t);
          p[i] += __builtin_popcount(mk);
#pragma GCC unroll 8
          for (int b = 0; b < B; ++b) acc[i][b] = _mm256_fmadd_ps(w, xv[b], acc[i][b]);
        }
      }
    }
    for (; k < mbytes; ++k) {
      const float* xk = x + 8 * k;
      for (int i = 0; i < R; ++i) {
        const uint32_t mk = m[i][k];
        const __m256 w = expand8<K>(values, p[i], mk, t);
        p[i] += __builtin_popcount(mk);
        for (int b = 0; b < B; ++b) acc[i][b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xk + b * ldx), acc[i][b]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int b = 0; b < B; ++b) y[b * ldy + r + i] = hsum(acc[i][b]);
  }
  if constexpr (R > 1) {
    if (r < r1) rows_avx2_rb<K, B, 1>(x, ldx, mask, mbytes, values, offs, y, ldy, r, r1);
  }
}

// Rows per block for B tokens: enough independent chains and x reuse, within 16 registers.
template <VKind K, int B>
void rows_avx2_b(const float* x, int64_t ldx, const uint8_t* mask, int64_t mbytes, const void* values,
                 const int64_t* offs, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int R = B <= 2 ? 4 : (B <= 4 ? 2 : 1);
  rows_avx2_rb<K, B, R>(x, ldx, mask, mbytes, values, offs, y, ldy, r0, r1);
}

template <VKind K>
void rows_avx2(const float* x, int64_t ldx, int64_t batch, const uint8_t* mask, int64_t mbytes, const void* values,
               const int64_t* offs, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  // tiles of at most 8 tokens; each tile streams the rows once
  for (int64_t b0 = 0; b0 < batch; b0 += 8) {
    const int64_t nb = std::min<int64_t>(8, batch - b0);
    const float* xb = x + b0 * ldx;
    float* yb = y + b0 * ldy;
    switch (nb) {
#define LZ_CASE(N) \
  case N: rows_avx2_b<K, N>(xb, ldx, mask, mbytes, values, offs, yb, ldy, r0, r1); break;
      LZ_CASE(1) LZ_CASE(2) LZ_CASE(3) LZ_CASE(4) LZ_CASE(5) LZ_CASE(6) LZ_CASE(7) LZ_CASE(8)
#undef LZ_CASE
    }
  }
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif  // LZ_X86

// "avx2" or "scalar": the best path this CPU supports, unless LOSA_ZERO_KERNEL_ISA=scalar.
std::string selected_isa() {
  const char* force = std::getenv("LOSA_ZERO_KERNEL_ISA");
  if (force && std::string(force) == "scalar") return "scalar";
#ifdef LZ_X86
  if (cpu_has_avx2()) return "avx2";
#endif
  return "scalar";
}

using RowsFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, int64_t, const void*, const int64_t*, float*,
                        int64_t, int64_t, int64_t);

template <VKind K>
RowsFn pick(const std::string& isa) {
#ifdef LZ_X86
  if (isa == "avx2") return &rows_avx2<K>;
#endif
  return &rows_scalar<K>;
}

RowsFn rows_fn(VKind kind, const std::string& isa) {
  switch (kind) {
    case VKind::BF16: return pick<VKind::BF16>(isa);
    case VKind::FP16: return pick<VKind::FP16>(isa);
    default: return pick<VKind::FP32>(isa);
  }
}

void check_layout(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_offsets) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.device().is_cpu(),
              "bitmask_linear: mask must be a contiguous CPU uint8 [out, in_pad/8] tensor");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.device().is_cpu(),
              "bitmask_linear: values must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == at::kLong && row_offsets.is_contiguous() &&
                  row_offsets.numel() == mask.size(0) + 1,
              "bitmask_linear: row_offsets must be a contiguous int64 [out + 1] tensor");
  const int64_t nnz = row_offsets.data_ptr<int64_t>()[mask.size(0)];
  TORCH_CHECK(values.numel() >= nnz + 16, "bitmask_linear: values must hold the nonzeros plus 16 padding entries");
}

// y = x @ W^T (+ bias) for x [batch, in] of any float dtype (in <= in_pad); y in x's dtype.
at::Tensor bitmask_matmul(const at::Tensor& x_in, const at::Tensor& mask, const at::Tensor& values,
                          const at::Tensor& row_offsets, const c10::optional<at::Tensor>& bias) {
  check_layout(mask, values, row_offsets);
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu() && at::isFloatingType(x_in.scalar_type()),
              "bitmask_linear: x must be a 2-D floating-point CPU tensor");
  const int64_t out = mask.size(0), mbytes = mask.size(1), batch = x_in.size(0);
  TORCH_CHECK(x_in.size(1) <= 8 * mbytes && x_in.size(1) > 8 * (mbytes - 1),
              "bitmask_linear: x has ", x_in.size(1), " columns, the mask covers ", 8 * mbytes);
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  if (x.size(1) != 8 * mbytes) x = at::constant_pad_nd(x, {0, 8 * mbytes - x.size(1)}, 0);
  at::Tensor y = at::empty({batch, out}, x.options());
  if (batch > 0 && out > 0) {
    const RowsFn fn = rows_fn(value_kind(values), selected_isa());
    const float* xp = x.data_ptr<float>();
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    const void* vp = values.data_ptr();
    const int64_t* op = row_offsets.data_ptr<int64_t>();
    float* yp = y.data_ptr<float>();
    // grain: enough rows per task that thread start-up is amortised over a few KB of weights
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, mbytes));
    at::parallel_for(0, out, grain, [&](int64_t r0, int64_t r1) {
      fn(xp, 8 * mbytes, batch, mp, mbytes, vp, op, yp, out, r0, r1);
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

// The dense weight [out, in_pad] in `dtype`, for large batches (prefill) and for checks.
at::Tensor bitmask_decompress(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& row_offsets,
                              at::ScalarType dtype) {
  check_layout(mask, values, row_offsets);
  const int64_t out = mask.size(0), mbytes = mask.size(1);
  at::Tensor w = at::zeros({out, 8 * mbytes}, values.options().dtype(dtype));
  at::Tensor v = values.to(dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bitmask_decompress", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    const int64_t* op = row_offsets.data_ptr<int64_t>();
    at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t p = op[r];
        scalar_t* wr = wp + r * 8 * mbytes;
        const uint8_t* m = mp + r * mbytes;
        for (int64_t k = 0; k < mbytes; ++k) {
          uint32_t mk = m[k];
          while (mk) {
            const int j = __builtin_ctz(mk);
            wr[8 * k + j] = vp[p++];
            mk &= mk - 1;
          }
        }
      }
    });
  });
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &bitmask_matmul, "y = x @ W^T (+ bias) for a bitmask-compressed W", py::arg("x"), py::arg("mask"),
        py::arg("values"), py::arg("row_offsets"), py::arg("bias") = py::none());
  m.def("decompress", &bitmask_decompress, "dense W [out, in_pad] of a bitmask-compressed weight");
  m.def("isa", &selected_isa, "instruction set the kernels use on this CPU");
}
