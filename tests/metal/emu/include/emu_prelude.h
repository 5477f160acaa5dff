// Included before the kernel source in every build of the emulator (the
// source rewrite adds the include): Apple's <metal_stdlib>, in its test
// double, and in run mode the emulator's own af_instantiate_kernel, which
// the kernels' header then leaves alone (kernels/adafactor_kernels.h). It
// registers each instantiation with the emulated GPU under its host name.
// In lint mode the kernels' own macro stays, its attributes removed by the
// rewrite: a plain explicit instantiation.

#pragma once

#include <metal_stdlib>

#if !defined(EMU_LINT)
#define EMU_REGISTER2(n, name, func, ...)                  \
  static ::emu::Registrar emu_registrar_##n(               \
      name, ::emu::pick<n, emu_kernel_##func, __VA_ARGS__>());
#define EMU_REGISTER(n, name, func, ...) \
  EMU_REGISTER2(n, name, func, __VA_ARGS__)
#define af_instantiate_kernel(name, func, ...) \
  EMU_REGISTER(__COUNTER__, name, func, __VA_ARGS__)
#endif
