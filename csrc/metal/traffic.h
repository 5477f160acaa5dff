// What a launch plan moves, in bytes: loads and stores as the kernels issue
// them (repeated loads count each time), not measured DRAM traffic.
//
// Reporting only: the tests and their summaries of the plan use it; the
// Metal host never does, and the extension is built without it.

#pragma once

#include <cstdint>
#include <vector>

#include "metal/plan.h"

namespace mlx_fused_adafactor::metal {

struct Traffic {
  int64_t read = 0;
  int64_t written = 0;
};

// Per dispatch of `plan`, the traffic of each of its bindings (same order).
std::vector<std::vector<Traffic>> plan_traffic(
    const Plan& plan,
    const std::vector<TensorDesc>& tensors);

} // namespace mlx_fused_adafactor::metal
