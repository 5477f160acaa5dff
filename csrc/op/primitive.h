// The AdafactorStep primitive: the lazy form of the fused step.

#pragma once

#include <vector>

#include "mlx/primitives.h"

#include "adafactor_math.h"

namespace mlx_fused_adafactor {

namespace mx = mlx::core;

// Inputs and outputs follow NOTE: [slot layout]. The CPU and Metal
// backends evaluate it; vjp, jvp and vmap are those of the reference
// implementation (NOTE: [reference]), as for MLX's fast ops.
class AdafactorStep : public mx::Primitive {
 public:
  // `keys[i]` is tensor i's key (NOTE: [stochastic rounding]).
  AdafactorStep(
      mx::Stream stream,
      const AdafactorHyper& hyper,
      std::vector<AF_UINT> keys)
      : mx::Primitive(stream), hyper_(hyper), keys_(std::move(keys)) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  const char* name() const override {
    return "AdafactorStep";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

  const AdafactorHyper& hyper() const {
    return hyper_;
  }

 private:
  std::vector<mx::array> fallback(const std::vector<mx::array>& inputs);

  AdafactorHyper hyper_;
  std::vector<AF_UINT> keys_;
};

} // namespace mlx_fused_adafactor
