// Bitmask-compressed sparse linear for small-batch (decode) inference on CPU: the torch
// binding (argument checks, instruction-set dispatch, threading); the row loop itself is in
// bitmask_rows.h, compiled once per instruction set (bitmask_rows_{avx512,avx2,scalar}.cpp).
//
// Layout of a weight W [out, in] (built by losa_zero.kernels.layout.pack_bitmask), rows in
// blocks of R = 8 (lz::kRowBlock), columns in groups of 8 (in_pad = in rounded up to 8):
//   mask          uint8 [blocks, groups * R]   byte R*k + i of block b: bit j set  <=>
//                                              W[R*b + i, 8k + j] != 0 (one 64-bit word per
//                                              block and column group)
//   values        [nnz + 16] of bf16, fp16 (stored as int16 bits) or fp32: the nonzeros in
//                 the same order (block, column group, row, column), then 16 zeros so that
//                 the vector loads of the row loop, which read a fixed width past the
//                 current position, stay in bounds
//   block_offsets int64 [blocks + 1]           index in `values` of each block's first nonzero
//
// Decode reads each weight once per token batch, so its speed is set by the bytes read:
// at 70% sparsity in bf16 that is 0.3 (values) + 1/16 (mask) of the dense bytes, read as
// two sequential streams (mask words, values), which the hardware prefetchers follow.  The
// work per 8 weights is: one shuffle (AVX2: a table-driven vpshufb that also widens bf16 to
// fp32; AVX-512: vexpandps under the mask, two rows at once) that moves the next packed
// values into their lanes (zeros elsewhere), one FMA per token; per 64 weights one mask
// word and one x vector.
//
// The instruction set is chosen at run time, so one build runs on every x86-64 machine:
// AVX-512F where the CPU and OS have it, else AVX2+FMA+F16C, else portable scalar code.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "bitmask_rows_api.h"
#include "sparsegpt_block.h"

namespace {

using lz::VKind;

VKind value_kind(const at::Tensor& values) {
  switch (values.scalar_type()) {
    case at::kBFloat16: return VKind::BF16;
    case at::kHalf: return VKind::FP16;
    case at::kFloat: return VKind::FP32;
    default: TORCH_CHECK(false, "bitmask_linear: values must be bfloat16, float16 or float32");
  }
}

#if defined(__x86_64__) || defined(_M_X64)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
}
// __builtin_cpu_supports reports AVX-512 only where the OS also saves the zmm state.
bool cpu_has_avx512() { return cpu_has_avx2() && __builtin_cpu_supports("avx512f"); }
#endif

// The best path this CPU supports, or a narrower one named by LOSA_ZERO_KERNEL_ISA
// (avx2 or scalar; a wider one than the CPU has is not honoured).
std::string detect_isa() {
  std::string best = "scalar";
#if defined(__x86_64__) || defined(_M_X64)
  if (cpu_has_avx512()) best = "avx512";
  else if (cpu_has_avx2()) best = "avx2";
#endif
  const char* force = std::getenv("LOSA_ZERO_KERNEL_ISA");
  if (force) {
    const std::string f(force);
    if (f == "scalar") return f;
    if (f == "avx2" && best == "avx512") return f;
  }
  return best;
}

std::string selected_isa() { return detect_isa(); }

lz::RowsFn rows_fn(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == "avx512") return &lz::rows_avx512;
  if (isa == "avx2") return &lz::rows_avx2;
#endif
  return &lz::rows_scalar;
}

void check_layout(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& block_offsets, int64_t out) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.device().is_cpu() &&
                  mask.size(1) % lz::kRowBlock == 0,
              "bitmask_linear: mask must be a contiguous CPU uint8 [blocks, in_pad/8 * 4] tensor");
  TORCH_CHECK(out > lz::kRowBlock * (mask.size(0) - 1) && out <= lz::kRowBlock * mask.size(0),
              "bitmask_linear: out_features ", out, " does not fit the mask's ", mask.size(0), " row blocks");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.device().is_cpu(),
              "bitmask_linear: values must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(block_offsets.dim() == 1 && block_offsets.scalar_type() == at::kLong && block_offsets.is_contiguous() &&
                  block_offsets.numel() == mask.size(0) + 1,
              "bitmask_linear: block_offsets must be a contiguous int64 [blocks + 1] tensor");
  const int64_t nnz = block_offsets.data_ptr<int64_t>()[mask.size(0)];
  TORCH_CHECK(values.numel() >= nnz + 16, "bitmask_linear: values must hold the nonzeros plus 16 padding entries");
}

// Row blocks split into chunks of about equal nonzero count, handed out to the threads one
// at a time: a thread that the OS pauses (shared machines) delays one small chunk, not a
// fixed half of the layer.  Small products run on the calling thread, where a parallel
// region would cost more than it saves.
void run_blocks(lz::RowsFn fn, const lz::RowsArgs& a, int64_t blocks) {
  constexpr int64_t kSerialBelow = 1 << 16;  // nonzeros x tokens
  constexpr int64_t kChunksPerThread = 4;
  const int64_t* offs = a.block_offsets;
  const int64_t nnz = offs[blocks];
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads <= 1 || nnz * a.batch < kSerialBelow || blocks < 2) {
    fn(a, 0, blocks);
    return;
  }
  const int64_t nchunks = std::min<int64_t>(threads * kChunksPerThread, blocks);
  std::vector<int64_t> bounds(nchunks + 1, blocks);
  bounds[0] = 0;
  for (int64_t c = 1; c < nchunks; ++c) {
    const int64_t target = nnz * c / nchunks;
    const int64_t blk = std::lower_bound(offs, offs + blocks + 1, target) - offs;
    bounds[c] = std::max(bounds[c - 1], std::min<int64_t>(blocks, blk));
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1))
      if (bounds[c] < bounds[c + 1]) fn(a, bounds[c], bounds[c + 1]);
  });
}

// y = x @ W^T (+ bias) for x [batch, in] of any float dtype (in <= in_pad); y in x's dtype.
at::Tensor bitmask_matmul(const at::Tensor& x_in, const at::Tensor& mask, const at::Tensor& values,
                          const at::Tensor& block_offsets, int64_t out, const c10::optional<at::Tensor>& bias) {
  check_layout(mask, values, block_offsets, out);
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu() && at::isFloatingType(x_in.scalar_type()),
              "bitmask_linear: x must be a 2-D floating-point CPU tensor");
  const int64_t blocks = mask.size(0), groups = mask.size(1) / lz::kRowBlock, batch = x_in.size(0);
  TORCH_CHECK(x_in.size(1) <= 8 * groups && x_in.size(1) > 8 * (groups - 1),
              "bitmask_linear: x has ", x_in.size(1), " columns, the mask covers ", 8 * groups);
  at::Tensor x = x_in.to(at::kFloat).contiguous();
  if (x.size(1) != 8 * groups) x = at::constant_pad_nd(x, {0, 8 * groups - x.size(1)}, 0);
  at::Tensor y = at::empty({batch, out}, x.options());
  if (batch > 0 && out > 0) {
    const lz::RowsArgs args{x.data_ptr<float>(), 8 * groups, batch, mask.data_ptr<uint8_t>(), groups,
                            values.data_ptr(), value_kind(values), block_offsets.data_ptr<int64_t>(),
                            y.data_ptr<float>(), out, out};
    run_blocks(rows_fn(selected_isa()), args, blocks);
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

// The dense weight [out, in_pad] in `dtype`, for large batches (prefill) and for checks.
at::Tensor bitmask_decompress(const at::Tensor& mask, const at::Tensor& values, const at::Tensor& block_offsets,
                              int64_t out, at::ScalarType dtype) {
  check_layout(mask, values, block_offsets, out);
  constexpr int64_t R = lz::kRowBlock;
  const int64_t blocks = mask.size(0), groups = mask.size(1) / R;
  at::Tensor w = at::zeros({out, 8 * groups}, values.options().dtype(dtype));
  at::Tensor v = values.to(dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "bitmask_decompress", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    const uint8_t* mp = mask.data_ptr<uint8_t>();
    const int64_t* op = block_offsets.data_ptr<int64_t>();
    at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t p = op[b];
        const uint8_t* m = mp + b * groups * R;
        for (int64_t k = 0; k < groups; ++k) {
          for (int64_t i = 0; i < R; ++i) {
            uint32_t mk = m[R * k + i];
            scalar_t* wr = wp + (R * b + i) * 8 * groups + 8 * k;  // only padding rows (no bits) lie past `out`
            while (mk) {
              wr[__builtin_ctz(mk)] = vp[p++];
              mk &= mk - 1;
            }
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
        py::arg("values"), py::arg("block_offsets"), py::arg("out_features"), py::arg("bias") = py::none());
  m.def("decompress", &bitmask_decompress, "dense W [out, in_pad] of a bitmask-compressed weight");
  m.def("isa", &selected_isa, "instruction set the kernels use on this CPU");
  m.def("sparsegpt_block", &lz::sparsegpt_block, "SparseGPT's column loop over one block (sparsegpt_block.cpp)",
        py::arg("w"), py::arg("u"), py::arg("keep"), py::arg("err"), py::arg("n"), py::arg("m"),
        py::arg("prev") = py::none());
}
