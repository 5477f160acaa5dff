// The launch plan of the Metal kernels: plain C++, no Metal types.
//
// For one step of the fused primitive it says, per dispatch, which kernel of
// kernels/*.metal runs, on what grid, with which buffer at which index and
// how the kernel accesses it, and where the scratch lives. The Metal host
// (host.cpp) only encodes a plan, through encode_plan (encode.h); the
// emulator of tests/metal encodes the same plan with the same function on
// a CPU emulation of Metal. What a plan moves in bytes is a separate,
// reporting-only computation (traffic.h) that the host never reads.
//
// NOTE: [encoding order]
// MLX encodes on a concurrent compute encoder: dispatches run in any order
// and overlap, except that the encoder puts a memory barrier before a
// dispatch that reads a buffer an earlier dispatch registered as an output,
// or writes one an earlier dispatch read, and a barrier waits for
// everything before it. Hazards are tracked per MTL::Buffer, not per byte
// range. So the plan gives each tensor its own scratch buffer (one shared
// buffer would order every dispatch after the one before), and encodes by
// phase: the first dispatch of every tensor, then the second of every
// tensor, then the third. The tensors' dispatches of one phase share no
// buffer that any of them writes and run concurrently; each phase reads
// what the one before wrote, so MLX separates the phases by one barrier
// each: two barriers per step, where tensor by tensor it would be two per
// factored tensor. tests/metal computes MLX's barriers from the bindings
// and runs each phase in other orders and concurrently.

#pragma once

#include <array>
#include <climits>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "adafactor_args.h"
#include "adafactor_math.h"
#include "schema/slots.h"

namespace mlx_fused_adafactor::metal {

// The Metal library: <title>.metallib next to the extension, or the
// embedded source compiled at run time under this name.
constexpr const char* kLibraryName = "mlx_fused_adafactor";

// What the plan needs to know of one tensor of the step.
struct TensorDesc {
  std::vector<int64_t> shape;
  std::string param_type; // MLX dtype token: float32, float16 or bfloat16
  std::string grad_type;
  TensorSlots slots; // where its arrays are (NOTE: [slot layout])
  AF_UINT key = 0; // NOTE: [stochastic rounding]
};

// Where a bound buffer comes from.
enum class Source {
  Input, // inputs[array] of the primitive
  Output, // outputs[array]
  Scratch, // [offset, offset + size) of float32 scratch buffer `array`
  Bytes, // `bytes`, passed by value (set_bytes)
};

// How the kernel uses a buffer. The host binds what a dispatch writes as an
// output and the rest as inputs, so MLX orders the dispatches that touch it.
enum class Access { Read, Write, ReadWrite };

struct Binding {
  int index; // the kernel's [[buffer(index)]]
  Source source;
  Access access = Access::Read;
  int64_t array = 0; // Input, Output: the slot; Scratch: the buffer
  int64_t offset = 0; // Scratch: byte offset
  int64_t size = 0; // Scratch, Bytes: bytes
  std::vector<uint8_t> bytes; // Bytes

  bool writes() const {
    return access != Access::Read;
  }
};

struct Dispatch {
  std::string kernel; // host name in the library
  int tensor; // index of the tensor in the step
  std::array<int64_t, 3> grid; // threadgroups per grid
  std::array<int64_t, 3> group; // threads per threadgroup
  std::vector<Binding> bindings; // by index
};

struct Plan {
  std::vector<Dispatch> dispatches; // NOTE: [encoding order]
  std::vector<int64_t> scratch; // bytes of each scratch buffer
  int64_t scratch_bytes = 0; // their sum
  // (output, input) pairs: the output may take the input's buffer (each
  // element is read and written by the same thread).
  std::vector<std::pair<int64_t, int64_t>> donations;
};

// Most elements of a tensor: the kernels index with 32-bit ints, and a
// thread's reads run up to AF_N_READS * AF_THREADS_PER_GROUP past an index.
constexpr int64_t kMaxElements = INT32_MAX / 2;

// Geometry of a tensor (NOTE: [factored tiles]); `small` if it runs in one
// threadgroup. Throws std::invalid_argument for tensors the kernels cannot
// index (more than kMaxElements).
AdafactorTensorArgs tensor_args(const std::vector<int64_t>& shape, bool& small);

// The plan of one step.
Plan make_plan(const AdafactorHyper& h, const std::vector<TensorDesc>& tensors);

// The host name of every kernel in the library, for every dtype pair.
std::vector<std::string> kernel_names();

} // namespace mlx_fused_adafactor::metal
