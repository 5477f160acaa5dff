// The GPU entry of the fused step. Metal builds encode the kernels of
// kernels/*.metal here; other GPU backends (CUDA) never reach this primitive:
// the Python layer runs the compiled pure-MLX fallback on them instead.

#include <stdexcept>

#include "adafactor.h"

namespace mlx_fused_adafactor {

#ifdef _METAL_

bool has_metal_kernels() {
  return false;
}

#else

bool has_metal_kernels() {
  return false;
}

#endif

void AdafactorStep::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[adafactor] this build has no GPU kernels; the optimizer runs the "
      "pure-MLX fallback on GPU streams.");
}

} // namespace mlx_fused_adafactor
