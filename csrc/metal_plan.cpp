// The launch plan of the Metal kernels (metal_plan.h).

#include "metal_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "adafactor.h"

namespace mlx_fused_adafactor::metal_plan {

namespace {

constexpr int64_t kScratchAlign = 256;
constexpr int64_t kFloat = sizeof(float);

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T>
Binding bytes_binding(int index, const T& value) {
  Binding b{index, Source::Bytes};
  b.size = sizeof(T);
  b.bytes.resize(sizeof(T));
  std::memcpy(b.bytes.data(), &value, sizeof(T));
  b.bytes_read = sizeof(T);
  return b;
}

Binding array_binding(int index, Source src, int64_t array, int64_t read,
                      int64_t written) {
  Binding b{index, src};
  b.array = array;
  b.bytes_read = read;
  b.bytes_written = written;
  return b;
}

// Scratch of one tensor: regions laid out one after another.
class ScratchLayout {
 public:
  explicit ScratchLayout(int64_t& total) : total_(total) {}
  int64_t add(int64_t bytes) {
    int64_t off = total_;
    total_ += ceil_div(std::max<int64_t>(bytes, kFloat), kScratchAlign) *
        kScratchAlign;
    return off;
  }

 private:
  int64_t& total_;
};

Binding scratch_binding(int index, int64_t offset, int64_t size, int64_t read,
                        int64_t written) {
  Binding b{index, Source::Scratch};
  b.offset = offset;
  b.size = size;
  b.bytes_read = read;
  b.bytes_written = written;
  return b;
}

} // namespace

AdafactorTensorArgs tensor_args(const std::vector<int64_t>& shape, bool& small) {
  AdafactorTensorArgs a{};
  int64_t n = 1;
  for (auto d : shape) {
    n *= d;
  }
  if (n > INT32_MAX / 2) {
    throw std::invalid_argument(
        "[adafactor] a tensor of " + std::to_string(n) +
        " elements is too large for the Metal kernels (32-bit indexing).");
  }
  a.n = static_cast<int>(n);
  a.inv_n = static_cast<float>(1.0 / static_cast<double>(n));
  a.batch = 1;
  a.n_groups = 1;
  small = n <= AF_SMALL_LIMIT;
  if (static_cast<int>(shape.size()) < kFactoredMinNdim) {
    if (!small) {
      a.n_groups = static_cast<int>(ceil_div(n, AF_FLAT_BLOCK));
    }
    return a;
  }
  const int64_t R = shape[shape.size() - 2];
  const int64_t C = shape.back();
  a.rows = static_cast<int>(R);
  a.cols = static_cast<int>(C);
  a.batch = static_cast<int>(R * C == 0 ? 0 : n / (R * C));
  if (R * C == 0) {
    int64_t b = 1;
    for (size_t d = 0; d + 2 < shape.size(); ++d) {
      b *= shape[d];
    }
    a.batch = static_cast<int>(b);
  }
  a.inv_rows = static_cast<float>(1.0 / static_cast<double>(R));
  a.inv_cols = static_cast<float>(1.0 / static_cast<double>(C));
  if (small) {
    return a;
  }
  // Row blocks: about sqrt(R / 16), so the partials a tile's column factors
  // read (one per row block) stay near 1/16 of the tensor; enough of them that
  // no tile has more than AF_MAX_TILE_ROWS rows.
  int64_t nrb = std::llround(std::sqrt(static_cast<double>(R) / 16.0));
  nrb = std::clamp<int64_t>(nrb, 1, AF_MAX_ROW_BLOCKS);
  nrb = std::max(nrb, ceil_div(R, AF_MAX_TILE_ROWS));
  a.row_block = static_cast<int>(ceil_div(R, nrb));
  a.n_row_blocks = static_cast<int>(ceil_div(R, a.row_block));
  a.n_col_blocks = static_cast<int>(ceil_div(C, AF_COL_BLOCK));
  a.n_groups = a.batch * a.n_row_blocks * a.n_col_blocks;
  return a;
}

Plan make_plan(const AdafactorHyper& h, const std::vector<TensorDesc>& tensors) {
  Plan plan;
  const bool momentum = h.flags & AF_MOMENTUM;
  int64_t in = kFirstTensorIdx;
  int64_t out = 0;
  for (int t = 0; t < static_cast<int>(tensors.size()); ++t) {
    const TensorDesc& x = tensors[t];
    const bool factored =
        static_cast<int>(x.shape.size()) >= kFactoredMinNdim;
    bool small;
    const AdafactorTensorArgs a = tensor_args(x.shape, small);
    const int64_t n = a.n;
    const int64_t ps = x.param_itemsize;
    const int64_t gs = x.grad_itemsize;
    const int64_t B = a.batch, R = a.rows, C = a.cols;
    const int64_t G = a.n_groups;
    const std::string types = x.param_type + "_" + x.grad_type;

    // Slots of this tensor (NOTE: [slot layout]).
    const int64_t p_in = in + kParamIdx;
    const int64_t g_in = in + kGradIdx;
    const int64_t s0_in = in + 2;
    const int64_t s1_in = in + 3;
    const int64_t m_in = in + num_inputs(factored, momentum) - 1;
    const int64_t p_out = out;
    const int64_t s0_out = out + 1;
    const int64_t s1_out = out + 2;
    const int64_t m_out = out + num_outputs(factored, momentum) - 1;

    // Common bindings.
    auto step = [&](int64_t groups) {
      return std::vector<Binding>{
          array_binding(AF_BUF_STEP, Source::Input, kStepIdx, groups * kFloat, 0),
          array_binding(AF_BUF_LR, Source::Input, kLrIdx, groups * kFloat, 0),
      };
    };
    auto consts = [&]() {
      return std::vector<Binding>{
          bytes_binding(AF_BUF_HYPER, h), bytes_binding(AF_BUF_ARGS, a)};
    };
    // Without momentum the kernels never touch exp_avg; bind the parameter
    // so that every declared index has a buffer.
    auto moment = [&](int64_t reads) {
      if (momentum) {
        return std::vector<Binding>{
            array_binding(AF_BUF_M, Source::Input, m_in, reads * n * ps, 0),
            array_binding(AF_BUF_M_OUT, Source::Output, m_out, 0, n * ps)};
      }
      return std::vector<Binding>{
          array_binding(AF_BUF_M, Source::Input, p_in, 0, 0),
          array_binding(AF_BUF_M_OUT, Source::Output, p_out, 0, 0)};
    };
    auto add = [&](const std::string& kernel, std::array<int64_t, 3> grid,
                   std::vector<std::vector<Binding>> parts) {
      Dispatch d{kernel + "_" + types, t, grid, {AF_THREADS_PER_GROUP, 1, 1}, {}};
      for (auto& part : parts) {
        for (auto& b : part) {
          d.bindings.push_back(std::move(b));
        }
      }
      std::sort(d.bindings.begin(), d.bindings.end(),
                [](const Binding& l, const Binding& r) { return l.index < r.index; });
      plan.dispatches.push_back(std::move(d));
    };
    auto io = [&](int idx, Source src, int64_t arr, int64_t r, int64_t w) {
      return array_binding(idx, src, arr, r, w);
    };
    ScratchLayout scratch(plan.scratch_bytes);

    plan.donations.push_back({p_out, p_in});
    if (momentum) {
      plan.donations.push_back({m_out, m_in});
    }

    if (factored && small) {
      const int64_t mean = scratch.add(B * kFloat);
      const int64_t rf = scratch.add(B * R * kFloat);
      const int64_t cf = scratch.add(B * C * kFloat);
      add("adafactor_small_factored", {1, 1, 1},
          {step(1), consts(), moment(1),
           {io(AF_BUF_P, Source::Input, p_in, 2 * n * ps, 0),
            io(AF_BUF_G, Source::Input, g_in, 4 * n * gs, 0),
            io(AF_BUF_S0, Source::Input, s0_in, B * R * kFloat, 0),
            io(AF_BUF_S1, Source::Input, s1_in, B * C * kFloat, 0),
            io(AF_BUF_P_OUT, Source::Output, p_out, 0, n * ps),
            io(AF_BUF_S0_OUT, Source::Output, s0_out, 2 * B * R * kFloat,
               B * R * kFloat),
            io(AF_BUF_S1_OUT, Source::Output, s1_out, 0, B * C * kFloat),
            scratch_binding(AF_BUF_GROUP_PART, mean, B * kFloat,
                            B * R * kFloat, B * kFloat),
            scratch_binding(AF_BUF_ROW_FAC, rf, B * R * kFloat,
                            2 * n * kFloat, B * R * kFloat),
            scratch_binding(AF_BUF_COL_FAC, cf, B * C * kFloat,
                            2 * n * kFloat, B * C * kFloat)}});
    } else if (small) {
      plan.donations.push_back({s0_out, s0_in});
      add("adafactor_small_flat", {1, 1, 1},
          {step(1), consts(), moment(1),
           {io(AF_BUF_P, Source::Input, p_in, 2 * n * ps, 0),
            io(AF_BUF_G, Source::Input, g_in, 2 * n * gs, 0),
            io(AF_BUF_S0, Source::Input, s0_in, n * kFloat, 0),
            io(AF_BUF_P_OUT, Source::Output, p_out, 0, n * ps),
            io(AF_BUF_S0_OUT, Source::Output, s0_out, n * kFloat,
               n * kFloat)}});
    } else if (factored) {
      const int64_t nrb = a.n_row_blocks, ncb = a.n_col_blocks;
      const int64_t groups_b = nrb * ncb;
      const int64_t row_part_size = B * R * ncb * kFloat;
      const int64_t col_part_size = B * nrb * C * kFloat;
      const int64_t group_part_size = G * AF_GROUP_PART_SIZE * kFloat;
      const int64_t row_part = scratch.add(row_part_size);
      const int64_t col_part = scratch.add(col_part_size);
      const int64_t group_part = scratch.add(group_part_size);
      const int64_t row_fac = scratch.add(B * R * kFloat);
      const int64_t col_fac = scratch.add(B * C * kFloat);
      const int64_t u2_part = scratch.add(G * kFloat);
      const std::array<int64_t, 3> grid{ncb, nrb, B};
      add("adafactor_factored_sums", grid,
          {consts(),
           {io(AF_BUF_P, Source::Input, p_in, n * ps, 0),
            io(AF_BUF_G, Source::Input, g_in, n * gs, 0),
            io(AF_BUF_S0, Source::Input, s0_in, B * R * kFloat, 0),
            scratch_binding(AF_BUF_ROW_PART, row_part, row_part_size, 0,
                            row_part_size),
            scratch_binding(AF_BUF_COL_PART, col_part, col_part_size, 0,
                            col_part_size),
            scratch_binding(AF_BUF_GROUP_PART, group_part, group_part_size,
                            0, group_part_size)}});
      add("adafactor_factored_norm", grid,
          {step(G), consts(),
           {io(AF_BUF_G, Source::Input, g_in, n * gs, 0),
            io(AF_BUF_S0, Source::Input, s0_in, ncb * B * R * kFloat, 0),
            io(AF_BUF_S1, Source::Input, s1_in, nrb * B * C * kFloat, 0),
            io(AF_BUF_S0_OUT, Source::Output, s0_out, 0, B * R * kFloat),
            io(AF_BUF_S1_OUT, Source::Output, s1_out, 0, B * C * kFloat),
            scratch_binding(AF_BUF_ROW_PART, row_part, row_part_size,
                            ncb * row_part_size, 0),
            scratch_binding(AF_BUF_COL_PART, col_part, col_part_size,
                            nrb * col_part_size, 0),
            scratch_binding(AF_BUF_GROUP_PART, group_part, group_part_size,
                            G * groups_b * 2 * kFloat, 0),
            scratch_binding(AF_BUF_ROW_FAC, row_fac, B * R * kFloat, 0,
                            B * R * kFloat),
            scratch_binding(AF_BUF_COL_FAC, col_fac, B * C * kFloat, 0,
                            B * C * kFloat),
            scratch_binding(AF_BUF_U2_PART, u2_part, G * kFloat, 0,
                            G * kFloat)}});
      add("adafactor_factored_apply", grid,
          {step(G), consts(), moment(1),
           {io(AF_BUF_P, Source::Input, p_in, n * ps, 0),
            io(AF_BUF_G, Source::Input, g_in, n * gs, 0),
            io(AF_BUF_P_OUT, Source::Output, p_out, 0, n * ps),
            scratch_binding(AF_BUF_GROUP_PART, group_part, group_part_size,
                            G * G * kFloat, 0),
            scratch_binding(AF_BUF_ROW_FAC, row_fac, B * R * kFloat,
                            ncb * B * R * kFloat, 0),
            scratch_binding(AF_BUF_COL_FAC, col_fac, B * C * kFloat,
                            nrb * B * C * kFloat, 0),
            scratch_binding(AF_BUF_U2_PART, u2_part, G * kFloat,
                            G * G * kFloat, 0)}});
    } else {
      plan.donations.push_back({s0_out, s0_in});
      const int64_t group_part_size = G * AF_GROUP_PART_SIZE * kFloat;
      const int64_t group_part = scratch.add(group_part_size);
      add("adafactor_flat_sums", {G, 1, 1},
          {step(G), consts(),
           {io(AF_BUF_P, Source::Input, p_in, n * ps, 0),
            io(AF_BUF_G, Source::Input, g_in, n * gs, 0),
            io(AF_BUF_S0, Source::Input, s0_in, n * kFloat, 0),
            io(AF_BUF_S0_OUT, Source::Output, s0_out, 0, n * kFloat),
            scratch_binding(AF_BUF_GROUP_PART, group_part, group_part_size,
                            0, group_part_size)}});
      add("adafactor_flat_apply", {G, 1, 1},
          {step(G), consts(), moment(1),
           {io(AF_BUF_P, Source::Input, p_in, n * ps, 0),
            io(AF_BUF_G, Source::Input, g_in, n * gs, 0),
            io(AF_BUF_P_OUT, Source::Output, p_out, 0, n * ps),
            io(AF_BUF_S0_OUT, Source::Output, s0_out, n * kFloat, 0),
            scratch_binding(AF_BUF_GROUP_PART, group_part, group_part_size,
                            G * G * 2 * kFloat, 0)}});
    }
    in += num_inputs(factored, momentum);
    out += num_outputs(factored, momentum);
  }
  return plan;
}

std::string dtype_token(mx::Dtype t) {
  switch (t) {
    case mx::float32:
      return "float32";
    case mx::float16:
      return "float16";
    case mx::bfloat16:
      return "bfloat16";
    default:
      throw std::invalid_argument(
          "[adafactor] the Metal kernels take float32, float16 and bfloat16.");
  }
}

std::vector<TensorDesc> describe_inputs(
    const std::vector<mx::array>& inputs,
    bool momentum) {
  std::vector<TensorDesc> tensors;
  size_t in = kFirstTensorIdx;
  while (in < inputs.size()) {
    const auto& p = inputs[in + kParamIdx];
    const auto& g = inputs[in + kGradIdx];
    tensors.push_back(
        {std::vector<int64_t>(p.shape().begin(), p.shape().end()),
         dtype_token(p.dtype()), dtype_token(g.dtype()),
         static_cast<int>(p.itemsize()), static_cast<int>(g.itemsize())});
    in += num_inputs(is_factored(p), momentum);
  }
  return tensors;
}

} // namespace mlx_fused_adafactor::metal_plan
