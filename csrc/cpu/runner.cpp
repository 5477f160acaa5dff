// The CPU step bound to MLX arrays: input data (contiguous, or staged as a
// contiguous copy), output buffers, the dtype dispatch, and the two ways the
// step runs (inside eval_cpu, or eagerly).

#include <cstring>
#include <functional>
#include <stdexcept>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"

#include "cpu/buffers.h"
#include "cpu/cpu.h"
#include "cpu/step.h"
#include "cpu/thread_pool.h"

namespace mlx_fused_adafactor::cpu {

namespace {

// Copy the array at `src` with `shape` and `strides` (in elements) into
// `dst` in row-major order. Work items are tiles of the last two
// dimensions, kCopyTile square: a transposed matrix (the gradient of a
// linear layer arrives as one) then reads cache lines it reuses instead of
// one element per line.
constexpr int64_t kCopyTile = 64;

template <typename T>
void copy_row_major(
    T* dst,
    const T* src,
    const mx::Shape& shape,
    const mx::Strides& strides) {
  const int nd = static_cast<int>(shape.size());
  const int64_t cols = nd >= 1 ? shape[nd - 1] : 1;
  const int64_t col_stride = nd >= 1 ? strides[nd - 1] : 0;
  const int64_t rows = nd >= 2 ? shape[nd - 2] : 1;
  const int64_t row_stride = nd >= 2 ? strides[nd - 2] : 0;
  int64_t outer = 1;
  for (int d = 0; d + 2 < nd; ++d) {
    outer *= shape[d];
  }
  const int64_t row_tiles = (rows + kCopyTile - 1) / kCopyTile;
  const int64_t col_tiles = (cols + kCopyTile - 1) / kCopyTile;
  const size_t items = static_cast<size_t>(outer * row_tiles * col_tiles);
  auto copy_tile = [&](size_t k) {
    const int64_t ct = static_cast<int64_t>(k) % col_tiles;
    const int64_t rt = (static_cast<int64_t>(k) / col_tiles) % row_tiles;
    const int64_t o = static_cast<int64_t>(k) / (col_tiles * row_tiles);
    // The source offset of matrix o.
    int64_t base = 0;
    for (int64_t d = nd - 3, rest = o; d >= 0; --d) {
      base += (rest % shape[d]) * strides[d];
      rest /= shape[d];
    }
    const int64_t r0 = rt * kCopyTile, r1 = std::min(rows, r0 + kCopyTile);
    const int64_t c0 = ct * kCopyTile, c1 = std::min(cols, c0 + kCopyTile);
    for (int64_t r = r0; r < r1; ++r) {
      const T* from = src + base + r * row_stride;
      T* to = dst + (o * rows + r) * cols;
      for (int64_t c = c0; c < c1; ++c) {
        to[c] = from[c * col_stride];
      }
    }
  };
  // Fanning out costs more than copying a few tiles.
  ThreadPool::instance().parallel_for(items, copy_tile, items < 16);
}

// The data of an input, or of a contiguous copy when it arrived with other
// strides: the copy (in a buffer from MLX's allocator, so MLX counts it) is
// made by copy_row_major once the input is ready.
class InputStaging {
 public:
  const void* data(const mx::array& a) {
    if (a.flags().row_contiguous || a.size() == 0) {
      return a.data<char>();
    }
    auto& buf = staged_.emplace_back(mx::allocator::malloc(a.nbytes()));
    void* dst = buf.buffer().raw_ptr();
    copies_.push_back({dst, a});
    return dst;
  }

  void gather() {
    for (auto& [dst, a] : copies_) {
      switch (a.itemsize()) {
        case 2:
          copy_row_major(
              static_cast<uint16_t*>(dst), a.data<uint16_t>(), a.shape(),
              a.strides());
          break;
        case 4:
          copy_row_major(
              static_cast<uint32_t*>(dst), a.data<uint32_t>(), a.shape(),
              a.strides());
          break;
        default:
          copy_row_major(
              static_cast<uint64_t*>(dst), a.data<uint64_t>(), a.shape(),
              a.strides());
          break;
      }
    }
    copies_.clear();
  }

 private:
  std::vector<mx::allocator::Data> staged_;
  std::vector<std::pair<void*, mx::array>> copies_;
};

std::vector<int64_t> shape_of(const mx::array& a) {
  return std::vector<int64_t>(a.shape().begin(), a.shape().end());
}

template <typename P, typename G>
class CpuRunner : public StepRunner {
 public:
  CpuRunner(
      const AdafactorHyper& h,
      const std::vector<AF_UINT>& keys,
      const SlotLayout& layout,
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs)
      : step_(h, layout.size()) {
    for (size_t i = 0; i < layout.size(); ++i) {
      const auto& t = layout[i];
      TensorData<P, G> x;
      x.param = static_cast<const P*>(staging_.data(inputs[t.param_in()]));
      x.grad = static_cast<const G*>(staging_.data(inputs[t.grad_in()]));
      x.param_out = outputs[t.param_out()].data<P>();
      for (Entry e : t.entries) {
        const void* in = staging_.data(inputs[t.state_in(e)]);
        void* out = outputs[t.state_out(e)].data<void>();
        switch (e) {
          case Entry::Row:
            x.row = static_cast<const float*>(in);
            x.row_out = static_cast<float*>(out);
            break;
          case Entry::Col:
            x.col = static_cast<const float*>(in);
            x.col_out = static_cast<float*>(out);
            break;
          case Entry::Sq:
            x.sq = static_cast<const float*>(in);
            x.sq_out = static_cast<float*>(out);
            break;
          case Entry::ExpAvg:
            x.exp_avg = static_cast<const P*>(in);
            x.exp_avg_out = static_cast<P*>(out);
            break;
        }
      }
      step_.add(x, make_geometry(shape_of(inputs[t.param_in()])), keys[i]);
    }
    step_.plan();
  }

  void execute(float t, float lr) override {
    staging_.gather();
    step_.run(t, lr);
  }

 private:
  CpuStep<P, G> step_;
  InputStaging staging_;
};

template <typename P>
std::shared_ptr<StepRunner> make_runner_p(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const SlotLayout& layout,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  switch (inputs[layout[0].grad_in()].dtype()) {
    case mx::float32:
      return std::make_shared<CpuRunner<P, float>>(
          h, keys, layout, inputs, outputs);
    case mx::float16:
      return std::make_shared<CpuRunner<P, f16>>(
          h, keys, layout, inputs, outputs);
    case mx::bfloat16:
      return std::make_shared<CpuRunner<P, bf16>>(
          h, keys, layout, inputs, outputs);
    default:
      throw std::invalid_argument("[adafactor] unsupported gradient dtype.");
  }
}

} // namespace

std::shared_ptr<StepRunner> make_runner(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const SlotLayout& layout,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  switch (inputs[layout[0].param_in()].dtype()) {
    case mx::float32:
      return make_runner_p<float>(h, keys, layout, inputs, outputs);
    case mx::float16:
      return make_runner_p<f16>(h, keys, layout, inputs, outputs);
    case mx::bfloat16:
      return make_runner_p<bf16>(h, keys, layout, inputs, outputs);
    default:
      throw std::invalid_argument("[adafactor] unsupported parameter dtype.");
  }
}

void eval(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream) {
  const auto layout = SlotLayout::of_inputs(inputs, h);
  if (layout.size() == 0) {
    return;
  }
  // Outputs first: donation must be decided before anything else holds the
  // inputs (NOTE: [donation]).
  std::vector<int> out_of_input(inputs.size(), -1);
  for (const auto& t : layout.tensors()) {
    out_of_input[t.param_in()] = t.param_out();
    for (Entry e : t.entries) {
      out_of_input[t.state_in(e)] = t.state_out(e);
    }
  }
  const auto donate = donatable_inputs(inputs, outputs, out_of_input);
  for (size_t j = 0; j < inputs.size(); ++j) {
    const int o = out_of_input[j];
    if (o < 0) {
      continue;
    }
    if (donate[j]) {
      outputs[o].copy_shared_buffer(inputs[j]);
    } else {
      outputs[o].set_data(fresh_buffer(outputs[o].nbytes()));
    }
  }

  auto runner = make_runner(h, keys, layout, inputs, outputs);
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto& a : outputs) {
    encoder.set_output_array(a);
  }
  encoder.dispatch([runner,
                    t_ptr = inputs[SlotLayout::kStep].data<float>(),
                    lr_ptr = inputs[SlotLayout::kLr].data<float>()]() {
    runner->execute(*t_ptr, *lr_ptr);
  });
}

std::vector<mx::array> run_eager(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const SlotLayout& layout,
    std::vector<mx::array> inputs,
    std::vector<mx::Shape> shapes,
    const std::vector<mx::Dtype>& dtypes) {
  // Evaluate what is still lazy; wait for what is scheduled.
  std::vector<mx::array> pending;
  for (const auto& a : inputs) {
    if (a.status() == mx::array::Status::unscheduled) {
      pending.push_back(a);
    }
  }
  if (!pending.empty()) {
    mx::eval(std::move(pending));
  }
  for (auto& a : inputs) {
    if (!a.is_available()) {
      a.wait();
    }
  }
  // NOTE: [output buffers]
  std::vector<mx::array> outputs;
  outputs.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    size_t bytes = mx::size_of(dtypes[i]);
    for (auto d : shapes[i]) {
      bytes *= d;
    }
    outputs.emplace_back(fresh_buffer(bytes), std::move(shapes[i]), dtypes[i]);
  }
  make_runner(h, keys, layout, inputs, outputs)
      ->execute(
          inputs[SlotLayout::kStep].item<float>(),
          inputs[SlotLayout::kLr].item<float>());
  return outputs;
}

} // namespace mlx_fused_adafactor::cpu
