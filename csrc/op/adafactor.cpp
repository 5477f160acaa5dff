// The fused Adafactor operation: validate, then build the step the way
// NOTE: [backend] and NOTE: [eager step] choose.

#include "op/adafactor.h"

#include <memory>
#include <sstream>
#include <stdexcept>

#include "mlx/ops.h"

#include "cpu/cpu.h"
#include "metal/plan.h"
#include "op/backend.h"
#include "op/primitive.h"
#include "op/reference.h"
#include "schema/hyper.h"
#include "schema/slots.h"

namespace mlx_fused_adafactor {

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::invalid_argument("[adafactor] parameter '" + path + "': " + what);
}

// The dtypes the step takes (float64 only through the reference).
bool is_float_storage(mx::Dtype t) {
  return t == mx::float32 || t == mx::float16 || t == mx::bfloat16 ||
      t == mx::float64;
}

// The step's flat inputs (NOTE: [slot layout]) and the shape and dtype of
// each output, validated.
struct StepInputs {
  std::vector<mx::array> inputs;
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
};

StepInputs assemble(
    const mx::array& step,
    const mx::array& learning_rate,
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<std::vector<mx::array>>& states,
    const std::vector<std::string>& names,
    const SlotLayout& layout,
    bool sharded,
    mx::Stream stream) {
  StepInputs out;
  out.inputs.reserve(layout.num_inputs());
  out.inputs.push_back(mx::astype(step, mx::float32, stream));
  out.inputs.push_back(mx::astype(learning_rate, mx::float32, stream));
  out.shapes.reserve(layout.num_outputs());
  out.dtypes.reserve(layout.num_outputs());
  for (size_t i = 0; i < layout.size(); ++i) {
    const auto& t = layout[i];
    const auto& p = params[i];
    const auto& g = grads[i];
    const auto& st = states[i];
    const auto& path = names[i];
    if (!is_float_storage(p.dtype())) {
      fail(path, "parameters must be float32, float16, bfloat16 or float64.");
    }
    if (!is_float_storage(g.dtype())) {
      fail(path, "gradients must be float32, float16, bfloat16 or float64.");
    }
    if (!sharded &&
        (p.dtype() != params[0].dtype() || g.dtype() != grads[0].dtype())) {
      fail(path, "all tensors of one fused step must share their dtypes.");
    }
    if (sharded && p.ndim() == 0) {
      fail(path, "a scalar cannot be a shard (shards split axis 0).");
    }
    if (g.shape() != p.shape()) {
      fail(
          path,
          "gradient shape " + shape_str(g.shape()) +
              " does not match parameter shape " + shape_str(p.shape()) + ".");
    }
    if (static_cast<int>(st.size()) != t.entries.size()) {
      fail(path, "wrong number of state arrays.");
    }
    out.inputs.push_back(p);
    out.inputs.push_back(g);
    out.shapes.push_back(p.shape());
    out.dtypes.push_back(p.dtype());
    for (int k = 0; k < t.entries.size(); ++k) {
      const Entry e = t.entries[k];
      const auto& a = st[k];
      const mx::Shape shape = entry_shape(e, p.shape());
      const mx::Dtype dtype = entry_dtype(e, p.dtype());
      if (a.shape() != shape) {
        fail(
            path,
            std::string("state '") + entry_key(e) + "' has shape " +
                shape_str(a.shape()) + ", expected " + shape_str(shape) + ".");
      }
      if (a.dtype() != dtype) {
        fail(path, std::string("state '") + entry_key(e) +
                 "' has the wrong dtype.");
      }
      out.inputs.push_back(a);
      out.shapes.push_back(shape);
      out.dtypes.push_back(dtype);
    }
  }
  return out;
}

// NOTE: [lazy chunks]
// Each output of a multi-output primitive lists all the others as siblings,
// and MLX gives each its own copy of the input list, so MLX's graph work
// (compile's replay, eval's traversal, detach) grows with the square of a
// primitive's outputs; one primitive per tensor costs a scheduler task and
// a few hash-set insertions in cpu::eval instead. Measured on 1000 vectors
// of 1024 under mx.compile on a quiet machine: the first (tracing) call
// 170 ms with primitives of 48 outputs, 50 ms with one per tensor; later
// steps 11.3 and 11.1 ms. The lazy step is therefore one primitive per
// tensor; a large tensor still fills the thread pool inside its primitive.
// The lazy step of tensor `t`: one AdafactorStep primitive, its outputs in
// slot order.
std::vector<mx::array> tensor_step(
    const AdafactorHyper& h,
    AF_UINT key,
    const TensorSlots& t,
    StepInputs& in,
    mx::Stream stream) {
  std::vector<mx::array> tensor_in;
  tensor_in.reserve(SlotLayout::kFirstTensor + t.num_in());
  tensor_in.push_back(in.inputs[SlotLayout::kStep]);
  tensor_in.push_back(in.inputs[SlotLayout::kLr]);
  for (int k = 0; k < t.num_in(); ++k) {
    tensor_in.push_back(in.inputs[t.first_in + k]);
  }
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (int k = 0; k < t.num_out(); ++k) {
    shapes.push_back(std::move(in.shapes[t.first_out + k]));
    dtypes.push_back(in.dtypes[t.first_out + k]);
  }
  return mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<AdafactorStep>(stream, h, std::vector<AF_UINT>{key}),
      std::move(tensor_in));
}

std::vector<mx::array> lazy_step(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const SlotLayout& layout,
    StepInputs& in,
    mx::Stream stream) {
  std::vector<mx::array> outputs;
  outputs.reserve(layout.num_outputs());
  for (size_t i = 0; i < layout.size(); ++i) {
    for (auto& a : tensor_step(h, keys[i], layout[i], in, stream)) {
      outputs.push_back(std::move(a));
    }
  }
  return outputs;
}

// NOTE: [eager step]: small tensors at once, large ones deferred.
std::vector<mx::array> cpu_step(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const SlotLayout& layout,
    StepInputs& in,
    mx::Stream stream) {
  std::vector<size_t> now;
  for (size_t i = 0; i < layout.size(); ++i) {
    if (in.inputs[layout[i].param_in()].nbytes() < kDeferMinBytes) {
      now.push_back(i);
    }
  }
  if (now.size() == layout.size()) {
    return cpu::run_eager(
        h,
        keys,
        layout,
        std::move(in.inputs),
        std::move(in.shapes),
        in.dtypes);
  }
  std::vector<mx::array> outputs(layout.num_outputs(), mx::array(0.0f));
  // The small tensors as a step of their own (NOTE: [slot layout]).
  StepInputs small;
  std::vector<AF_UINT> small_keys;
  std::vector<int> ndims;
  small.inputs = {in.inputs[SlotLayout::kStep], in.inputs[SlotLayout::kLr]};
  for (size_t i : now) {
    const auto& t = layout[i];
    for (int k = 0; k < t.num_in(); ++k) {
      small.inputs.push_back(in.inputs[t.first_in + k]);
    }
    for (int k = 0; k < t.num_out(); ++k) {
      small.shapes.push_back(in.shapes[t.first_out + k]);
      small.dtypes.push_back(in.dtypes[t.first_out + k]);
    }
    small_keys.push_back(keys[i]);
    ndims.push_back(t.ndim);
  }
  // The large tensors, one primitive each (NOTE: [lazy chunks]).
  for (size_t i = 0, j = 0; i < layout.size(); ++i) {
    if (j < now.size() && now[j] == i) {
      ++j;
      continue;
    }
    const auto& t = layout[i];
    auto arrays = tensor_step(h, keys[i], t, in, stream);
    for (int k = 0; k < t.num_out(); ++k) {
      outputs[t.first_out + k] = std::move(arrays[k]);
    }
  }
  if (!now.empty()) {
    const SlotLayout small_layout(ndims, h);
    auto arrays = cpu::run_eager(
        h,
        small_keys,
        small_layout,
        std::move(small.inputs),
        std::move(small.shapes),
        small.dtypes);
    size_t next = 0;
    for (size_t i : now) {
      const auto& t = layout[i];
      for (int k = 0; k < t.num_out(); ++k) {
        outputs[t.first_out + k] = std::move(arrays[next++]);
      }
    }
  }
  return outputs;
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
    const std::optional<mx::distributed::Group>& shard_group,
    mx::StreamOrDevice s) {
  const auto stream = mx::to_stream(s);
  const size_t n = params.size();
  if (grads.size() != n || states.size() != n || names.size() != n) {
    throw std::invalid_argument(
        "[adafactor] params, grads, states and names must have equal length.");
  }
  if (step.ndim() != 0 || learning_rate.ndim() != 0) {
    throw std::invalid_argument(
        "[adafactor] step and learning_rate must be scalars.");
  }
  std::vector<int> ndims;
  ndims.reserve(n);
  for (const auto& p : params) {
    ndims.push_back(p.ndim());
  }
  const SlotLayout layout(ndims, hyper);
  StepInputs in = assemble(
      step,
      learning_rate,
      params,
      grads,
      states,
      names,
      layout,
      shard_group.has_value(),
      stream);
  if (n == 0) {
    return {};
  }
  // NOTE: [stochastic rounding]: each tensor's key, from its path.
  std::vector<AF_UINT> keys(n, 0);
  if (has_flag(hyper, AF_STOCHASTIC_ROUNDING)) {
    for (size_t i = 0; i < n; ++i) {
      keys[i] = tensor_key(hyper, names[i]);
    }
  }

  // NOTE: [sharded step]
  if (shard_group) {
    return reference_step(hyper, keys, in.inputs, stream, shard_group);
  }

  // NOTE: [backend]; NOTE: [float64]
  if (params[0].dtype() == mx::float64 || grads[0].dtype() == mx::float64) {
    return reference_step(hyper, keys, in.inputs, stream);
  }
  const Route r = route(stream);
  if (r.reference) {
    if (!r.reason.empty()) {
      warn_once(
          "[adafactor] " + r.reason +
          (r.failed ? "; running the pure-MLX implementation of the same "
                      "float32 math on this device for the rest of the "
                      "process" + std::string(kReportHint)
                    : "; running the pure-MLX implementation of the same "
                      "float32 math."));
    }
    return reference_step(hyper, keys, in.inputs, stream);
  }

  // The Metal kernels index with 32 bits (metal::kMaxElements): a larger
  // parameter takes its group to the reference here, not to a failure
  // inside eval_gpu, after which the new parameters could not be evaluated.
  if (stream.device != mx::Device::cpu) {
    for (size_t i = 0; i < n; ++i) {
      if (params[i].size() <= static_cast<size_t>(metal::kMaxElements)) {
        continue;
      }
      const std::string why = "parameter '" + names[i] + "' has " +
          std::to_string(params[i].size()) +
          " elements, more than the Metal kernels index (" +
          std::to_string(metal::kMaxElements) + ")";
      if (current_backend() == Backend::Fused) {
        throw std::invalid_argument(
            "[adafactor] MLX_FUSED_ADAFACTOR_BACKEND=fused, but " + why + ".");
      }
      warn_once(
          "[adafactor] " + why +
          "; its dtype group runs the pure-MLX implementation of the same "
          "float32 math.");
      return reference_step(hyper, keys, in.inputs, stream);
    }
  }

  // NOTE: [eager step]
  bool eager = stream.device == mx::Device::cpu;
  for (size_t i = 0; eager && i < in.inputs.size(); ++i) {
    eager = !in.inputs[i].is_tracer();
  }
  if (eager) {
    return cpu_step(hyper, keys, layout, in, stream);
  }
  return lazy_step(hyper, keys, layout, in, stream);
}

} // namespace mlx_fused_adafactor
