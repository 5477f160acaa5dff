// The GPU entry of the fused step. Metal builds encode the launch plan of
// csrc/metal_plan.h, whose kernels are in kernels/*.metal; other GPU
// backends (CUDA) never reach this primitive: the Python layer runs the
// compiled pure-MLX fallback on them instead.
//
// Only encoding lives here: which kernel runs on what grid with which
// buffers is the plan's decision, and tests/metal runs the same plan on a
// CPU emulation of Metal.

#include <stdexcept>

#include "adafactor.h"

#ifdef _METAL_
#include <dlfcn.h>

#include <algorithm>
#include <filesystem>

#include "mlx/allocator.h"
#include "mlx/backend/gpu/copy.h"
#include "mlx/backend/metal/device.h"

#include "metal_plan.h"
#endif

namespace mlx_fused_adafactor {

#ifdef _METAL_

bool has_metal_kernels() {
  return true;
}

namespace {

namespace mp = metal_plan;

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

void AdafactorStep::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  if (inputs.size() <= kFirstTensorIdx) {
    return;
  }
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  const bool momentum = hyper_.flags & AF_MOMENTUM;

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

  const mp::Plan plan =
      mp::make_plan(hyper_, mp::describe_inputs(ins, momentum));

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
      mx::float32, nullptr, {});
  scratch.set_data(mx::allocator::malloc(scratch.nbytes()));
  enc.add_temporary(scratch);

  // Encode the plan. Empty arrays are never indexed; they are bound to the
  // scratch buffer so that every declared index has a buffer.
  auto lib = d.get_library(mp::kMetallibName, current_binary_dir());
  for (const auto& disp : plan.dispatches) {
    enc.set_compute_pipeline_state(d.get_kernel(disp.kernel, lib));
    for (const auto& b : disp.bindings) {
      switch (b.source) {
        case mp::Source::Input: {
          const auto& a = ins[b.array];
          if (a.nbytes() == 0) {
            enc.set_input_array(scratch, b.index);
          } else {
            enc.set_input_array(a, b.index);
          }
          break;
        }
        case mp::Source::Output: {
          auto& a = outputs[b.array];
          if (a.nbytes() == 0) {
            enc.set_input_array(scratch, b.index);
          } else if (b.bytes_written == 0 && b.bytes_read > 0) {
            enc.set_input_array(a, b.index);
          } else {
            enc.set_output_array(a, b.index);
          }
          break;
        }
        case mp::Source::Scratch:
          if (b.bytes_written > 0) {
            enc.set_output_array(scratch, b.index, b.offset);
          } else {
            enc.set_input_array(scratch, b.index, b.offset);
          }
          break;
        case mp::Source::Bytes:
          enc.set_bytes(b.bytes.data(), static_cast<int>(b.bytes.size()),
                        b.index);
          break;
      }
    }
    enc.dispatch_threadgroups(
        MTL::Size(disp.grid[0], disp.grid[1], disp.grid[2]),
        MTL::Size(disp.group[0], disp.group[1], disp.group[2]));
  }
}

#else

bool has_metal_kernels() {
  return false;
}

void AdafactorStep::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[adafactor] this build has no GPU kernels; the optimizer runs the "
      "pure-MLX fallback on GPU streams.");
}

#endif

} // namespace mlx_fused_adafactor
