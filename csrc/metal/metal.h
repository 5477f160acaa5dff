// The Metal backend of the fused step (csrc/metal/): what the op and the
// primitive ask of it. Non-Metal builds compile the same interface
// (host.cpp) and report that there are no kernels.

#pragma once

#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/stream.h"

#include "adafactor_math.h"

namespace mlx_fused_adafactor {
namespace mx = mlx::core;
} // namespace mlx_fused_adafactor

namespace mlx_fused_adafactor::metal {

// True when this build carries the Metal kernels (macOS builds).
bool has_kernels();

// Whether the fused kernels can run on `stream` (a GPU stream); otherwise
// `why` says what is missing.
bool kernels_ready(const mlx::core::Stream& stream, std::string& why);

// AdafactorStep::eval_gpu.
void eval(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mlx::core::array>& inputs,
    std::vector<mlx::core::array>& outputs,
    mlx::core::Stream stream);

} // namespace mlx_fused_adafactor::metal
