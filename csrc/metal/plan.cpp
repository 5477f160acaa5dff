// The launch plan of the Metal kernels (plan.h).

#include "metal/plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace mlx_fused_adafactor::metal {

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
  return b;
}

Binding input(int index, int64_t array) {
  Binding b{index, Source::Input, Access::Read};
  b.array = array;
  return b;
}

Binding output(int index, int64_t array, Access access = Access::Write) {
  Binding b{index, Source::Output, access};
  b.array = array;
  return b;
}

// The scratch buffer of one tensor (NOTE: [encoding order]): regions laid
// out one after another in a buffer of its own, made on first use.
class ScratchLayout {
 public:
  explicit ScratchLayout(Plan& plan) : plan_(plan) {}
  Binding region(int index, int64_t offset, int64_t size, Access access) {
    Binding b{index, Source::Scratch, access};
    b.array = buffer_;
    b.offset = offset;
    b.size = size;
    return b;
  }
  int64_t add(int64_t bytes) {
    if (buffer_ < 0) {
      buffer_ = static_cast<int64_t>(plan_.scratch.size());
      plan_.scratch.push_back(0);
    }
    int64_t& total = plan_.scratch[buffer_];
    const int64_t off = total;
    const int64_t size =
        ceil_div(std::max<int64_t>(bytes, kFloat), kScratchAlign) *
        kScratchAlign;
    total += size;
    plan_.scratch_bytes += size;
    return off;
  }

 private:
  Plan& plan_;
  int64_t buffer_ = -1;
};

// The dispatches of one tensor, in order; make_plan interleaves the
// tensors' lists (NOTE: [encoding order]).
class TensorPlanner {
 public:
  TensorPlanner(
      Plan& plan,
      std::vector<Dispatch>& out,
      const AdafactorHyper& h,
      const TensorDesc& x,
      int tensor)
      : plan_(plan),
        out_(out),
        h_(h),
        x_(x),
        tensor_(tensor),
        scratch_(plan) {
    args_ = tensor_args(x.shape, small_);
    args_.key = x.key;
    momentum_ = x.slots.has(Entry::ExpAvg);
    const TensorSlots& s = x.slots;
    p_in_ = s.param_in();
    g_in_ = s.grad_in();
    p_out_ = s.param_out();
    const Entry first = s.factored() ? Entry::Row : Entry::Sq;
    s0_in_ = s.state_in(first);
    s0_out_ = s.state_out(first);
    if (s.factored()) {
      s1_in_ = s.state_in(Entry::Col);
      s1_out_ = s.state_out(Entry::Col);
    }
  }

  void plan() {
    plan_.donations.push_back({p_out_, p_in_});
    if (momentum_) {
      plan_.donations.push_back(
          {x_.slots.state_out(Entry::ExpAvg), x_.slots.state_in(Entry::ExpAvg)});
    }
    if (x_.slots.factored()) {
      small_ ? small_factored() : factored();
    } else {
      // Each element of exp_avg_sq is read and written by one thread.
      plan_.donations.push_back({s0_out_, s0_in_});
      small_ ? small_flat() : flat();
    }
  }

 private:
  Plan& plan_;
  std::vector<Dispatch>& out_;
  const AdafactorHyper& h_;
  const TensorDesc& x_;
  int tensor_;
  ScratchLayout scratch_;
  AdafactorTensorArgs args_;
  bool small_ = false;
  bool momentum_ = false;
  int64_t p_in_, g_in_, p_out_, s0_in_, s0_out_, s1_in_ = -1, s1_out_ = -1;

  std::vector<Binding> step() const {
    return {input(AF_BUF_STEP, SlotLayout::kStep),
            input(AF_BUF_LR, SlotLayout::kLr)};
  }

  std::vector<Binding> consts() const {
    return {bytes_binding(AF_BUF_HYPER, h_), bytes_binding(AF_BUF_ARGS, args_)};
  }

  // Without momentum the kernels never touch exp_avg; the parameter is
  // bound in its place so that every declared index has a buffer.
  std::vector<Binding> moment() const {
    if (momentum_) {
      return {input(AF_BUF_M, x_.slots.state_in(Entry::ExpAvg)),
              output(AF_BUF_M_OUT, x_.slots.state_out(Entry::ExpAvg))};
    }
    return {input(AF_BUF_M, p_in_), output(AF_BUF_M_OUT, p_out_)};
  }

  void add(
      const char* kernel,
      std::array<int64_t, 3> grid,
      std::vector<std::vector<Binding>> parts) {
    Dispatch d{
        std::string(kernel) + "_" + x_.param_type + "_" + x_.grad_type,
        tensor_,
        grid,
        {AF_THREADS_PER_GROUP, 1, 1},
        {}};
    for (auto& part : parts) {
      for (auto& b : part) {
        d.bindings.push_back(std::move(b));
      }
    }
    std::sort(
        d.bindings.begin(),
        d.bindings.end(),
        [](const Binding& l, const Binding& r) { return l.index < r.index; });
    out_.push_back(std::move(d));
  }

  Binding scratch(int index, int64_t offset, int64_t size, Access access) {
    return scratch_.region(index, offset, size, access);
  }

  void small_factored() {
    const int64_t B = args_.batch, R = args_.rows, C = args_.cols;
    const int64_t mean = scratch_.add(B * kFloat);
    const int64_t rf = scratch_.add(B * R * kFloat);
    const int64_t cf = scratch_.add(B * C * kFloat);
    add("adafactor_small_factored",
        {1, 1, 1},
        {step(),
         consts(),
         moment(),
         {input(AF_BUF_P, p_in_),
          input(AF_BUF_G, g_in_),
          input(AF_BUF_S0, s0_in_),
          input(AF_BUF_S1, s1_in_),
          output(AF_BUF_P_OUT, p_out_),
          // The new row state is read back for the row mean and factors.
          output(AF_BUF_S0_OUT, s0_out_, Access::ReadWrite),
          output(AF_BUF_S1_OUT, s1_out_),
          scratch(AF_BUF_GROUP_PART, mean, B * kFloat, Access::ReadWrite),
          scratch(AF_BUF_ROW_FAC, rf, B * R * kFloat, Access::ReadWrite),
          scratch(AF_BUF_COL_FAC, cf, B * C * kFloat, Access::ReadWrite)}});
  }

  void small_flat() {
    add("adafactor_small_flat",
        {1, 1, 1},
        {step(),
         consts(),
         moment(),
         {input(AF_BUF_P, p_in_),
          input(AF_BUF_G, g_in_),
          input(AF_BUF_S0, s0_in_),
          output(AF_BUF_P_OUT, p_out_),
          // Each thread reads back the exp_avg_sq it wrote.
          output(AF_BUF_S0_OUT, s0_out_, Access::ReadWrite)}});
  }

  void factored() {
    const int64_t B = args_.batch, R = args_.rows, C = args_.cols;
    const int64_t G = args_.n_groups;
    const int64_t nrb = args_.n_row_blocks, ncb = args_.n_col_blocks;
    const int64_t row_part_size = B * R * ncb * kFloat;
    const int64_t col_part_size = B * nrb * C * kFloat;
    const int64_t group_part_size = G * AF_GROUP_PART_SIZE * kFloat;
    const int64_t row_part = scratch_.add(row_part_size);
    const int64_t col_part = scratch_.add(col_part_size);
    const int64_t group_part = scratch_.add(group_part_size);
    const int64_t row_fac = scratch_.add(B * R * kFloat);
    const int64_t col_fac = scratch_.add(B * C * kFloat);
    const int64_t u2_part = scratch_.add(G * kFloat);
    const std::array<int64_t, 3> grid{ncb, nrb, B};
    add("adafactor_factored_sums",
        grid,
        {consts(),
         {input(AF_BUF_P, p_in_),
          input(AF_BUF_G, g_in_),
          input(AF_BUF_S0, s0_in_),
          scratch(AF_BUF_ROW_PART, row_part, row_part_size, Access::Write),
          scratch(AF_BUF_COL_PART, col_part, col_part_size, Access::Write),
          scratch(
              AF_BUF_GROUP_PART, group_part, group_part_size, Access::Write)}});
    add("adafactor_factored_norm",
        grid,
        {step(),
         consts(),
         {input(AF_BUF_G, g_in_),
          input(AF_BUF_S0, s0_in_),
          input(AF_BUF_S1, s1_in_),
          output(AF_BUF_S0_OUT, s0_out_),
          output(AF_BUF_S1_OUT, s1_out_),
          scratch(AF_BUF_ROW_PART, row_part, row_part_size, Access::Read),
          scratch(AF_BUF_COL_PART, col_part, col_part_size, Access::Read),
          scratch(
              AF_BUF_GROUP_PART, group_part, group_part_size, Access::Read),
          scratch(AF_BUF_ROW_FAC, row_fac, B * R * kFloat, Access::Write),
          scratch(AF_BUF_COL_FAC, col_fac, B * C * kFloat, Access::Write),
          scratch(AF_BUF_U2_PART, u2_part, G * kFloat, Access::Write)}});
    add("adafactor_factored_apply",
        grid,
        {step(),
         consts(),
         moment(),
         {input(AF_BUF_P, p_in_),
          input(AF_BUF_G, g_in_),
          output(AF_BUF_P_OUT, p_out_),
          scratch(
              AF_BUF_GROUP_PART, group_part, group_part_size, Access::Read),
          scratch(AF_BUF_ROW_FAC, row_fac, B * R * kFloat, Access::Read),
          scratch(AF_BUF_COL_FAC, col_fac, B * C * kFloat, Access::Read),
          scratch(AF_BUF_U2_PART, u2_part, G * kFloat, Access::Read)}});
  }

  void flat() {
    const int64_t G = args_.n_groups;
    const int64_t group_part_size = G * AF_GROUP_PART_SIZE * kFloat;
    const int64_t group_part = scratch_.add(group_part_size);
    add("adafactor_flat_sums",
        {G, 1, 1},
        {step(),
         consts(),
         {input(AF_BUF_P, p_in_),
          input(AF_BUF_G, g_in_),
          input(AF_BUF_S0, s0_in_),
          output(AF_BUF_S0_OUT, s0_out_),
          scratch(
              AF_BUF_GROUP_PART, group_part, group_part_size, Access::Write)}});
    add("adafactor_flat_apply",
        {G, 1, 1},
        {step(),
         consts(),
         moment(),
         {input(AF_BUF_P, p_in_),
          input(AF_BUF_G, g_in_),
          output(AF_BUF_P_OUT, p_out_),
          // The new exp_avg_sq, written by the sums dispatch.
          output(AF_BUF_S0_OUT, s0_out_, Access::Read),
          scratch(
              AF_BUF_GROUP_PART, group_part, group_part_size, Access::Read)}});
  }
};

} // namespace

AdafactorTensorArgs tensor_args(const std::vector<int64_t>& shape, bool& small) {
  AdafactorTensorArgs a{};
  int64_t n = 1;
  for (auto d : shape) {
    n *= d;
  }
  if (n > kMaxElements) {
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
  int64_t batch = 1;
  for (size_t d = 0; d + 2 < shape.size(); ++d) {
    batch *= shape[d];
  }
  a.rows = static_cast<int>(R);
  a.cols = static_cast<int>(C);
  a.batch = static_cast<int>(batch);
  a.inv_rows = static_cast<float>(1.0 / static_cast<double>(R));
  a.inv_cols = static_cast<float>(1.0 / static_cast<double>(C));
  if (small) {
    return a;
  }
  // Row blocks: about sqrt(R / 16), so the partials a tile's column factors
  // read (one per row block) stay near 1/16 of the tensor; enough of them
  // that no tile has more than AF_MAX_TILE_ROWS rows.
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
  std::vector<std::vector<Dispatch>> per_tensor(tensors.size());
  size_t phases = 0;
  for (int t = 0; t < static_cast<int>(tensors.size()); ++t) {
    TensorPlanner(plan, per_tensor[t], h, tensors[t], t).plan();
    phases = std::max(phases, per_tensor[t].size());
  }
  // NOTE: [encoding order]: the k-th dispatch of every tensor together.
  for (size_t k = 0; k < phases; ++k) {
    for (auto& ds : per_tensor) {
      if (k < ds.size()) {
        plan.dispatches.push_back(std::move(ds[k]));
      }
    }
  }
  return plan;
}

std::vector<std::string> kernel_names() {
  static const char* kernels[] = {
      "adafactor_factored_sums",
      "adafactor_factored_norm",
      "adafactor_factored_apply",
      "adafactor_flat_sums",
      "adafactor_flat_apply",
      "adafactor_small_factored",
      "adafactor_small_flat",
  };
  static const char* types[] = {"float32", "float16", "bfloat16"};
  std::vector<std::string> names;
  for (const char* k : kernels) {
    for (const char* p : types) {
      for (const char* g : types) {
        names.push_back(std::string(k) + "_" + p + "_" + g);
      }
    }
  }
  return names;
}

} // namespace mlx_fused_adafactor::metal
