// The emulator's host: it does what csrc/metal/host.cpp does on a Mac, on
// emulated buffers. From a description of one step it computes the launch
// plan with the package's own code (csrc/metal/plan.cpp), gives every
// input, output, scratch region and by-value argument its own exact-size
// buffer (so AddressSanitizer reports any access past one), and runs the
// dispatches.
//
//   emu_runner JOB IN OUT    run the step; IN holds the inputs in slot
//                            order (NOTE: [slot layout]), OUT gets the
//                            outputs in slot order
//   emu_runner --plan JOB    print the plan (and its traffic) as JSON
//   emu_runner --list        print each kernel and its buffer indices
//
// JOB is text:
//   hyper HEX                AdafactorHyper, the bytes the kernels read
//   alias 0|1                outputs the plan lets take their input's
//                            buffer share it (MLX donated the input)
//   tensor PTYPE GTYPE NDIM D0 D1 ...   one line per tensor
//   inputs K S0 ... S(K-1)   sizes in bytes of the inputs
//   outputs M S0 ... S(M-1)  sizes in bytes of the outputs

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "emu.h"
#include "metal/plan.h"
#include "metal/traffic.h"
#include "schema/slots.h"

namespace af = mlx_fused_adafactor;
namespace mp = mlx_fused_adafactor::metal;

namespace {

struct Job {
  AdafactorHyper hyper;
  bool alias = false;
  std::vector<mp::TensorDesc> tensors;
  std::vector<size_t> input_sizes;
  std::vector<size_t> output_sizes;
};

Job read_job(const char* path) {
  std::ifstream in(path);
  if (!in) {
    emu::fail(std::string("cannot read job ") + path);
  }
  Job job;
  std::vector<int> ndims;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<std::pair<std::string, std::string>> types;
  std::string word;
  bool have_hyper = false;
  while (in >> word) {
    if (word == "hyper") {
      std::string hex;
      in >> hex;
      if (hex.size() != 2 * sizeof(AdafactorHyper)) {
        emu::fail("hyper: expected " + std::to_string(sizeof(AdafactorHyper)) +
                  " bytes");
      }
      auto* bytes = reinterpret_cast<unsigned char*>(&job.hyper);
      for (size_t i = 0; i < sizeof(AdafactorHyper); ++i) {
        bytes[i] = static_cast<unsigned char>(
            std::stoi(hex.substr(2 * i, 2), nullptr, 16));
      }
      have_hyper = true;
    } else if (word == "alias") {
      in >> job.alias;
    } else if (word == "tensor") {
      std::string pt, gt;
      int ndim;
      in >> pt >> gt >> ndim;
      std::vector<int64_t> shape(ndim);
      for (auto& d : shape) {
        in >> d;
      }
      ndims.push_back(ndim);
      shapes.push_back(shape);
      types.push_back({pt, gt});
    } else if (word == "inputs" || word == "outputs") {
      size_t k;
      in >> k;
      auto& sizes = word == "inputs" ? job.input_sizes : job.output_sizes;
      sizes.resize(k);
      for (auto& s : sizes) {
        in >> s;
      }
    } else {
      emu::fail("job: unexpected '" + word + "'");
    }
  }
  if (!have_hyper) {
    emu::fail("job: no hyper");
  }
  const af::SlotLayout layout(ndims, job.hyper);
  for (size_t t = 0; t < layout.size(); ++t) {
    job.tensors.push_back({shapes[t], types[t].first, types[t].second, layout[t]});
  }
  if (job.input_sizes.size() != static_cast<size_t>(layout.num_inputs()) ||
      job.output_sizes.size() != static_cast<size_t>(layout.num_outputs())) {
    emu::fail("job: input or output count does not follow the slot layout");
  }
  return job;
}

const char* source_name(mp::Source s) {
  switch (s) {
    case mp::Source::Input:
      return "input";
    case mp::Source::Output:
      return "output";
    case mp::Source::Scratch:
      return "scratch";
    case mp::Source::Bytes:
      return "bytes";
  }
  return "";
}

const char* access_name(mp::Access a) {
  switch (a) {
    case mp::Access::Read:
      return "read";
    case mp::Access::Write:
      return "write";
    case mp::Access::ReadWrite:
      return "read_write";
  }
  return "";
}

void print_plan(const Job& job) {
  const mp::Plan plan = mp::make_plan(job.hyper, job.tensors);
  const auto traffic = mp::plan_traffic(plan, job.tensors);
  std::ostringstream os;
  os << "{\"scratch_bytes\": " << plan.scratch_bytes << ", \"donations\": [";
  for (size_t i = 0; i < plan.donations.size(); ++i) {
    os << (i ? ", " : "") << "[" << plan.donations[i].first << ", "
       << plan.donations[i].second << "]";
  }
  os << "], \"dispatches\": [";
  for (size_t i = 0; i < plan.dispatches.size(); ++i) {
    const auto& d = plan.dispatches[i];
    os << (i ? ", " : "") << "{\"kernel\": \"" << d.kernel
       << "\", \"tensor\": " << d.tensor << ", \"grid\": [" << d.grid[0]
       << ", " << d.grid[1] << ", " << d.grid[2] << "], \"group\": ["
       << d.group[0] << ", " << d.group[1] << ", " << d.group[2]
       << "], \"bindings\": [";
    for (size_t j = 0; j < d.bindings.size(); ++j) {
      const auto& b = d.bindings[j];
      os << (j ? ", " : "") << "{\"index\": " << b.index << ", \"source\": \""
         << source_name(b.source) << "\", \"access\": \""
         << access_name(b.access) << "\", \"array\": " << b.array
         << ", \"offset\": " << b.offset << ", \"size\": " << b.size
         << ", \"bytes\": \"";
      for (auto byte : b.bytes) {
        char hex[3];
        std::snprintf(hex, sizeof(hex), "%02x", byte);
        os << hex;
      }
      os << "\", \"bytes_read\": " << traffic[i][j].read
         << ", \"bytes_written\": " << traffic[i][j].written << "}";
    }
    os << "]}";
  }
  os << "]}\n";
  std::cout << os.str();
}

// A buffer of its own, exactly `size` bytes (one byte for empty arrays).
struct Buffer {
  std::unique_ptr<char[]> data;
  size_t size;
  explicit Buffer(size_t n) : data(new char[n ? n : 1]), size(n) {
    // Outputs and scratch start as NaN bytes: nothing may read them unset.
    std::memset(data.get(), 0xff, n ? n : 1);
  }
};

void run(const Job& job, const char* in_path, const char* out_path) {
  const mp::Plan plan = mp::make_plan(job.hyper, job.tensors);
  std::ifstream in(in_path, std::ios::binary);
  std::vector<std::shared_ptr<Buffer>> inputs, outputs;
  for (size_t s : job.input_sizes) {
    auto b = std::make_shared<Buffer>(s);
    in.read(b->data.get(), s);
    inputs.push_back(b);
  }
  if (!in) {
    emu::fail("input data is shorter than the inputs");
  }
  std::map<int64_t, int64_t> donor;
  if (job.alias) {
    for (const auto& [o, i] : plan.donations) {
      donor[o] = i;
    }
  }
  for (size_t o = 0; o < job.output_sizes.size(); ++o) {
    auto it = donor.find(o);
    if (it != donor.end() && inputs[it->second]->size == job.output_sizes[o]) {
      outputs.push_back(inputs[it->second]);
    } else {
      outputs.push_back(std::make_shared<Buffer>(job.output_sizes[o]));
    }
  }
  // Each scratch region and by-value argument is a buffer of its own.
  std::map<std::pair<int64_t, int64_t>, std::shared_ptr<Buffer>> regions;
  std::vector<std::shared_ptr<Buffer>> bytes;
  for (const auto& d : plan.dispatches) {
    emu::Launch l;
    l.kernel = d.kernel;
    for (int k = 0; k < 3; ++k) {
      l.grid[k] = static_cast<uint32_t>(d.grid[k]);
      l.group[k] = static_cast<uint32_t>(d.group[k]);
    }
    for (const auto& b : d.bindings) {
      void* ptr = nullptr;
      switch (b.source) {
        case mp::Source::Input:
          ptr = inputs[b.array]->data.get();
          break;
        case mp::Source::Output:
          ptr = outputs[b.array]->data.get();
          break;
        case mp::Source::Scratch: {
          auto& r = regions[{b.offset, b.size}];
          if (!r) {
            r = std::make_shared<Buffer>(b.size);
          }
          ptr = r->data.get();
          break;
        }
        case mp::Source::Bytes: {
          auto buf = std::make_shared<Buffer>(b.bytes.size());
          std::memcpy(buf->data.get(), b.bytes.data(), b.bytes.size());
          bytes.push_back(buf);
          ptr = buf->data.get();
          break;
        }
      }
      l.buffers.push_back({b.index, ptr});
    }
    emu::launch(l);
  }
  std::ofstream out(out_path, std::ios::binary);
  for (const auto& b : outputs) {
    out.write(b->data.get(), b->size);
  }
}

} // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (const auto& [name, buffers] : emu::registered_kernels()) {
      std::cout << name;
      for (int b : buffers) {
        std::cout << " " << b;
      }
      std::cout << "\n";
    }
    return 0;
  }
  if (argc == 3 && std::string(argv[1]) == "--plan") {
    print_plan(read_job(argv[2]));
    return 0;
  }
  if (argc != 4) {
    emu::fail("usage: emu_runner JOB IN OUT | --plan JOB | --list");
  }
  run(read_job(argv[1]), argv[2], argv[3]);
  return 0;
}
