// The emulator's host: runs a job of Metal dispatches on the CPU.
//
//   emu_runner JOB IN OUT
// JOB is text:
//   buffers N            then N lines, each the size in bytes of a buffer
//   dispatch NAME GX GY GZ TX TY TZ K  then K pairs "INDEX BUFFER"
// IN holds the initial contents of the buffers, one after another; OUT gets
// their final contents. Each buffer is its own exact-size allocation, so
// AddressSanitizer reports any access past its end.

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <metal_stdlib>

// The runner's own code uses the standard library's names.
#undef device
#undef constant
#undef threadgroup
#undef thread

namespace emu {

std::map<std::string, KernelInfo>& registry() {
  static std::map<std::string, KernelInfo> r;
  return r;
}

void register_kernel(const char* name, KernelInfo info) {
  registry()[name] = info;
}

namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::cerr << "emu_runner: " << msg << std::endl;
  std::exit(3);
}

void run_dispatch(
    const std::string& name,
    const KernelInfo& k,
    uint3 grid,
    uint3 size,
    std::vector<void*> buffers) {
  Group g;
  g.buffers = std::move(buffers);
  g.grid = grid;
  g.size = size;
  const int n = int(size.x * size.y * size.z);
  if (n <= 0 || n > 1024) {
    fail(name + ": bad threadgroup size");
  }
  g.barrier.reset(n);
  g.simdgroups = std::vector<Simdgroup>((n + 31) / 32);
  for (int s = 0; s < int(g.simdgroups.size()); ++s) {
    g.simdgroups[s].size = std::min(32, n - 32 * s);
    g.simdgroups[s].barrier.reset(g.simdgroups[s].size);
  }
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int lid = 0; lid < n; ++lid) {
    threads.emplace_back([&, lid] {
      Thread t;
      t.group = &g;
      t.lid = uint(lid);
      t.lpos = {uint(lid) % size.x, (uint(lid) / size.x) % size.y,
                uint(lid) / (size.x * size.y)};
      current = &t;
      for (uint z = 0; z < grid.z; ++z) {
        for (uint y = 0; y < grid.y; ++y) {
          for (uint x = 0; x < grid.x; ++x) {
            t.tgid = {x, y, z};
            k.fn(g);
            // The next group reuses threadgroup storage.
            g.barrier.wait();
          }
        }
      }
      current = nullptr;
    });
  }
  for (auto& th : threads) {
    th.join();
  }
}

} // namespace
} // namespace emu

int main(int argc, char** argv) {
  using namespace emu;
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (auto& [name, k] : registry()) {
      std::cout << name;
      for (int b : k.buffers) {
        std::cout << " " << b;
      }
      std::cout << "\n";
    }
    return 0;
  }
  if (argc != 4) {
    fail("usage: emu_runner JOB IN OUT | --list");
  }
  std::ifstream job(argv[1]);
  std::ifstream in(argv[2], std::ios::binary);
  std::string word;
  size_t nbuf = 0;
  job >> word >> nbuf;
  if (word != "buffers") {
    fail("job must start with 'buffers'");
  }
  std::vector<size_t> sizes(nbuf);
  std::vector<char*> bufs(nbuf);
  for (size_t i = 0; i < nbuf; ++i) {
    job >> sizes[i];
    bufs[i] = static_cast<char*>(std::malloc(sizes[i] ? sizes[i] : 1));
    in.read(bufs[i], sizes[i]);
  }
  if (!in) {
    fail("input data is shorter than the buffers");
  }
  while (job >> word) {
    if (word != "dispatch") {
      fail("expected 'dispatch', got '" + word + "'");
    }
    std::string name;
    uint3 grid, size;
    int nbind;
    job >> name >> grid.x >> grid.y >> grid.z >> size.x >> size.y >> size.z >>
        nbind;
    auto it = registry().find(name);
    if (it == registry().end()) {
      fail("no kernel named " + name);
    }
    std::vector<void*> bound(64, nullptr);
    std::set<int> indices;
    for (int b = 0; b < nbind; ++b) {
      int idx;
      size_t buf;
      job >> idx >> buf;
      if (idx < 0 || idx >= 64 || buf >= nbuf || !indices.insert(idx).second) {
        fail(name + ": bad binding");
      }
      bound[idx] = bufs[buf];
    }
    // The plan binds exactly the buffers the kernel declares.
    std::set<int> declared(it->second.buffers.begin(), it->second.buffers.end());
    if (declared != indices) {
      std::string msg = name + ": bound buffers differ from declared ones:";
      for (int d : declared) {
        msg += indices.count(d) ? "" : " missing " + std::to_string(d);
      }
      for (int d : indices) {
        msg += declared.count(d) ? "" : " extra " + std::to_string(d);
      }
      fail(msg);
    }
    run_dispatch(name, it->second, grid, size, bound);
  }
  std::ofstream out(argv[3], std::ios::binary);
  for (size_t i = 0; i < nbuf; ++i) {
    out.write(bufs[i], sizes[i]);
    std::free(bufs[i]);
  }
  return 0;
}
