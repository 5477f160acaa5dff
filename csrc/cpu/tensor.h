// One tensor of a CPU step: where its data is, and how the passes cut it.

#pragma once

#include "adafactor_math.h"
#include "cpu/tiling.h"

namespace mlx_fused_adafactor::cpu {

// The data of one tensor, by role (NOTE: [slot layout] decides which are
// present; absent ones are null). P is the parameter's storage type, G the
// gradient's.
template <typename P, typename G>
struct TensorData {
  const P* param = nullptr;
  const G* grad = nullptr;
  P* param_out = nullptr;
  // Factored second moment.
  const float* row = nullptr;
  const float* col = nullptr;
  float* row_out = nullptr;
  float* col_out = nullptr;
  // Flat second moment.
  const float* sq = nullptr;
  float* sq_out = nullptr;
  // First moment (momentum).
  const P* exp_avg = nullptr;
  P* exp_avg_out = nullptr;
};

// How the passes process one tensor, and what they found out about it.
struct TensorPlan {
  Geometry geo;
  Tiling tiles;
  ScratchRegions scratch;
  // Items [item_begin, item_end) of the step belong to this tensor.
  size_t item_begin = 0;
  size_t item_end = 0;
  // NOTE: [folded update sum] applies: tiles span whole rows.
  bool fold = false;
  // sum(u^2) is still to be taken by pass 2.
  bool needs_pass2 = false;
  // Learning rate and clipping, known after the reductions.
  AdafactorTensorScalars ts{};
  // NOTE: [stochastic rounding]: the tensor's key, and the keys of its
  // streams at the running step.
  AF_UINT key = 0;
  AF_UINT param_key = 0;
  AF_UINT exp_avg_key = 0;
};

// The sums one work item contributes to its tensor.
struct ItemSums {
  float p2 = 0.0f; // sum of p^2
  float u2 = 0.0f; // sum of u^2 (flat tensors; pass 2)
  bool fold_ok = false; // its rows allow the fold
};

} // namespace mlx_fused_adafactor::cpu
