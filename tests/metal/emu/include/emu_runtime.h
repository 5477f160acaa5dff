// Run mode of the Metal emulation: one OS thread per GPU thread.
//
// The threads of a threadgroup run concurrently; `threadgroup` storage is
// allocated per running threadgroup (emu::shared, which the source rewrite
// puts in place of each declaration), so threadgroups of dispatches that
// run at the same time never share it. threadgroup_barrier is a counting
// barrier over the group's threads, and the simd_* functions exchange
// values among the lanes of a simdgroup through a barrier of their own.
// Both are built on C++20 atomics (futex waits), which ThreadSanitizer
// understands: a missing barrier is a reported race.
//
// Every arrival at a barrier names its call site (file and line of the
// .metal source, through __builtin_FILE/__builtin_LINE), and the end of the
// kernel is an arrival too. When all threads of a group (or lanes of a
// simdgroup) have arrived somewhere, the sites must agree: a barrier or a
// simdgroup function reached by only part of the threads is reported with
// both sites, instead of pairing unrelated calls or hanging. A thread that
// never arrives is the watchdog's (gpu.cpp).

#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace emu {

[[noreturn]] void fail(const std::string& msg);

// Where a thread waits: a barrier or simdgroup function of the kernel, or
// the end of the kernel.
struct Site {
  const char* what = nullptr; // "threadgroup_barrier", "simd_sum", ...
  const char* file = nullptr;
  int line = 0;

  bool operator==(const Site& o) const {
    return what == o.what && line == o.line &&
        (file == o.file || std::strcmp(file, o.file) == 0);
  }
  std::string str() const {
    return std::string(what) + " at " + file + ":" + std::to_string(line);
  }
};

inline constexpr const char* kKernelEnd = "the end of the kernel";

struct Group;
// The group (simdgroup `simd`, or the whole group for -1), for reports.
inline std::string where(const Group* g, int simd);

// A counting barrier over n threads that checks their sites. The last of n
// arrivals compares the sites and opens the next generation; the arrivals'
// acq_rel increments and the release of the generation make everything
// before the barrier happen-before everything after it, in the C++ memory
// model that ThreadSanitizer checks.
class Barrier {
 public:
  void reset(int n, const char* unit) {
    n_ = n;
    unit_ = unit;
    sites_.assign(n, Site{});
    arrived_.store(0);
    generation_.store(0);
  }
  // Arrive as member `k` at `site`; `g` and `simd` name the group in a
  // report.
  void wait(int k, const Site& site, const Group* g, int simd) {
    sites_[k] = site;
    const uint32_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      check(g, simd);
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
  void check(const Group* g, int simd) {
    for (int k = 1; k < n_; ++k) {
      if (!(sites_[k] == sites_[0])) {
        std::map<std::string, std::vector<int>> by_site;
        for (int j = 0; j < n_; ++j) {
          by_site[sites_[j].str()].push_back(j);
        }
        std::string msg =
            where(g, simd) + ": not every " + unit_ + " reached the same point:";
        for (const auto& [s, members] : by_site) {
          msg += "\n  " + std::to_string(members.size()) + " at " + s +
              " (" + unit_ + " " + std::to_string(members.front()) + "..." +
              std::to_string(members.back()) + ")";
        }
        fail(msg);
      }
    }
  }

  int n_ = 0;
  const char* unit_ = "thread";
  std::vector<Site> sites_;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> generation_{0};
};

struct Simdgroup {
  Barrier barrier;
  int size = 0;
  uint64_t slots[32];
};

// State of a running threadgroup, shared by its threads.
struct Group {
  std::string kernel;
  std::vector<void*> buffers;
  uint3 grid; // threadgroups per grid
  uint3 size; // threads per threadgroup
  // The threadgroup being run, as x + grid.x * (y + grid.y * z); read by
  // the watchdog.
  std::atomic<uint64_t> running{0};
  Barrier barrier;
  Barrier next; // between threadgroups: storage reset
  std::vector<Simdgroup> simdgroups;
  // Threadgroup storage by declaration, made by its first user; dropped
  // between threadgroups.
  std::mutex shared_mutex;
  std::map<int, std::unique_ptr<unsigned char[]>> shared;

  std::string position() const {
    uint64_t r = running.load(std::memory_order_relaxed);
    const uint64_t x = r % grid.x;
    r /= grid.x;
    return "(" + std::to_string(x) + ", " + std::to_string(r % grid.y) +
        ", " + std::to_string(r / grid.y) + ")";
  }
};

inline std::string where(const Group* g, int simd) {
  std::string s = g->kernel + " threadgroup " + g->position();
  if (simd >= 0) {
    s += " simdgroup " + std::to_string(simd);
  }
  return s;
}

// Attributes of the calling GPU thread.
struct Thread {
  Group* group;
  uint3 tgid;
  uint3 lpos;
  uint lid;
};

inline thread_local Thread* current = nullptr;

// The threadgroup storage of declaration `id` (a `threadgroup T x[N];` of
// the kernel source), shared by the threads of the running group. It
// starts as NaN bytes, as unset memory should read.
template <typename T>
T& shared(int id) {
  Group& g = *current->group;
  std::lock_guard<std::mutex> lock(g.shared_mutex);
  auto& slot = g.shared[id];
  if (!slot) {
    slot.reset(new unsigned char[sizeof(T)]);
    std::memset(slot.get(), 0xff, sizeof(T));
  }
  return *reinterpret_cast<T*>(slot.get());
}

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

inline Simdgroup& my_simdgroup() {
  Thread& t = *current;
  return t.group->simdgroups[t.lid / 32];
}


// Exchange `v` among the lanes of the caller's simdgroup: returns lane
// `src(lane)`'s value, or the caller's own if that lane does not exist.
template <typename T, typename F>
inline T simd_exchange(T v, F src, const Site& site) {
  static_assert(sizeof(T) <= 8, "simd exchange of a wide type");
  Simdgroup& s = my_simdgroup();
  const uint lane = current->lid % 32;
  std::memcpy(&s.slots[lane], &v, sizeof(T));
  s.barrier.wait(lane, site, current->group, int(current->lid / 32));
  const uint from = src(lane);
  T r = v;
  if (from < uint(s.size)) {
    std::memcpy(&r, &s.slots[from], sizeof(T));
  }
  s.barrier.wait(lane, site, current->group, int(current->lid / 32));
  return r;
}

// The end of the kernel for the calling thread: an arrival at its
// simdgroup's barrier, then at the group's (a thread that returns early
// meets the others' barriers here, and is reported).
inline void kernel_end() {
  Thread& t = *current;
  const Site end{kKernelEnd, "", 0};
  my_simdgroup().barrier.wait(t.lid % 32, end, t.group, int(t.lid / 32));
  t.group->barrier.wait(t.lid, end, t.group, -1);
}

typedef void (*KernelFn)(Group&);

struct KernelInfo {
  KernelFn fn;
  std::vector<int> buffers; // [[buffer(n)]] indices the kernel declares
  size_t threadgroup_bytes; // its threadgroup declarations, in bytes
};

void register_kernel(const char* name, KernelInfo info);

struct Registrar {
  Registrar(const char* name, KernelInfo info) {
    if (info.fn) {
      register_kernel(name, info);
    }
  }
};

// Instantiations kept in this object file: sanitizer builds keep float32
// only (EMU_FLOAT32_ONLY) to compile quickly, and each of the EMU_SHARDS
// object files compiled from the one source keeps every EMU_SHARDS-th
// instantiation, so that the compilers share the work.
#if !defined(EMU_SHARDS)
#define EMU_SHARDS 1
#define EMU_SHARD 0
#endif

template <int Ordinal, typename... Ts>
constexpr bool enabled() {
  if constexpr (Ordinal % EMU_SHARDS != EMU_SHARD) {
    return false;
  }
#if defined(EMU_FLOAT32_ONLY)
  return (std::is_same_v<Ts, float> && ...);
#else
  return true;
#endif
}

template <int Ordinal, template <typename...> class K, typename... Ts>
KernelInfo pick() {
  if constexpr (enabled<Ordinal, Ts...>()) {
    return {&K<Ts...>::launch, K<Ts...>::buffers(),
            K<Ts...>::threadgroup_bytes()};
  } else {
    return {nullptr, {}, 0};
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

// Metal's reinterpreting cast.
template <typename To, typename From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type between sizes");
  To r;
  std::memcpy(&r, &x, sizeof(To));
  return r;
}

inline void threadgroup_barrier(
    mem_flags,
    const char* file = __builtin_FILE(),
    int line = __builtin_LINE()) {
  // Every lane of each simdgroup must be at the barrier too.
  emu::Thread& t = *emu::current;
  const emu::Site site{"threadgroup_barrier", file, line};
  emu::my_simdgroup().barrier.wait(t.lid % 32, site, t.group, int(t.lid / 32));
  t.group->barrier.wait(t.lid, site, t.group, -1);
}

// Sum over the simdgroup's lanes in lane order.
inline float simd_sum(
    float v,
    const char* file = __builtin_FILE(),
    int line = __builtin_LINE()) {
  emu::Simdgroup& s = emu::my_simdgroup();
  const uint lane = emu::current->lid % 32;
  const emu::Site site{"simd_sum", file, line};
  const int simd = int(emu::current->lid / 32);
  std::memcpy(&s.slots[lane], &v, sizeof(float));
  s.barrier.wait(lane, site, emu::current->group, simd);
  float r = 0.0f;
  for (int k = 0; k < s.size; ++k) {
    float x;
    std::memcpy(&x, &s.slots[k], sizeof(float));
    r += x;
  }
  s.barrier.wait(lane, site, emu::current->group, simd);
  return r;
}

template <typename T>
inline T simd_shuffle(
    T v,
    ushort lane,
    const char* file = __builtin_FILE(),
    int line = __builtin_LINE()) {
  return emu::simd_exchange(
      v, [=](uint) { return uint(lane); }, {"simd_shuffle", file, line});
}

template <typename T>
inline T simd_shuffle_down(
    T v,
    ushort delta,
    const char* file = __builtin_FILE(),
    int line = __builtin_LINE()) {
  return emu::simd_exchange(
      v, [=](uint l) { return l + delta; }, {"simd_shuffle_down", file, line});
}
