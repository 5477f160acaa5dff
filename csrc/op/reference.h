// The fused step in plain MLX ops.
//
// NOTE: [reference]
// reference_step computes exactly the math of kernels/adafactor_math.h, op
// by op as mlx.optimizers.Adafactor.apply_single does, with every
// intermediate in float32 (float64 for float64 parameters) and this
// package's state layout. It has three jobs, as the fallback of MLX's fast
// ops has: the step on streams without fused kernels (CUDA; Metal when the
// kernels are unavailable; the `reference` backend), the derivative rules
// of the primitive (vjp, jvp and vmap come from it), and the oracle of the
// tests (`mlx_fused_adafactor.adafactor_reference`).

#pragma once

#include <vector>

#include "mlx/array.h"
#include "mlx/stream.h"

#include "adafactor_math.h"

namespace mlx_fused_adafactor {

namespace mx = mlx::core;

// The new parameters and state (NOTE: [slot layout]) of `inputs`, as a
// graph of MLX ops on `stream`.
// `keys[i]` is tensor i's key (NOTE: [stochastic rounding]).
std::vector<mx::array> reference_step(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    mx::Stream stream);

} // namespace mlx_fused_adafactor
