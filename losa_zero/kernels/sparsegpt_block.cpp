// SparseGPT's column loop over one block of columns (losa_zero/pruners/sparsegpt.py), compiled.
//
// In torch the loop issues a handful of small tensor operations per column (and, for N:M, a
// selection per group of m columns); on CPU their fixed cost per call dominates.  Every output
// row of the weight is independent in this loop: the updates mix columns of one row only, and
// an N:M group is chosen per row.  So here each row runs the whole loop on its own (its block
// of columns stays in the L1 cache), on the weight's own layout (no transposes), rows spread
// over torch's threads, and a kept weight, whose error is zero, updates nothing.
//
// The arithmetic is the torch loop's, operation for operation, so both give the same values
// (a zero may differ in sign, which no later operation can tell from the other zero):
//   err_i = 0 where kept, w_i / d_i where pruned          (one IEEE division)
//   w_j  -= u_ij * err_i for the columns j after i          (the product rounded, then the
//                                                            difference: torch's rank-1 matmul
//                                                            and subtraction)
//   N:M saliency (w * w) / (d * d), the m - n lowest of each group pruned, ties by position
//   (lower first), weights pruned before (prev) ranking lowest and staying pruned.
// Built with -ffp-contract=off so that the compiler fuses no multiply-add (a fused one rounds
// once, and torch's own fused kernels do so only in their vector body, not in its tail).
#include "sparsegpt_block.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>

namespace {

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && defined(__linux__)
// One copy of the row loop per instruction-set level (AVX-512, AVX2, baseline x86-64), chosen
// at load time: the same operations, in vectors of the widest width the CPU has.
#define LZ_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LZ_CLONES
#endif

constexpr int64_t kMaxM = 64;

struct Block {
  float* w;            // [rows, width], row stride ws: the block's columns of the weight, updated in place
  int64_t ws;
  const float* u;      // [width, width], row-major: the block's part of the upper Cholesky factor U
  bool* keep;          // [rows, width], row stride ks: in (unstructured, per-row) or out (N:M)
  int64_t ks;
  float* err;          // [rows, width], contiguous: out
  const bool* prev;    // [rows, width], row stride ps, or null: weights still unpruned before this call
  int64_t ps;
  int64_t width, n, m;
};

// Chooses one row's N:M group that starts at column g: the m - n lowest saliencies are
// pruned, ties by position, weights pruned before ranking lowest (and staying pruned).
inline void select_group(const Block& b, const float* w, bool* keep, const bool* prev, int64_t g) {
  float sal[kMaxM];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < b.m; ++j) {
    const float d = b.u[(g + j) * (b.width + 1)];
    sal[j] = (prev == nullptr || prev[g + j]) ? (w[g + j] * w[g + j]) / (d * d) : neg_inf;
  }
  for (int64_t j = 0; j < b.m; ++j) {
    int64_t below = 0;  // entries ranking below j: lower, or equal and earlier
    for (int64_t i = 0; i < b.m; ++i) below += (sal[i] < sal[j]) || (sal[i] == sal[j] && i < j);
    keep[g + j] = below >= b.m - b.n && (prev == nullptr || prev[g + j]);
  }
}

// Rows [r0, r1): each row visits the block's columns left to right on its own.
LZ_CLONES void rows_loop(const Block& b, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* __restrict w = b.w + r * b.ws;
    bool* keep = b.keep + r * b.ks;
    const bool* prev = b.prev == nullptr ? nullptr : b.prev + r * b.ps;
    float* __restrict err = b.err + r * b.width;
    for (int64_t i = 0; i < b.width; ++i) {
      if (b.m && i % b.m == 0) select_group(b, w, keep, prev, i);
      const float* __restrict ui = b.u + i * b.width;
      const float e = keep[i] ? 0.0f : w[i] / ui[i];
      err[i] = e;
      // A kept weight has error +0: adding its (zero) products would change no value, so skip.
      if (e == 0.0f) continue;
      for (int64_t j = i + 1; j < b.width; ++j) w[j] = w[j] - ui[j] * e;
    }
  }
}

}  // namespace

namespace lz {

void sparsegpt_block(at::Tensor w, const at::Tensor& u, at::Tensor keep, at::Tensor err, int64_t n, int64_t m,
                     const c10::optional<at::Tensor>& prev) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2 && w.stride(1) == 1,
              "sparsegpt_block: w must be a float32 CPU matrix [rows, width] with unit column stride");
  const int64_t rows = w.size(0), width = w.size(1);
  TORCH_CHECK(u.scalar_type() == at::kFloat && u.dim() == 2 && u.size(0) == width && u.size(1) == width &&
                  u.is_contiguous(), "sparsegpt_block: u must be a contiguous float32 [width, width] matrix");
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.sizes() == w.sizes() && keep.stride(1) == 1,
              "sparsegpt_block: keep must be a bool tensor shaped like w, with unit column stride");
  TORCH_CHECK(err.scalar_type() == at::kFloat && err.sizes() == w.sizes() && err.is_contiguous(),
              "sparsegpt_block: err must be a contiguous float32 tensor shaped like w");
  TORCH_CHECK(m == 0 || (0 < n && n <= m && m <= kMaxM && width % m == 0),
              "sparsegpt_block: N:M needs 0 < n <= m <= 64 and the block width a multiple of m");
  const bool* prev_ptr = nullptr;
  int64_t ps = 0;
  if (prev.has_value() && prev->defined()) {
    TORCH_CHECK(prev->scalar_type() == at::kBool && prev->sizes() == w.sizes() && prev->stride(1) == 1,
                "sparsegpt_block: prev must be a bool tensor shaped like w, with unit column stride");
    prev_ptr = prev->data_ptr<bool>();
    ps = prev->stride(0);
  }
  const Block b{w.data_ptr<float>(), w.stride(0), u.data_ptr<float>(), keep.data_ptr<bool>(), keep.stride(0),
                err.data_ptr<float>(), prev_ptr, ps, width, m ? n : 0, m};
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) { rows_loop(b, r0, r1); });
}

}  // namespace lz
