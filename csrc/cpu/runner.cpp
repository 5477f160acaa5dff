// The CPU step bound to MLX arrays: input data (contiguous, or staged as a
// contiguous copy), output buffers, the dtype dispatch, and the two ways the
// step runs (inside eval_cpu, or eagerly).

#include <cstring>
#include <functional>
#include <stdexcept>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"

#include "cpu/buffers.h"
#include "cpu/cpu.h"
#include "cpu/step.h"

namespace mlx_fused_adafactor::cpu {

namespace {

// The data of an input, or of a contiguous copy when it arrived with other
// strides: the copy is made by a gather run once the input is ready.
class InputStaging {
 public:
  const void* data(const mx::array& a) {
    if (a.flags().row_contiguous || a.size() == 0) {
      return a.data<char>();
    }
    auto& buf = staged_.emplace_back(a.nbytes());
    char* dst = buf.data();
    gathers_.push_back([dst,
                        src = a.data<char>(),
                        size = a.size(),
                        item = a.itemsize(),
                        shape = a.shape(),
                        strides = a.strides()]() {
      for (size_t e = 0; e < size; ++e) {
        auto loc = mx::elem_to_loc(static_cast<int64_t>(e), shape, strides);
        std::memcpy(dst + e * item, src + loc * item, item);
      }
    });
    return dst;
  }

  void gather() {
    for (auto& g : gathers_) {
      g();
    }
  }

 private:
  std::vector<std::vector<char>> staged_;
  std::vector<std::function<void()>> gathers_;
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
