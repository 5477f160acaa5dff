// The GPU entry of the fused step. Metal builds encode the launch plan of
// plan.h, whose kernels are in kernels/*.metal; other builds (CUDA) have no
// GPU kernels, and the op runs the reference there (NOTE: [backend]).
//
// Only encoding lives here: which kernel runs on what grid with which
// buffers is the plan's decision, and tests/metal runs the same plan on a
// CPU emulation of Metal.

#include "metal/metal.h"

#include <stdexcept>

#ifdef _METAL_
#include <dlfcn.h>

#include <algorithm>
#include <filesystem>

#include "mlx/allocator.h"
#include "mlx/backend/gpu/copy.h"
#include "mlx/backend/metal/device.h"

#include "metal/plan.h"
#include "schema/slots.h"
#endif

namespace mlx_fused_adafactor::metal {

#ifdef _METAL_

namespace {

// The directory of this binary, where CMake installs the .metallib.
std::string current_binary_dir() {
  static std::string dir = []() {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&current_binary_dir), &info)) {
      throw std::runtime_error("[adafactor] cannot locate the extension.");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

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

} // namespace

bool has_kernels() {
  return true;
}

bool kernels_ready(const mx::Stream&, std::string&) {
  return true;
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
  mx::array scratch(
      {static_cast<int>(std::max<int64_t>(plan.scratch_bytes, 256) / 4)},
      mx::float32,
      nullptr,
      {});
  scratch.set_data(mx::allocator::malloc(scratch.nbytes()));
  enc.add_temporary(scratch);

  // Encode the plan: what a dispatch writes is bound as an output, the rest
  // as inputs, so MLX orders the dispatches (NOTE: [buffer indices]). Empty
  // arrays are never indexed; they are bound to the scratch buffer so that
  // every declared index has a buffer.
  auto lib = d.get_library(kLibraryName, current_binary_dir());
  for (const auto& disp : plan.dispatches) {
    enc.set_compute_pipeline_state(d.get_kernel(disp.kernel, lib));
    for (const auto& b : disp.bindings) {
      switch (b.source) {
        case Source::Input:
        case Source::Output: {
          const mx::array& a = b.source == Source::Input ? ins[b.array]
                                                         : outputs[b.array];
          if (a.nbytes() == 0) {
            enc.set_input_array(scratch, b.index);
          } else if (b.writes()) {
            enc.set_output_array(const_cast<mx::array&>(a), b.index);
          } else {
            enc.set_input_array(a, b.index);
          }
          break;
        }
        case Source::Scratch:
          if (b.writes()) {
            enc.set_output_array(scratch, b.index, b.offset);
          } else {
            enc.set_input_array(scratch, b.index, b.offset);
          }
          break;
        case Source::Bytes:
          enc.set_bytes(
              b.bytes.data(), static_cast<int>(b.bytes.size()), b.index);
          break;
      }
    }
    enc.dispatch_threadgroups(
        MTL::Size(disp.grid[0], disp.grid[1], disp.grid[2]),
        MTL::Size(disp.group[0], disp.group[1], disp.group[2]));
  }
}

#else

bool has_kernels() {
  return false;
}

bool kernels_ready(const mx::Stream&, std::string& why) {
  why = "this build has no fused kernels for the GPU";
  return false;
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
