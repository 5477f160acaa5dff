#include "op/primitive.h"

#include "mlx/ops.h"
#include "mlx/transforms.h"

#include "cpu/cpu.h"
#include "metal/metal.h"
#include "op/reference.h"
#include "schema/hyper.h"
#include "schema/slots.h"

namespace mlx_fused_adafactor {

void AdafactorStep::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  cpu::eval(hyper_, keys_, inputs, outputs, stream());
}

void AdafactorStep::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  metal::eval(hyper_, keys_, inputs, outputs, stream());
}

std::vector<mx::array> AdafactorStep::fallback(
    const std::vector<mx::array>& inputs) {
  return reference_step(hyper_, keys_, inputs, stream());
}

std::vector<mx::array> AdafactorStep::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto fun = [this](const std::vector<mx::array>& in) { return fallback(in); };
  auto [_, vjps] = mx::vjp(fun, primals, cotangents);
  std::vector<mx::array> out;
  out.reserve(argnums.size());
  for (int i : argnums) {
    out.push_back(vjps[i]);
  }
  return out;
}

std::vector<mx::array> AdafactorStep::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  std::vector<mx::array> all;
  all.reserve(primals.size());
  for (size_t i = 0, j = 0; i < primals.size(); ++i) {
    if (j < argnums.size() && static_cast<int>(i) == argnums[j]) {
      all.push_back(tangents[j++]);
    } else {
      all.push_back(mx::zeros_like(primals[i], stream()));
    }
  }
  auto fun = [this](const std::vector<mx::array>& in) { return fallback(in); };
  return mx::jvp(fun, primals, all).second;
}

std::pair<std::vector<mx::array>, std::vector<int>> AdafactorStep::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto fun = [this](const std::vector<mx::array>& in) { return fallback(in); };
  auto outputs = mx::vmap(fun, axes)(inputs);
  return {outputs, std::vector<int>(outputs.size(), 0)};
}

bool AdafactorStep::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const AdafactorStep&>(other);
  return same_hyper(hyper_, o.hyper_) && keys_ == o.keys_;
}

std::vector<mx::Shape> AdafactorStep::output_shapes(
    const std::vector<mx::array>& inputs) {
  const auto layout = SlotLayout::of_inputs(inputs, hyper_);
  std::vector<mx::Shape> shapes;
  shapes.reserve(layout.num_outputs());
  for (const auto& t : layout.tensors()) {
    shapes.push_back(inputs[t.param_in()].shape());
    for (Entry e : t.entries) {
      shapes.push_back(inputs[t.state_in(e)].shape());
    }
  }
  return shapes;
}

} // namespace mlx_fused_adafactor
