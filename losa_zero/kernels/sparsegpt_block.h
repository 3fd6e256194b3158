// SparseGPT's column loop over one block (sparsegpt_block.cpp), bound in bitmask_linear.cpp.
#pragma once

#include <torch/extension.h>

namespace lz {

// Visits the block's columns left to right: chooses the N:M groups (m > 0) into `keep`, writes
// each column's error (w - q) / d into `err` and updates the columns after it in `w`.
void sparsegpt_block(at::Tensor w, const at::Tensor& u, at::Tensor keep, at::Tensor err, int64_t n, int64_t m,
                     const c10::optional<at::Tensor>& prev);

}  // namespace lz
