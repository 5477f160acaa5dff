// The fused Adafactor operation: validates its inputs and builds one
// AdafactorStep primitive for all tensors of a dtype group.

#include <sstream>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/transforms.h"

#include "adafactor.h"
#include "buffer_cache.h"

namespace mlx_fused_adafactor {

namespace {

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::invalid_argument("[adafactor] parameter '" + path + "': " + what);
}

void check_state(
    const std::string& path,
    const char* key,
    const mx::array& a,
    const mx::Shape& shape,
    mx::Dtype dtype) {
  if (a.shape() != shape) {
    fail(
        path,
        std::string("state '") + key + "' has shape " + shape_str(a.shape()) +
            ", expected " + shape_str(shape) + ".");
  }
  if (a.dtype() != dtype) {
    fail(path, std::string("state '") + key + "' has the wrong dtype.");
  }
}

} // namespace

std::vector<mx::array> adafactor_step(
    const mx::array& step,
    const mx::array& learning_rate,
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<std::string>& names,
    const AdafactorHyper& hyper,
    bool allow_eager,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  const size_t n = params.size();
  if (grads.size() != n || states.size() != n || names.size() != n) {
    throw std::invalid_argument(
        "[adafactor] params, grads, states and names must have equal length.");
  }
  if (step.ndim() != 0 || learning_rate.ndim() != 0) {
    throw std::invalid_argument(
        "[adafactor] step and learning_rate must be scalars.");
  }
  const bool momentum = hyper.flags & AF_MOMENTUM;

  std::vector<mx::array> inputs = {
      mx::astype(step, mx::float32, stream),
      mx::astype(learning_rate, mx::float32, stream)};
  std::vector<mx::Shape> out_shapes;
  std::vector<mx::Dtype> out_dtypes;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    const auto& path = names[i];
    // Validate dtypes and shapes before anything is built.
    if (!is_float_storage(p.dtype())) {
      fail(path, "parameters must be float32, float16 or bfloat16.");
    }
    if (!is_float_storage(g.dtype())) {
      fail(path, "gradients must be float32, float16 or bfloat16.");
    }
    if (p.dtype() != params[0].dtype() || g.dtype() != grads[0].dtype()) {
      fail(path, "all tensors of one fused step must share their dtypes.");
    }
    if (g.shape() != p.shape()) {
      fail(
          path,
          "gradient shape " + shape_str(g.shape()) +
              " does not match parameter shape " + shape_str(p.shape()) + ".");
    }
    const bool factored = is_factored(p);
    const auto& st = states[i];
    if (static_cast<int>(st.size()) != num_inputs(factored, momentum) - 2) {
      fail(path, "wrong number of state arrays.");
    }
    out_shapes.push_back(p.shape());
    out_dtypes.push_back(p.dtype());
    if (factored) {
      auto& shape = p.shape();
      mx::Shape row(shape.begin(), shape.end() - 1);
      mx::Shape col(shape.begin(), shape.end() - 2);
      col.push_back(shape.back());
      check_state(path, "exp_avg_sq_row", st[0], row, mx::float32);
      check_state(path, "exp_avg_sq_col", st[1], col, mx::float32);
      out_shapes.push_back(row);
      out_shapes.push_back(col);
      out_dtypes.push_back(mx::float32);
      out_dtypes.push_back(mx::float32);
    } else {
      check_state(path, "exp_avg_sq", st[0], p.shape(), mx::float32);
      out_shapes.push_back(p.shape());
      out_dtypes.push_back(mx::float32);
    }
    if (momentum) {
      check_state(path, "exp_avg", st.back(), p.shape(), p.dtype());
      out_shapes.push_back(p.shape());
      out_dtypes.push_back(p.dtype());
    }
    inputs.push_back(p);
    inputs.push_back(g);
    inputs.insert(inputs.end(), st.begin(), st.end());
  }
  if (n == 0) {
    return {};
  }

  // See NOTE: [eager step].
  bool eager = allow_eager && stream.device == mx::Device::cpu;
  for (size_t i = 0; eager && i < inputs.size(); ++i) {
    eager = !inputs[i].is_tracer();
  }
  if (eager) {
    // Evaluate what is still lazy; wait for what is scheduled.
    std::vector<mx::array> pending;
    for (auto& a : inputs) {
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
    auto& cache = BufferCache::instance();
    std::vector<mx::array> outputs;
    outputs.reserve(out_shapes.size());
    size_t total = 0;
    for (size_t i = 0; i < out_shapes.size(); ++i) {
      size_t bytes = mx::size_of(out_dtypes[i]);
      for (auto d : out_shapes[i]) {
        bytes *= d;
      }
      total += bytes;
      outputs.emplace_back(
          cache.acquire(bytes), std::move(out_shapes[i]), out_dtypes[i]);
    }
    cache.reserve(total);
    make_cpu_runner(hyper, inputs, outputs)
        ->execute(
            inputs[kStepIdx].item<float>(), inputs[kLrIdx].item<float>());
    return outputs;
  }
  // NOTE: [lazy chunks]
  // Each output of a multi-output primitive lists all the others as
  // siblings, and MLX's graph passes (compile above all) grow faster than
  // linearly in that count: one primitive for 100 1-D tensors takes a second
  // to compile, for 1000 longer than a CI run. The lazy step is therefore
  // one primitive per run of tensors with at most kMaxLazyOutputs outputs;
  // large tensors still fill the thread pool inside each primitive.
  std::vector<mx::array> outputs;
  outputs.reserve(out_shapes.size());
  size_t in = kFirstTensorIdx, out = 0;
  while (in < inputs.size()) {
    std::vector<mx::array> chunk_in = {inputs[kStepIdx], inputs[kLrIdx]};
    std::vector<mx::Shape> chunk_shapes;
    std::vector<mx::Dtype> chunk_dtypes;
    int tensors = 0;
    while (in < inputs.size()) {
      const bool factored = is_factored(inputs[in]);
      const int n_out = num_outputs(factored, momentum);
      if (tensors > 0 && chunk_shapes.size() + n_out > kMaxLazyOutputs) {
        break;
      }
      chunk_in.insert(
          chunk_in.end(),
          inputs.begin() + in,
          inputs.begin() + in + num_inputs(factored, momentum));
      for (int k = 0; k < n_out; ++k) {
        chunk_shapes.push_back(std::move(out_shapes[out + k]));
        chunk_dtypes.push_back(out_dtypes[out + k]);
      }
      in += num_inputs(factored, momentum);
      out += n_out;
      ++tensors;
    }
    auto arrays = mx::array::make_arrays(
        std::move(chunk_shapes),
        chunk_dtypes,
        std::make_shared<AdafactorStep>(stream, hyper, tensors),
        chunk_in);
    outputs.insert(outputs.end(), arrays.begin(), arrays.end());
  }
  return outputs;
}

bool AdafactorStep::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AdafactorStep&>(other);
  const auto& a = hyper_;
  const auto& b = o.hyper_;
  return num_tensors_ == o.num_tensors_ && a.eps1 == b.eps1 &&
      a.eps2 == b.eps2 && a.clip_threshold == b.clip_threshold &&
      a.decay_rate == b.decay_rate && a.beta1 == b.beta1 &&
      a.one_minus_beta1 == b.one_minus_beta1 &&
      a.weight_decay == b.weight_decay && a.flags == b.flags;
}

std::vector<mx::Shape> AdafactorStep::output_shapes(
    const std::vector<mx::array>& inputs) {
  const bool momentum = hyper_.flags & AF_MOMENTUM;
  std::vector<mx::Shape> shapes;
  size_t i = kFirstTensorIdx;
  while (i < inputs.size()) {
    const auto& p = inputs[i + kParamIdx];
    const bool factored = is_factored(p);
    for (int k = 0; k < num_outputs(factored, momentum); ++k) {
      // Outputs mirror the inputs after the gradient slot.
      shapes.push_back(inputs[i + (k == 0 ? kParamIdx : k + 1)].shape());
    }
    i += num_inputs(factored, momentum);
  }
  return shapes;
}

} // namespace mlx_fused_adafactor
