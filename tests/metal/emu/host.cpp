// The emulator's host: it does what csrc/metal/host.cpp does on a Mac, on
// emulated buffers. From a description of one step it computes the launch
// plan with the package's own code (csrc/metal/plan.cpp), encodes it with
// the package's own encode_plan (csrc/metal/encode.h) on the model of MLX's
// concurrent encoder (encoder.h), and runs the dispatches between two of
// the barriers that MLX would insert in the order the job asks for. Every
// input, output, scratch region and by-value argument is its own
// exact-size allocation, so that AddressSanitizer reports any access past
// one; outputs and scratch start as NaN bytes.
//
//   emu_runner JOB IN OUT    run the step; IN holds the inputs in slot
//                            order (NOTE: [slot layout]), OUT gets the
//                            outputs in slot order
//   emu_runner --plan JOB    print the plan, its traffic and MLX's barriers
//                            as JSON
//   emu_runner --list        print each kernel and its buffer indices
//
// JOB is text:
//   hyper HEX                AdafactorHyper, the bytes the kernels read
//   alias 0|1                outputs the plan lets take their input's
//                            buffer share it (MLX donated the input)
//   order plan|reverse|concurrent|shuffle SEED
//                            how the dispatches between two barriers run
//   tensor PTYPE GTYPE NDIM D0 D1 ... PATH   one line per tensor; PATH is
//                            the parameter's path in hex (its stochastic
//                            rounding depends on it), or - for none
//   inputs K S0 ... S(K-1)   sizes in bytes of the inputs
//   outputs M S0 ... S(M-1)  sizes in bytes of the outputs
//   fault ...                a planted fault of the plan, applied before
//                            encoding (tests only):
//     unregister KERNEL INDEX  dispatches of kernels whose name contains
//                              KERNEL bind buffer INDEX as read-only
//     group N                  N threads per threadgroup
//     bytes INDEX N            the by-value argument at INDEX takes N bytes
//     index FROM TO            the binding at FROM moves to TO

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
#include "encoder.h"
#include "metal/encode.h"
#include "metal/plan.h"
#include "metal/traffic.h"
#include "schema/hyper.h"
#include "schema/slots.h"

namespace af = mlx_fused_adafactor;
namespace mp = mlx_fused_adafactor::metal;

namespace {

struct Fault {
  std::string kind;
  std::string kernel;
  int64_t a = 0;
  int64_t b = 0;
};

struct Job {
  AdafactorHyper hyper;
  bool alias = false;
  emu::Order order = emu::Order::Plan;
  uint64_t seed = 0;
  std::vector<mp::TensorDesc> tensors;
  std::vector<size_t> input_sizes;
  std::vector<size_t> output_sizes;
  std::vector<Fault> faults;
};

size_t dtype_size(const std::string& token) {
  if (token == "float32") {
    return 4;
  }
  if (token == "float16" || token == "bfloat16") {
    return 2;
  }
  emu::fail("job: unknown dtype " + token);
}

size_t numel(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (auto d : shape) {
    n *= static_cast<size_t>(d);
  }
  return n;
}

// The sizes of the step's inputs and outputs in slot order, from the
// tensors (NOTE: [slot layout]).
void slot_sizes(
    const Job& job,
    std::vector<size_t>& inputs,
    std::vector<size_t>& outputs) {
  inputs = {4, 4};
  outputs.clear();
  for (const auto& t : job.tensors) {
    const auto& shape = t.shape;
    const size_t n = numel(shape);
    const size_t p = dtype_size(t.param_type);
    inputs.push_back(n * p);
    inputs.push_back(n * dtype_size(t.grad_type));
    outputs.push_back(n * p);
    for (af::Entry e : t.slots.entries) {
      size_t bytes = 0;
      switch (e) {
        case af::Entry::Row:
          bytes = 4 * numel({shape.begin(), shape.end() - 1});
          break;
        case af::Entry::Col: {
          std::vector<int64_t> s(shape.begin(), shape.end());
          s.erase(s.end() - 2);
          bytes = 4 * numel(s);
          break;
        }
        case af::Entry::Sq:
          bytes = 4 * n;
          break;
        case af::Entry::ExpAvg:
          bytes = p * n;
          break;
      }
      inputs.push_back(bytes);
      outputs.push_back(bytes);
    }
  }
}

Job read_job(const char* path, bool sizes_required) {
  std::ifstream in(path);
  if (!in) {
    emu::fail(std::string("cannot read job ") + path);
  }
  Job job;
  std::vector<int> ndims;
  std::vector<std::string> paths;
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
    } else if (word == "order") {
      std::string o;
      in >> o;
      if (o == "plan") {
        job.order = emu::Order::Plan;
      } else if (o == "reverse") {
        job.order = emu::Order::Reverse;
      } else if (o == "concurrent") {
        job.order = emu::Order::Concurrent;
      } else if (o == "shuffle") {
        job.order = emu::Order::Shuffle;
        in >> job.seed;
      } else {
        emu::fail("job: unknown order '" + o + "'");
      }
    } else if (word == "tensor") {
      std::string pt, gt;
      int ndim;
      in >> pt >> gt >> ndim;
      std::vector<int64_t> shape(ndim);
      for (auto& d : shape) {
        in >> d;
      }
      std::string hex, path;
      in >> hex;
      for (size_t i = 0; hex != "-" && i + 1 < hex.size(); i += 2) {
        path += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
      }
      paths.push_back(path);
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
    } else if (word == "fault") {
      Fault f;
      in >> f.kind;
      if (f.kind == "unregister") {
        in >> f.kernel >> f.a;
      } else if (f.kind == "group") {
        in >> f.a;
      } else if (f.kind == "bytes" || f.kind == "index") {
        in >> f.a >> f.b;
      } else {
        emu::fail("job: unknown fault '" + f.kind + "'");
      }
      job.faults.push_back(f);
    } else {
      emu::fail("job: unexpected '" + word + "'");
    }
  }
  if (!have_hyper) {
    emu::fail("job: no hyper");
  }
  const af::SlotLayout layout(ndims, job.hyper);
  for (size_t t = 0; t < layout.size(); ++t) {
    // NOTE: [stochastic rounding]: the key as the op makes it.
    const AF_UINT key = af::has_flag(job.hyper, AF_STOCHASTIC_ROUNDING)
        ? af::tensor_key(job.hyper, paths[t])
        : 0;
    job.tensors.push_back(
        {shapes[t], types[t].first, types[t].second, layout[t], key});
  }
  std::vector<size_t> ins, outs;
  slot_sizes(job, ins, outs);
  if (sizes_required && (job.input_sizes != ins || job.output_sizes != outs)) {
    emu::fail("job: input or output sizes do not follow the slot layout");
  }
  job.input_sizes = ins;
  job.output_sizes = outs;
  return job;
}

// The job's planted faults, applied to the plan.
void plant(const Job& job, mp::Plan& plan) {
  for (const Fault& f : job.faults) {
    for (auto& d : plan.dispatches) {
      if (f.kind == "group") {
        d.group[0] = f.a;
      }
      for (auto& b : d.bindings) {
        if (f.kind == "unregister" &&
            d.kernel.find(f.kernel) != std::string::npos && b.index == f.a) {
          b.access = mp::Access::Read;
        } else if (f.kind == "bytes" && b.source == mp::Source::Bytes &&
                   b.index == f.a) {
          b.bytes.resize(f.b);
          b.size = f.b;
        } else if (f.kind == "index" && b.index == f.a) {
          b.index = static_cast<int>(f.b);
        }
      }
    }
  }
}

// An allocation of exactly `size` bytes (one for empty arrays), NaN bytes
// until written: nothing may read it unset.
struct Memory {
  std::unique_ptr<char[]> data;
  size_t size;
  explicit Memory(size_t n) : data(new char[n ? n : 1]), size(n) {
    std::memset(data.get(), 0xff, n ? n : 1);
  }
};

// An array as MLX's encoder sees it: the buffer it tracks, and the memory
// the kernels read. A scratch buffer's regions are separate allocations
// (NOTE: [encoding order]: MLX tracks the one buffer).
struct EmuArray {
  size_t size = 0;
  std::shared_ptr<Memory> memory; // inputs and outputs
  std::map<int64_t, std::shared_ptr<Memory>> regions; // scratch, by offset
  std::shared_ptr<int> identity = std::make_shared<int>(0);

  const void* buffer() const {
    return memory ? static_cast<const void*>(memory.get()) : identity.get();
  }
  void* at(int64_t offset) const {
    if (!regions.empty()) {
      auto it = regions.find(offset);
      if (it == regions.end()) {
        emu::fail("scratch bound at an offset the plan has no region for");
      }
      return it->second->data.get();
    }
    return memory ? memory->data.get() + offset : nullptr;
  }
};

// encode_plan's target (csrc/metal/encode.h): the emulated encoder and
// arrays, as MlxTarget in csrc/metal/host.cpp is MLX's.
struct EmuTarget {
  emu::Encoder& enc;
  std::vector<EmuArray>& inputs;
  std::vector<EmuArray>& outputs;
  std::vector<EmuArray>& scratch;
  bool allocate;
  std::unique_ptr<EmuArray> spare;

  void set_kernel(const mp::Dispatch& d) {
    enc.set_kernel(d.kernel);
  }
  EmuArray& buffer(const mp::Binding& b) {
    switch (b.source) {
      case mp::Source::Input:
        return inputs[b.array];
      case mp::Source::Output:
        return outputs[b.array];
      default:
        return scratch[b.array];
    }
  }
  bool empty(const EmuArray& a) const {
    return a.size == 0;
  }
  EmuArray& placeholder() {
    if (!spare) {
      spare = std::make_unique<EmuArray>();
      spare->size = 256;
      if (allocate) {
        spare->memory = std::make_shared<Memory>(256);
      }
    }
    return *spare;
  }
  void set_input_array(const EmuArray& a, int index, int64_t offset) {
    enc.set_input_array(a.buffer(), a.at(offset), index);
  }
  void set_output_array(EmuArray& a, int index, int64_t offset) {
    enc.set_output_array(a.buffer(), a.at(offset), index);
  }
  void set_bytes(const void* data, int64_t size, int index) {
    enc.set_bytes(data, size, index);
  }
  void dispatch_threadgroups(const mp::Dispatch& d) {
    enc.dispatch_threadgroups(d.grid.data(), d.group.data());
  }
};

// The arrays of a step; without `allocate` only their identities and sizes
// (for --plan).
struct Step {
  std::vector<EmuArray> inputs, outputs, scratch;

  Step(const Job& job, const mp::Plan& plan, bool allocate) {
    for (size_t s : job.input_sizes) {
      EmuArray a;
      a.size = s;
      if (allocate) {
        a.memory = std::make_shared<Memory>(s);
      }
      inputs.push_back(a);
    }
    std::map<int64_t, int64_t> donor;
    if (job.alias) {
      for (const auto& [o, i] : plan.donations) {
        donor[o] = i;
      }
    }
    for (size_t o = 0; o < job.output_sizes.size(); ++o) {
      auto it = donor.find(o);
      if (it != donor.end() && inputs[it->second].size == job.output_sizes[o]) {
        outputs.push_back(inputs[it->second]);
      } else {
        EmuArray a;
        a.size = job.output_sizes[o];
        if (allocate) {
          a.memory = std::make_shared<Memory>(a.size);
        }
        outputs.push_back(a);
      }
    }
    scratch.resize(plan.scratch.size());
    for (size_t k = 0; k < plan.scratch.size(); ++k) {
      scratch[k].size = plan.scratch[k];
    }
    if (allocate) {
      for (const auto& d : plan.dispatches) {
        for (const auto& b : d.bindings) {
          if (b.source == mp::Source::Scratch) {
            auto& r = scratch[b.array].regions[b.offset];
            if (!r) {
              r = std::make_shared<Memory>(b.size);
            }
          }
        }
      }
    }
  }
};

// Encode `plan` on `enc` (which keeps the by-value arguments the
// commands point at).
void encode(
    const mp::Plan& plan,
    Step& step,
    bool allocate,
    emu::Encoder& enc) {
  EmuTarget target{enc, step.inputs, step.outputs, step.scratch, allocate, {}};
  mp::encode_plan(plan, target);
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

mp::Plan plan_of(const Job& job) {
  mp::Plan plan = mp::make_plan(job.hyper, job.tensors);
  plant(job, plan);
  return plan;
}

void print_plan(const Job& job) {
  const mp::Plan plan = plan_of(job);
  const auto traffic = mp::plan_traffic(plan, job.tensors);
  Step step(job, plan, false);
  emu::Encoder enc;
  encode(plan, step, false, enc);
  const auto& commands = enc.commands();
  std::ostringstream os;
  os << "{\"scratch_bytes\": " << plan.scratch_bytes << ", \"scratch\": [";
  for (size_t i = 0; i < plan.scratch.size(); ++i) {
    os << (i ? ", " : "") << plan.scratch[i];
  }
  os << "], \"donations\": [";
  for (size_t i = 0; i < plan.donations.size(); ++i) {
    os << (i ? ", " : "") << "[" << plan.donations[i].first << ", "
       << plan.donations[i].second << "]";
  }
  os << "], \"dispatches\": [";
  for (size_t i = 0; i < plan.dispatches.size(); ++i) {
    const auto& d = plan.dispatches[i];
    os << (i ? ", " : "") << "{\"kernel\": \"" << d.kernel
       << "\", \"tensor\": " << d.tensor << ", \"barrier\": "
       << (commands[i].barrier ? "true" : "false") << ", \"grid\": ["
       << d.grid[0] << ", " << d.grid[1] << ", " << d.grid[2]
       << "], \"group\": [" << d.group[0] << ", " << d.group[1] << ", "
       << d.group[2] << "], \"bindings\": [";
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

void run(const Job& job, const char* in_path, const char* out_path) {
  const mp::Plan plan = plan_of(job);
  Step step(job, plan, true);
  std::ifstream in(in_path, std::ios::binary);
  for (auto& a : step.inputs) {
    in.read(a.memory->data.get(), a.size);
  }
  if (!in) {
    emu::fail("input data is shorter than the inputs");
  }
  emu::Encoder enc;
  encode(plan, step, true, enc);
  const auto& commands = enc.commands();
  // The dispatches between two of MLX's barriers, in the job's order.
  std::vector<emu::Launch> segment;
  for (const auto& c : commands) {
    if (c.barrier && !segment.empty()) {
      emu::run_segment(segment, job.order, job.seed);
      segment.clear();
    }
    segment.push_back(c.launch);
  }
  emu::run_segment(segment, job.order, job.seed);
  std::ofstream out(out_path, std::ios::binary);
  for (const auto& a : step.outputs) {
    out.write(a.memory->data.get(), a.size);
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
    print_plan(read_job(argv[2], false));
    return 0;
  }
  if (argc != 4) {
    emu::fail("usage: emu_runner JOB IN OUT | --plan JOB | --list");
  }
  run(read_job(argv[1], true), argv[2], argv[3]);
  return 0;
}
