// The Metal backend of the fused step (csrc/metal/): what the op and the
// primitive ask of it. Non-Metal builds compile the same interface
// (host.cpp) and report that there are no kernels; the kernel source and
// the .metallib lookup (source.cpp) exist on every platform, so that any
// build can say what a Mac would load.

#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "mlx/array.h"
#include "mlx/stream.h"

#include "adafactor_math.h"

namespace mlx_fused_adafactor {
namespace mx = mlx::core;
} // namespace mlx_fused_adafactor

namespace mlx_fused_adafactor::metal {

// True when this build carries the Metal host code (macOS builds).
bool has_kernels();

// The flattened kernel source compiled into the extension (NOTE: [kernel
// library]) and the SHA-256 of its bytes.
std::string_view kernel_source();
const char* kernel_source_sha256();
// The directory of the extension binary, and the .metallib the build
// installed there ("" when there is none).
std::string extension_dir();
std::string metallib_path();

// The kernel library of a GPU, as prepare_kernels() found it.
struct KernelLibrary {
  bool ready = false;
  // "metal-metallib" or "metal-jit" (the embedded source, compiled here).
  std::string path;
  // When not ready: what failed, for the one warning.
  std::string why;
};

// Load or compile the library and build the pipeline of every kernel for
// the device of `stream`, the first time; later calls return the first
// answer. Never throws: a failure is reported in the result.
KernelLibrary prepare_kernels(const mx::Stream& stream);

// AdafactorStep::eval_gpu.
void eval(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    mx::Stream stream);

} // namespace mlx_fused_adafactor::metal
