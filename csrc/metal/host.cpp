// The GPU entry of the fused step. Metal builds encode the launch plan of
// plan.h, whose kernels are in kernels/*.metal; other builds (CUDA) have no
// GPU kernels, and the op runs the reference there (NOTE: [backend]).
//
// Only the library and the encoder live here: which kernel runs on what
// grid with which buffers is the plan's decision, how it is bound is
// encode_plan's (encode.h), and tests/metal runs both on a CPU emulation of
// Metal.
//
// NOTE: [kernel library]
// The kernels come from mlx_fused_adafactor.metallib next to the extension
// when the build made one (it found a working Metal compiler), and
// otherwise from the embedded source (kernel_source(): the same bytes the
// .metallib is compiled from), compiled at first use through MLX's
// Device::get_library(name, builder): the route MLX's own run-time compiled
// kernels take, which needs only the Metal framework that every Mac has. A
// .metallib that does not load (say, built for a newer macOS) falls back to
// the source as well. prepare_kernels() then builds the pipeline of every
// kernel at once, so that nothing can fail later inside eval_gpu, where an
// exception would leave the user's parameters unevaluable; the op runs a
// self-check of the kernels before the first step uses them
// (NOTE: [self-check] in csrc/op/self_check.h).

#include "metal/metal.h"

#include <stdexcept>

#ifdef _METAL_
#include <algorithm>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "mlx/allocator.h"
#include "mlx/backend/common/metal_kernel.h"
#include "mlx/backend/gpu/copy.h"
#include "mlx/backend/metal/device.h"

#include "metal/encode.h"
#include "metal/plan.h"
#include "schema/slots.h"
#endif

namespace mlx_fused_adafactor::metal {

#ifdef _METAL_

namespace {

// MLX's name of a float dtype, as in the kernels' host names.
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

// The tensors of the primitive's inputs, as the plan needs them.
std::vector<TensorDesc> describe(
    const SlotLayout& layout,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs) {
  std::vector<TensorDesc> tensors;
  tensors.reserve(layout.size());
  for (size_t i = 0; i < layout.size(); ++i) {
    const auto& t = layout[i];
    const auto& p = inputs[t.param_in()];
    tensors.push_back(
        {std::vector<int64_t>(p.shape().begin(), p.shape().end()),
         dtype_token(p.dtype()),
         dtype_token(inputs[t.grad_in()].dtype()),
         t,
         keys[i]});
  }
  return tensors;
}

// Give `out` a buffer: its input's when the plan allows it and MLX says the
// input can be donated.
void alloc_output(const mx::array* in, mx::array& out) {
  if (in && in->is_donatable() && in->flags().row_contiguous &&
      in->itemsize() == out.itemsize() && in->data_size() == in->size() &&
      in->size() == out.size()) {
    out.copy_shared_buffer(*in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

// The first lines of a compiler's message, for the one warning.
std::string first_lines(const std::string& text, int n = 4) {
  size_t end = 0;
  for (int k = 0; k < n && end != std::string::npos; ++k) {
    end = text.find('\n', end ? end + 1 : 0);
  }
  return end == std::string::npos ? text : text.substr(0, end);
}

// The library of each device, prepared once (NOTE: [kernel library]).
struct Prepared {
  KernelLibrary result;
  MTL::Library* lib = nullptr;
};

std::mutex prepare_mutex;
std::unordered_map<int, Prepared>& prepared() {
  static std::unordered_map<int, Prepared> by_device;
  return by_device;
}

MTL::Library* load_library(mx::metal::Device& d, KernelLibrary& r) {
  std::string metallib_error;
  const std::string metallib = metallib_path();
  if (!metallib.empty()) {
    try {
      MTL::Library* lib = d.get_library(kLibraryName, extension_dir());
      r.path = "metal-metallib";
      return lib;
    } catch (const std::exception& e) {
      metallib_error = std::string(" after ") + metallib +
          " did not load (" + first_lines(e.what(), 1) + ")";
    }
  }
  // Safe math, as the .metallib is compiled (-fno-fast-math).
  mx::CompileOptions options;
  options.math_mode = mx::MathMode::Safe;
  try {
    MTL::Library* lib = d.get_library(kLibraryName, options, [] {
      return std::string(kernel_source());
    });
    r.path = "metal-jit";
    return lib;
  } catch (const std::exception& e) {
    r.why = "the Metal kernels did not compile" + metallib_error + ": " +
        first_lines(e.what());
    return nullptr;
  }
}

Prepared prepare(mx::metal::Device& d) {
  Prepared p;
  p.lib = load_library(d, p.result);
  if (!p.lib) {
    return p;
  }
  for (const auto& name : kernel_names()) {
    try {
      MTL::ComputePipelineState* k = d.get_kernel(name, p.lib);
      if (k->maxTotalThreadsPerThreadgroup() < AF_THREADS_PER_GROUP) {
        p.result.why = "the pipeline of " + name + " allows " +
            std::to_string(k->maxTotalThreadsPerThreadgroup()) +
            " threads per threadgroup; the kernels need " +
            std::to_string(AF_THREADS_PER_GROUP);
        return p;
      }
    } catch (const std::exception& e) {
      p.result.why = "the pipeline of " + name +
          " could not be built: " + first_lines(e.what());
      return p;
    }
  }
  p.result.ready = true;
  return p;
}

// The prepared library of the device of `s`; eval_gpu only runs after the
// op found it ready (NOTE: [backend]).
MTL::Library* library(const mx::Stream& s) {
  std::lock_guard<std::mutex> lock(prepare_mutex);
  auto it = prepared().find(s.device.index);
  if (it == prepared().end() || !it->second.result.ready) {
    throw std::runtime_error(
        "[adafactor] the Metal kernels were not prepared for this device.");
  }
  return it->second.lib;
}

// encode_plan's target (encode.h): MLX's encoder and the step's arrays.
struct MlxTarget {
  mx::metal::Device& device;
  MTL::Library* lib;
  mx::metal::CommandEncoder& enc;
  std::vector<mx::array>& inputs;
  std::vector<mx::array>& outputs;
  std::vector<mx::array>& scratch;
  std::optional<mx::array> spare;

  void set_kernel(const Dispatch& d) {
    enc.set_compute_pipeline_state(device.get_kernel(d.kernel, lib));
  }
  mx::array& buffer(const Binding& b) {
    switch (b.source) {
      case Source::Input:
        return inputs[b.array];
      case Source::Output:
        return outputs[b.array];
      default:
        return scratch[b.array];
    }
  }
  bool empty(const mx::array& a) const {
    return a.nbytes() == 0;
  }
  mx::array& placeholder() {
    if (!spare) {
      spare = mx::array({64}, mx::float32, nullptr, {});
      spare->set_data(mx::allocator::malloc(spare->nbytes()));
      enc.add_temporary(*spare);
    }
    return *spare;
  }
  void set_input_array(const mx::array& a, int index, int64_t offset) {
    enc.set_input_array(a, index, offset);
  }
  void set_output_array(mx::array& a, int index, int64_t offset) {
    enc.set_output_array(a, index, offset);
  }
  void set_bytes(const void* data, int64_t size, int index) {
    enc.set_bytes(
        static_cast<const uint8_t*>(data), static_cast<int>(size), index);
  }
  void dispatch_threadgroups(const Dispatch& d) {
    enc.dispatch_threadgroups(
        MTL::Size(d.grid[0], d.grid[1], d.grid[2]),
        MTL::Size(d.group[0], d.group[1], d.group[2]));
  }
};

} // namespace

bool has_kernels() {
  return true;
}

KernelLibrary prepare_kernels(const mx::Stream& s) {
  std::lock_guard<std::mutex> lock(prepare_mutex);
  auto it = prepared().find(s.device.index);
  if (it == prepared().end()) {
    Prepared p;
    try {
      p = prepare(mx::metal::device(s.device));
    } catch (const std::exception& e) {
      p.result.why = std::string("the Metal device failed: ") + e.what();
    }
    it = prepared().emplace(s.device.index, std::move(p)).first;
  }
  return it->second.result;
}

void eval(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream s) {
  const auto layout = SlotLayout::of_inputs(inputs, h);
  if (layout.size() == 0) {
    return;
  }
  MTL::Library* lib = library(s);
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);

  // Kernels index row-contiguous data.
  std::vector<mx::array> ins;
  ins.reserve(inputs.size());
  for (const auto& a : inputs) {
    if (a.flags().row_contiguous || a.size() == 0) {
      ins.push_back(a);
    } else {
      ins.push_back(mx::contiguous_copy_gpu(a, s));
      enc.add_temporary(ins.back());
    }
  }

  const Plan plan = make_plan(h, describe(layout, keys, ins));

  // Outputs first: donation must be decided before anything else holds the
  // inputs.
  std::vector<const mx::array*> donor(outputs.size(), nullptr);
  for (const auto& [o, i] : plan.donations) {
    donor[o] = &ins[i];
  }
  for (size_t o = 0; o < outputs.size(); ++o) {
    alloc_output(donor[o], outputs[o]);
  }
  // One scratch buffer per tensor that needs one (NOTE: [encoding order]).
  std::vector<mx::array> scratch;
  scratch.reserve(plan.scratch.size());
  for (int64_t bytes : plan.scratch) {
    scratch.push_back(
        mx::array({static_cast<int>(bytes / 4)}, mx::float32, nullptr, {}));
    scratch.back().set_data(mx::allocator::malloc(bytes));
    enc.add_temporary(scratch.back());
  }

  MlxTarget target{d, lib, enc, ins, outputs, scratch, std::nullopt};
  encode_plan(plan, target);
}

#else

bool has_kernels() {
  return false;
}

KernelLibrary prepare_kernels(const mx::Stream&) {
  KernelLibrary r;
  r.why = "this build has no fused kernels for the GPU";
  return r;
}

void eval(
    const AdafactorHyper&,
    const std::vector<AF_UINT>&,
    const std::vector<mx::array>&,
    std::vector<mx::array>&,
    mx::Stream) {
  throw std::runtime_error(
      "[adafactor] this build has no GPU kernels; the step runs the "
      "reference implementation on GPU streams.");
}

#endif

} // namespace mlx_fused_adafactor::metal
