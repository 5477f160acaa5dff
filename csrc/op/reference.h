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
//
// NOTE: [sharded step]
// Sharded over a group (nn.fully_shard's layout: every parameter split
// evenly along axis 0), a tensor's step needs sums over all its shards: of
// p^2 and u^2 (for RMS(p) and the clipping RMS), and for a matrix split
// along its rows (2-D) the column sums of g^2 + eps1 and the sum of the new
// row state (for the row mean); a 1-D tensor's second moment and a 3-D or
// larger tensor's matrices are whole on each shard. The step runs in three
// phases with one collective between two: local sums of every tensor, their
// sums over the group; the factors, the update and its local sum of squares,
// their sums; the update itself. Each collective gathers every rank's
// partial sums in one array and every rank adds them with the same code, so
// all ranks hold bitwise the same sums and apply the same update.

#pragma once

#include <optional>
#include <vector>

#include "mlx/array.h"
#include "mlx/distributed/distributed.h"
#include "mlx/stream.h"

#include "adafactor_math.h"

namespace mlx_fused_adafactor {

namespace mx = mlx::core;

// The new parameters and state (NOTE: [slot layout]) of `inputs`, as a
// graph of MLX ops on `stream`.
// `keys[i]` is tensor i's key (NOTE: [stochastic rounding]). With a
// `group`, every parameter is this rank's axis-0 shard of a tensor split
// evenly over the group (NOTE: [sharded step]).
std::vector<mx::array> reference_step(
    const AdafactorHyper& h,
    const std::vector<AF_UINT>& keys,
    const std::vector<mx::array>& inputs,
    mx::Stream stream,
    const std::optional<mx::distributed::Group>& group = std::nullopt);

} // namespace mlx_fused_adafactor
