// Declarations of the metal-cpp names that MLX's Metal host headers
// (mlx/backend/metal/device.h) mention, so that csrc/metal/host.cpp can
// be type-checked with _METAL_ on Linux against MLX's real host API
// (tests/metal/test_metal_host.py). Nothing here is ever linked or run.

#pragma once

#include <cstddef>
#include <cstdint>

namespace NS {
using UInteger = unsigned long;
enum StringEncoding { UTF8StringEncoding = 4 };
constexpr StringEncoding UTF8StringEncoding_ = UTF8StringEncoding;
class String;
class Error;
class AutoreleasePool;
template <typename T>
class SharedPtr {
 public:
  SharedPtr() = default;
  T* get() const;
  T* operator->() const;
  explicit operator bool() const;
};
template <typename T>
SharedPtr<T> TransferPtr(T*);
template <typename T>
SharedPtr<T> RetainPtr(T*);
} // namespace NS

namespace MTL {
struct Size {
  Size(NS::UInteger w, NS::UInteger h, NS::UInteger d);
  NS::UInteger width, height, depth;
};
class Allocation;
class Resource;
class Buffer;
class CommandBuffer;
class CommandQueue;
class Device;
class Fence;
class Function;
class Library;
class LinkedFunctions;
class ResidencySet;
class ResidencySets;
enum DataType : NS::UInteger {};
class ComputePipelineState {
 public:
  NS::UInteger maxTotalThreadsPerThreadgroup() const;
};
class ComputeCommandEncoder {
 public:
  void setComputePipelineState(const ComputePipelineState*);
  void setBytes(const void*, NS::UInteger, NS::UInteger);
  void setThreadgroupMemoryLength(NS::UInteger, NS::UInteger);
};
} // namespace MTL
