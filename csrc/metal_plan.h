// The launch plan of the Metal kernels: plain C++, no Metal types.
//
// For one step of the fused primitive it says, per dispatch, which kernel of
// kernels/*.metal runs, on what grid, with which buffer at which index, and
// where the scratch lives. The Metal host (adafactor_gpu.cpp) only encodes a
// plan; the tests run the same plan on a CPU emulation of Metal
// (tests/metal), and the Python API counts its dispatches and bytes.

#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "mlx/array.h"

#include "adafactor_args.h"
#include "adafactor_math.h"

namespace mlx_fused_adafactor::metal_plan {

// The Metal library: <title>.metallib next to the extension.
constexpr const char* kMetallibName = "mlx_fused_adafactor";

// What the plan needs to know of one tensor of the step.
struct TensorDesc {
  std::vector<int64_t> shape;
  std::string param_type; // MLX dtype token: float32, float16 or bfloat16
  std::string grad_type;
  int param_itemsize;
  int grad_itemsize;
};

// Where a bound buffer comes from.
enum class Source {
  Input, // inputs[array] of the primitive (NOTE: [slot layout])
  Output, // outputs[array]
  Scratch, // [offset, offset + size) of the step's float32 scratch buffer
  Bytes, // `bytes`, passed by value (set_bytes)
};

struct Binding {
  int index; // the kernel's [[buffer(index)]]
  Source source;
  int64_t array = 0; // Input, Output
  int64_t offset = 0; // Scratch: byte offset
  int64_t size = 0; // Scratch, Bytes: bytes
  std::vector<uint8_t> bytes; // Bytes
  // Bytes one dispatch reads and writes through this binding.
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
};

struct Dispatch {
  std::string kernel; // host name in the library
  int tensor; // index of the tensor in the step
  std::array<int64_t, 3> grid; // threadgroups per grid
  std::array<int64_t, 3> group; // threads per threadgroup
  std::vector<Binding> bindings;
};

struct Plan {
  std::vector<Dispatch> dispatches; // in encoding order
  int64_t scratch_bytes = 0;
  // (output, input) pairs: the output may take the input's buffer (each
  // element is read and written by the same thread).
  std::vector<std::pair<int64_t, int64_t>> donations;
};

// Geometry of a tensor (NOTE: [factored tiles]); `small` if it runs in one
// threadgroup.
AdafactorTensorArgs tensor_args(const std::vector<int64_t>& shape, bool& small);

// The plan of one step; tensors in the order of the primitive's inputs.
// Throws std::invalid_argument for tensors the kernels cannot index.
Plan make_plan(const AdafactorHyper& h, const std::vector<TensorDesc>& tensors);

// MLX's name of a float dtype, as in the kernels' host names ("float32",
// "float16", "bfloat16"); throws for other dtypes.
std::string dtype_token(mlx::core::Dtype t);

// The tensors of the primitive's inputs (NOTE: [slot layout]).
std::vector<TensorDesc> describe_inputs(
    const std::vector<mlx::core::array>& inputs,
    bool momentum);

} // namespace mlx_fused_adafactor::metal_plan
