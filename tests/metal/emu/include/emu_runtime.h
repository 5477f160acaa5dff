// Run mode of the Metal emulation: one OS thread per GPU thread.
//
// A dispatch runs its threadgroups one after another; the threads of the
// current group run concurrently, so `threadgroup` storage (a static local
// after the source rewrite) is shared by exactly the threads of one group.
// threadgroup_barrier is a counting barrier over the group's threads and the
// simd_* functions exchange values among the 32 lanes of a simdgroup through
// a barrier of their own. Both are built on C++20 atomics (futex waits), which
// ThreadSanitizer understands: a missing barrier is a reported race.

#pragma once

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace emu {

// A counting barrier: the last of n arrivals opens the next generation.
// The arrivals' acq_rel increments and the release of the generation make
// everything before the barrier happen-before everything after it, in the
// C++ memory model that ThreadSanitizer checks.
class Barrier {
 public:
  void reset(int n) {
    n_ = n;
    arrived_.store(0);
    generation_.store(0);
  }
  void wait() {
    const uint32_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      generation_.notify_all();
    } else {
      while (generation_.load(std::memory_order_acquire) == gen) {
        generation_.wait(gen, std::memory_order_acquire);
      }
    }
  }

 private:
  int n_ = 0;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> generation_{0};
};

struct Simdgroup {
  Barrier barrier;
  int size = 0;
  uint64_t slots[32];
};

// State of the threadgroup being run, shared by its threads.
struct Group {
  std::vector<void*> buffers;
  uint3 grid; // threadgroups per grid
  uint3 size; // threads per threadgroup
  Barrier barrier;
  std::vector<Simdgroup> simdgroups;
};

// Attributes of the calling GPU thread.
struct Thread {
  Group* group;
  uint3 tgid;
  uint3 lpos;
  uint lid;
};

inline thread_local Thread* current = nullptr;

enum Attr {
  thread_position_in_grid,
  threadgroup_position_in_grid,
  thread_position_in_threadgroup,
  thread_index_in_threadgroup,
  thread_index_in_simdgroup,
  simdgroup_index_in_threadgroup,
  threads_per_threadgroup,
  threadgroups_per_grid,
};

inline uint3 attr3(Attr a) {
  const Thread& t = *current;
  const Group& g = *t.group;
  switch (a) {
    case thread_position_in_grid:
      return {t.tgid.x * g.size.x + t.lpos.x, t.tgid.y * g.size.y + t.lpos.y,
              t.tgid.z * g.size.z + t.lpos.z};
    case threadgroup_position_in_grid:
      return t.tgid;
    case thread_position_in_threadgroup:
      return t.lpos;
    case thread_index_in_threadgroup:
      return {t.lid, 0, 0};
    case thread_index_in_simdgroup:
      return {t.lid % 32, 0, 0};
    case simdgroup_index_in_threadgroup:
      return {t.lid / 32, 0, 0};
    case threads_per_threadgroup:
      return g.size;
    case threadgroups_per_grid:
      return g.grid;
  }
  return {0, 0, 0};
}

template <typename T>
inline T attr(Attr a) {
  if constexpr (sizeof(T) == sizeof(uint3)) {
    return attr3(a);
  } else if constexpr (sizeof(T) == sizeof(uint2)) {
    uint3 v = attr3(a);
    return T{v.x, v.y};
  } else {
    return T(attr3(a).x);
  }
}

// Exchange `v` among the lanes of the caller's simdgroup: returns lane
// `src(lane)`'s value, or the caller's own if that lane does not exist.
template <typename T, typename F>
inline T simd_exchange(T v, F src) {
  static_assert(sizeof(T) <= 8, "simd exchange of a wide type");
  Thread& t = *current;
  Simdgroup& s = t.group->simdgroups[t.lid / 32];
  const uint lane = t.lid % 32;
  std::memcpy(&s.slots[lane], &v, sizeof(T));
  s.barrier.wait();
  const uint from = src(lane);
  T r = v;
  if (from < uint(s.size)) {
    std::memcpy(&r, &s.slots[from], sizeof(T));
  }
  s.barrier.wait();
  return r;
}

typedef void (*KernelFn)(Group&);

struct KernelInfo {
  KernelFn fn;
  std::vector<int> buffers; // [[buffer(n)]] indices the kernel declares
};

void register_kernel(const char* name, KernelInfo info);

struct Registrar {
  Registrar(const char* name, KernelInfo info) {
    if (info.fn) {
      register_kernel(name, info);
    }
  }
};

// Instantiations kept in this build: sanitizer builds keep float32 only
// (EMU_FLOAT32_ONLY) to compile quickly.
template <typename... Ts>
constexpr bool enabled() {
#if defined(EMU_FLOAT32_ONLY)
  return (std::is_same_v<Ts, float> && ...);
#else
  return true;
#endif
}

template <template <typename...> class K, typename... Ts>
KernelInfo pick() {
  if constexpr (enabled<Ts...>()) {
    return {&K<Ts...>::launch, K<Ts...>::buffers()};
  } else {
    return {nullptr, {}};
  }
}

inline void* buffer(Group& g, int idx) {
  return g.buffers[idx];
}

} // namespace emu

namespace metal {
namespace precise {
inline float sqrt(float x) {
  return std::sqrt(x);
}
inline float rsqrt(float x) {
  return 1.0f / std::sqrt(x);
}
inline float pow(float x, float y) {
  return std::pow(x, y);
}
} // namespace precise
template <typename T>
inline T max(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
inline T min(T a, T b) {
  return a < b ? a : b;
}
} // namespace metal

inline void threadgroup_barrier(mem_flags) {
  emu::current->group->barrier.wait();
}

// Sum over the simdgroup's lanes in lane order.
inline float simd_sum(float v) {
  emu::Thread& t = *emu::current;
  emu::Simdgroup& s = t.group->simdgroups[t.lid / 32];
  std::memcpy(&s.slots[t.lid % 32], &v, sizeof(float));
  s.barrier.wait();
  float r = 0.0f;
  for (int k = 0; k < s.size; ++k) {
    float x;
    std::memcpy(&x, &s.slots[k], sizeof(float));
    r += x;
  }
  s.barrier.wait();
  return r;
}

template <typename T>
inline T simd_shuffle(T v, ushort lane) {
  return emu::simd_exchange(v, [=](uint) { return uint(lane); });
}

template <typename T>
inline T simd_shuffle_down(T v, ushort delta) {
  return emu::simd_exchange(v, [=](uint l) { return l + delta; });
}

// Reinterpret the bits of a value of the same size.
template <typename T, typename U>
inline T as_type(U v) {
  static_assert(sizeof(T) == sizeof(U), "as_type between sizes");
  T r;
  std::memcpy(&r, &v, sizeof(T));
  return r;
}
