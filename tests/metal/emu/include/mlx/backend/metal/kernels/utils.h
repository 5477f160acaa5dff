// Test double of MLX's kernels/utils.h: the dtype names and
// `instantiate_kernel`, which here registers the kernel with the emulator
// under its host name (run mode) or instantiates it for the lint.

#pragma once

#include <metal_stdlib>

typedef bfloat bfloat16_t;

#if defined(EMU_LINT)
#define instantiate_kernel(name, func, ...) \
  template decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#else
#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define instantiate_kernel(name, func, ...)                    \
  static ::emu::Registrar EMU_CAT(emu_registrar_, __COUNTER__)( \
      name, ::emu::pick<emu_kernel_##func, __VA_ARGS__>());
#endif
