// The emulator's two halves meet here: the host side (host.cpp: jobs, the
// package's launch plan and encode_plan, encoder.h: the model of MLX's
// encoder and Metal's limits) and the GPU side (gpu.cpp: kernels registered
// from the rewritten kernel source, run on OS threads). Plain C++: neither
// Metal's names nor MLX's.

#pragma once

#include <cstddef>
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

// What a kernel of the library declares.
struct Declared {
  std::vector<int> buffers; // [[buffer(n)]] indices
  size_t threadgroup_bytes; // threadgroup memory
};

// The declaration of kernel `name`; ends the process naming it when the
// library has no such kernel.
Declared declared(const std::string& name);

// Every registered kernel and the buffer indices it declares.
std::vector<std::pair<std::string, std::vector<int>>> registered_kernels();

// How the dispatches between two barriers run: in encoding order,
// reversed, shuffled (with a seed), or all at once.
enum class Order { Plan, Reverse, Shuffle, Concurrent };

// Run dispatches that no barrier separates, in `order`, each to
// completion. A dispatch that runs longer than the watchdog allows
// ($EMU_WATCHDOG_SECONDS, default 120) ends the process naming its kernel.
void run_segment(const std::vector<Launch>& launches, Order order,
                 uint64_t seed);

// Print `msg` and end the process with status 3 (from any thread).
[[noreturn]] void fail(const std::string& msg);

} // namespace emu
