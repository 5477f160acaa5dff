// The emulator's command encoder: a model of MLX's concurrent
// CommandEncoder, and Metal's limits checked on every call.
//
// Barriers, as MLX 0.32 places them (mlx/backend/metal/device.cpp,
// CommandEncoder::set_input_array, set_output_array, register_output_array,
// maybeInsertBarrier): buffers are tracked by identity, not byte range.
//   set_input_array(a)   next_inputs += a; barrier needed if a is in
//                        prev_outputs (read after write)
//   set_output_array(a)  set_input_array(a), then next_outputs += a;
//                        barrier needed if a is in prev_inputs (write after
//                        read)
//   dispatch             if a barrier is needed: barrier, then
//                        prev = next; else prev += next; next = {}
// The dispatches between two barriers may run in any order and overlap;
// host.cpp runs them reversed, shuffled or all at once.
//
// Limits, per dispatch, each error naming the kernel: buffer indices 0..30
// (Metal's buffer argument table), set_bytes at most 4 KiB, at most 1024
// threads per threadgroup, at most 32 KiB of threadgroup memory, a grid of
// at least one threadgroup and fewer than 2^32 threads in each dimension,
// and exactly the buffer indices the kernel declares bound.

#pragma once

#include <cstdint>
#include <deque>
#include <set>
#include <string>
#include <vector>

#include "emu.h"

namespace emu {

constexpr int kMaxBufferIndex = 30;
constexpr int64_t kMaxBytes = 4096;
constexpr int64_t kMaxThreadsPerGroup = 1024;
constexpr int64_t kMaxThreadgroupMemory = 32768;

// A dispatch as encoded: whether MLX put a barrier before it.
struct Command {
  bool barrier;
  Launch launch;
};

class Encoder {
 public:
  void set_kernel(const std::string& name) {
    kernel_ = name;
    declared_ = declared(name);
    launch_ = Launch{name, {}, {}, {}};
  }

  // `buffer` is the identity MLX would track (its MTL::Buffer); `data` is
  // where the kernel reads it.
  void set_input_array(const void* buffer, void* data, int index) {
    bind(index, data);
    next_inputs_.insert(buffer);
    needs_barrier_ |= prev_outputs_.count(buffer) > 0;
  }

  void set_output_array(const void* buffer, void* data, int index) {
    set_input_array(buffer, data, index);
    next_outputs_.insert(buffer);
    needs_barrier_ |= prev_inputs_.count(buffer) > 0;
  }

  void set_bytes(const void* data, int64_t size, int index) {
    if (size > kMaxBytes) {
      fail(kernel_ + ": set_bytes of " + std::to_string(size) +
           " bytes at index " + std::to_string(index) +
           " exceeds Metal's 4 KiB");
    }
    // Metal copies the bytes at encoding time; so does this (each into its
    // own allocation, so that AddressSanitizer sees reads past them).
    bytes_.emplace_back(
        static_cast<const unsigned char*>(data),
        static_cast<const unsigned char*>(data) + size);
    bind(index, bytes_.back().data());
  }

  void dispatch_threadgroups(
      const int64_t grid[3],
      const int64_t group[3]) {
    const int64_t threads = group[0] * group[1] * group[2];
    if (threads < 1 || threads > kMaxThreadsPerGroup) {
      fail(kernel_ + ": " + std::to_string(threads) +
           " threads per threadgroup; Metal allows 1 to 1024");
    }
    if (declared_.threadgroup_bytes > kMaxThreadgroupMemory) {
      fail(kernel_ + ": " + std::to_string(declared_.threadgroup_bytes) +
           " bytes of threadgroup memory; Metal allows 32 KiB");
    }
    for (int k = 0; k < 3; ++k) {
      if (grid[k] < 1 || grid[k] * group[k] >= (int64_t(1) << 32)) {
        fail(kernel_ + ": grid dimension " + std::to_string(k) + " of " +
             std::to_string(grid[k]) + " threadgroups is out of range");
      }
      launch_.grid[k] = static_cast<uint32_t>(grid[k]);
      launch_.group[k] = static_cast<uint32_t>(group[k]);
    }
    const std::set<int> want(
        declared_.buffers.begin(), declared_.buffers.end());
    if (want != bound_) {
      std::string msg = kernel_ + ": bound buffers differ from declared ones:";
      for (int d : want) {
        msg += bound_.count(d) ? "" : " missing " + std::to_string(d);
      }
      for (int d : bound_) {
        msg += want.count(d) ? "" : " extra " + std::to_string(d);
      }
      fail(msg);
    }
    // maybeInsertBarrier
    const bool barrier = needs_barrier_;
    if (needs_barrier_) {
      needs_barrier_ = false;
      prev_inputs_.swap(next_inputs_);
      prev_outputs_.swap(next_outputs_);
    } else {
      prev_inputs_.insert(next_inputs_.begin(), next_inputs_.end());
      prev_outputs_.insert(next_outputs_.begin(), next_outputs_.end());
    }
    next_inputs_.clear();
    next_outputs_.clear();
    commands_.push_back({barrier, std::move(launch_)});
    bound_.clear();
  }

  const std::vector<Command>& commands() const {
    return commands_;
  }

 private:
  void bind(int index, void* data) {
    if (index < 0 || index > kMaxBufferIndex) {
      fail(kernel_ + ": buffer index " + std::to_string(index) +
           " is outside Metal's 0..30");
    }
    if (!bound_.insert(index).second) {
      fail(kernel_ + ": buffer index " + std::to_string(index) +
           " bound twice in one dispatch");
    }
    launch_.buffers.push_back({index, data});
  }

  std::string kernel_;
  Declared declared_;
  Launch launch_;
  std::set<int> bound_;
  bool needs_barrier_ = false;
  std::set<const void*> prev_inputs_, prev_outputs_, next_inputs_,
      next_outputs_;
  std::deque<std::vector<unsigned char>> bytes_;
  std::vector<Command> commands_;
};

} // namespace emu
