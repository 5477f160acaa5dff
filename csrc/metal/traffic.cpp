#include "metal/traffic.h"

#include <stdexcept>
#include <string>

namespace mlx_fused_adafactor::metal {

namespace {

constexpr int64_t kFloat = sizeof(float);

int64_t itemsize(const std::string& token) {
  return token == "float32" ? 4 : 2;
}

// The sizes one kernel's loads and stores are counted in.
struct Sizes {
  int64_t n, ps, gs, B, R, C, G, nrb, ncb;
  bool momentum;
};

// Bytes kernel `family` reads and writes through buffer `index`.
Traffic traffic(const std::string& family, int index, const Sizes& s) {
  const int64_t F = kFloat;
  const int64_t rows = s.B * s.R * F, cols = s.B * s.C * F;
  const int64_t row_part = rows * s.ncb, col_part = s.B * s.nrb * s.C * F;
  const int64_t group_part = s.G * AF_GROUP_PART_SIZE * F;
  const bool small = family.rfind("adafactor_small", 0) == 0;
  const int64_t step_reads = small ? F : s.G * F;
  switch (index) {
    case AF_BUF_STEP:
    case AF_BUF_LR:
      return {step_reads, 0};
    case AF_BUF_HYPER:
      return {sizeof(AdafactorHyper), 0};
    case AF_BUF_ARGS:
      return {sizeof(AdafactorTensorArgs), 0};
    case AF_BUF_M:
      return {s.momentum ? s.n * s.ps : 0, 0};
    case AF_BUF_M_OUT:
      return {0, s.momentum ? s.n * s.ps : 0};
    case AF_BUF_P_OUT:
      return {0, s.n * s.ps};
    default:
      break;
  }
  if (family == "adafactor_small_factored") {
    switch (index) {
      case AF_BUF_P:
        return {2 * s.n * s.ps, 0};
      case AF_BUF_G:
        return {4 * s.n * s.gs, 0};
      case AF_BUF_S0:
        return {rows, 0};
      case AF_BUF_S1:
        return {cols, 0};
      case AF_BUF_S0_OUT:
        return {2 * rows, rows};
      case AF_BUF_S1_OUT:
        return {0, cols};
      case AF_BUF_GROUP_PART:
        return {rows, s.B * F};
      case AF_BUF_ROW_FAC:
        return {2 * s.n * F, rows};
      case AF_BUF_COL_FAC:
        return {2 * s.n * F, cols};
    }
  } else if (family == "adafactor_small_flat") {
    switch (index) {
      case AF_BUF_P:
        return {2 * s.n * s.ps, 0};
      case AF_BUF_G:
        return {2 * s.n * s.gs, 0};
      case AF_BUF_S0:
        return {s.n * F, 0};
      case AF_BUF_S0_OUT:
        return {s.n * F, s.n * F};
    }
  } else if (family == "adafactor_factored_sums") {
    switch (index) {
      case AF_BUF_P:
        return {s.n * s.ps, 0};
      case AF_BUF_G:
        return {s.n * s.gs, 0};
      case AF_BUF_S0:
        return {rows, 0};
      case AF_BUF_ROW_PART:
        return {0, row_part};
      case AF_BUF_COL_PART:
        return {0, col_part};
      case AF_BUF_GROUP_PART:
        return {0, group_part};
    }
  } else if (family == "adafactor_factored_norm") {
    switch (index) {
      case AF_BUF_G:
        return {s.n * s.gs, 0};
      case AF_BUF_S0:
        return {s.ncb * rows, 0};
      case AF_BUF_S1:
        return {s.nrb * cols, 0};
      case AF_BUF_S0_OUT:
        return {0, rows};
      case AF_BUF_S1_OUT:
        return {0, cols};
      case AF_BUF_ROW_PART:
        return {s.ncb * row_part, 0};
      case AF_BUF_COL_PART:
        return {s.nrb * col_part, 0};
      case AF_BUF_GROUP_PART:
        return {s.G * s.nrb * s.ncb * 2 * F, 0};
      case AF_BUF_ROW_FAC:
        return {0, rows};
      case AF_BUF_COL_FAC:
        return {0, cols};
      case AF_BUF_U2_PART:
        return {0, s.G * F};
    }
  } else if (family == "adafactor_factored_apply") {
    switch (index) {
      case AF_BUF_P:
        return {s.n * s.ps, 0};
      case AF_BUF_G:
        return {s.n * s.gs, 0};
      case AF_BUF_GROUP_PART:
      case AF_BUF_U2_PART:
        return {s.G * s.G * F, 0};
      case AF_BUF_ROW_FAC:
        return {s.ncb * rows, 0};
      case AF_BUF_COL_FAC:
        return {s.nrb * cols, 0};
    }
  } else if (family == "adafactor_flat_sums") {
    switch (index) {
      case AF_BUF_P:
        return {s.n * s.ps, 0};
      case AF_BUF_G:
        return {s.n * s.gs, 0};
      case AF_BUF_S0:
        return {s.n * F, 0};
      case AF_BUF_S0_OUT:
        return {0, s.n * F};
      case AF_BUF_GROUP_PART:
        return {0, group_part};
    }
  } else if (family == "adafactor_flat_apply") {
    switch (index) {
      case AF_BUF_P:
        return {s.n * s.ps, 0};
      case AF_BUF_G:
        return {s.n * s.gs, 0};
      case AF_BUF_S0_OUT:
        return {s.n * F, 0};
      case AF_BUF_GROUP_PART:
        return {s.G * s.G * 2 * F, 0};
    }
  }
  throw std::logic_error(
      "[adafactor] no traffic rule for buffer " + std::to_string(index) +
      " of " + family);
}

} // namespace

std::vector<std::vector<Traffic>> plan_traffic(
    const Plan& plan,
    const std::vector<TensorDesc>& tensors) {
  std::vector<std::vector<Traffic>> out;
  out.reserve(plan.dispatches.size());
  for (const auto& d : plan.dispatches) {
    const TensorDesc& x = tensors[d.tensor];
    bool small;
    const AdafactorTensorArgs a = tensor_args(x.shape, small);
    const Sizes s{
        a.n,
        itemsize(x.param_type),
        itemsize(x.grad_type),
        a.batch,
        a.rows,
        a.cols,
        a.n_groups,
        a.n_row_blocks,
        a.n_col_blocks,
        x.slots.has(Entry::ExpAvg)};
    // The kernel family: the host name without "_<param>_<grad>".
    const std::string family = d.kernel.substr(
        0, d.kernel.size() - x.param_type.size() - x.grad_type.size() - 2);
    std::vector<Traffic> per_binding;
    for (const auto& b : d.bindings) {
      per_binding.push_back(traffic(family, b.index, s));
    }
    out.push_back(std::move(per_binding));
  }
  return out;
}

} // namespace mlx_fused_adafactor::metal
