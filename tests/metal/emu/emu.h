// The emulator's two halves meet here: the host side (host.cpp: jobs, the
// launch plan of csrc/metal, buffers) and the GPU side (gpu.cpp: kernels
// registered from the rewritten .metal sources, run on OS threads). Plain
// C++: neither Metal's names nor MLX's.

#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace emu {

// One dispatch: a kernel, its grid and threadgroup size, and the buffer
// bound at each index.
struct Launch {
  std::string kernel;
  uint32_t grid[3];
  uint32_t group[3];
  std::vector<std::pair<int, void*>> buffers;
};

// Run one dispatch to completion. A kernel that is not registered, or whose
// declared buffers differ from the bound ones, ends the process with a
// message naming it.
void launch(const Launch& l);

// Every registered kernel and the buffer indices it declares.
std::vector<std::pair<std::string, std::vector<int>>> registered_kernels();

[[noreturn]] void fail(const std::string& msg);

} // namespace emu
