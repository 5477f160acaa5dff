// The parts of the `_ext` module, each in its own file.

#pragma once

#include <nanobind/nanobind.h>

namespace mlx_fused_adafactor {

void bind_hyper(nanobind::module_& m); // hyper.cpp
void bind_step(nanobind::module_& m); // step.cpp

} // namespace mlx_fused_adafactor
