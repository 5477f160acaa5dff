// Python bindings of the Metal launch plan (kernels/*.metal): the dispatches
// of one GPU step and the bytes they move, computed on any platform.

#include <set>
#include <unordered_set>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/array.h"
#include "mlx/primitives.h"

#include "metal_plan.h"

namespace nb = nanobind;
namespace mp = mlx_fused_adafactor::metal_plan;
namespace mx = mlx::core;

namespace {

// Primitives that make a view of their input: no data moves.
bool is_view(const std::string& name) {
  static const std::set<std::string> views = {
      "AsStrided", "Broadcast", "BroadcastAxes", "Depends", "ExpandDims",
      "Flatten", "Reshape", "Squeeze", "StopGradient", "Transpose",
      "Unflatten"};
  return views.count(name) > 0;
}

// Bytes an array's data occupies: a view's are its source's.
int64_t data_bytes(const mx::array& a) {
  if (a.has_primitive() && is_view(a.primitive().name())) {
    return data_bytes(a.inputs()[0]);
  }
  return a.nbytes();
}

// The nodes of the graph of `outputs`, stopping at `stop` (a function's
// inputs): one (primitive, bytes read, bytes written) per primitive.
nb::list graph_nodes(
    const std::vector<mx::array>& outputs,
    const std::vector<mx::array>& stop) {
  std::unordered_set<uintptr_t> seen;
  for (const auto& a : stop) {
    seen.insert(a.id());
  }
  std::unordered_set<uintptr_t> prims;
  nb::list nodes;
  std::vector<mx::array> todo(outputs.begin(), outputs.end());
  while (!todo.empty()) {
    mx::array a = todo.back();
    todo.pop_back();
    if (!seen.insert(a.id()).second || !a.has_primitive()) {
      continue;
    }
    if (prims.insert(a.primitive_id()).second) {
      const std::string name = a.primitive().name();
      int64_t read = 0, written = 0;
      if (!is_view(name)) {
        for (const auto& in : a.inputs()) {
          read += data_bytes(in);
        }
        for (const auto& out : a.outputs()) {
          written += out.nbytes();
        }
      }
      nodes.append(nb::make_tuple(name, read, written));
    }
    for (const auto& in : a.inputs()) {
      todo.push_back(in);
    }
  }
  return nodes;
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

nb::dict plan_to_dict(const mp::Plan& plan) {
  nb::list dispatches;
  for (const auto& d : plan.dispatches) {
    nb::list bindings;
    for (const auto& b : d.bindings) {
      nb::dict bd;
      bd["index"] = b.index;
      bd["source"] = source_name(b.source);
      bd["array"] = b.array;
      bd["offset"] = b.offset;
      bd["size"] = b.size;
      bd["bytes"] = nb::bytes(
          reinterpret_cast<const char*>(b.bytes.data()), b.bytes.size());
      bd["bytes_read"] = b.bytes_read;
      bd["bytes_written"] = b.bytes_written;
      bindings.append(bd);
    }
    nb::dict dd;
    dd["kernel"] = d.kernel;
    dd["tensor"] = d.tensor;
    dd["grid"] = nb::make_tuple(d.grid[0], d.grid[1], d.grid[2]);
    dd["group"] = nb::make_tuple(d.group[0], d.group[1], d.group[2]);
    dd["bindings"] = bindings;
    dispatches.append(dd);
  }
  nb::list donations;
  for (const auto& [o, i] : plan.donations) {
    donations.append(nb::make_tuple(o, i));
  }
  nb::dict out;
  out["dispatches"] = dispatches;
  out["scratch_bytes"] = plan.scratch_bytes;
  out["donations"] = donations;
  return out;
}

} // namespace

void bind_metal_plan(nb::module_& m) {
  m.attr("METALLIB_NAME") = mp::kMetallibName;
  m.attr("THREADS_PER_GROUP") = AF_THREADS_PER_GROUP;
  m.attr("SMALL_LIMIT") = AF_SMALL_LIMIT;
  m.def(
      "metal_plan",
      [](const std::vector<std::vector<int64_t>>& shapes,
         const std::vector<std::string>& param_types,
         const std::vector<std::string>& grad_types,
         const std::vector<int>& param_itemsizes,
         const std::vector<int>& grad_itemsizes,
         float eps1,
         float eps2,
         float clip_threshold,
         float decay_rate,
         float beta1,
         float one_minus_beta1,
         float weight_decay,
         int flags) {
        const size_t k = shapes.size();
        if (param_types.size() != k || grad_types.size() != k ||
            param_itemsizes.size() != k || grad_itemsizes.size() != k) {
          throw std::invalid_argument(
              "[adafactor] metal_plan: one dtype and itemsize per shape.");
        }
        std::vector<mp::TensorDesc> tensors;
        for (size_t i = 0; i < k; ++i) {
          tensors.push_back({shapes[i], param_types[i], grad_types[i],
                             param_itemsizes[i], grad_itemsizes[i]});
        }
        AdafactorHyper h{eps1, eps2, clip_threshold, decay_rate, beta1,
                         one_minus_beta1, weight_decay, flags};
        return plan_to_dict(mp::make_plan(h, tensors));
      },
      nb::arg("shapes"), nb::arg("param_types"), nb::arg("grad_types"),
      nb::arg("param_itemsizes"), nb::arg("grad_itemsizes"), nb::arg("eps1"),
      nb::arg("eps2"), nb::arg("clip_threshold"), nb::arg("decay_rate"),
      nb::arg("beta1"), nb::arg("one_minus_beta1"), nb::arg("weight_decay"),
      nb::arg("flags"),
      "The Metal launch plan of one step (dispatches, bindings, scratch).");
  m.def(
      "metal_plan_for_inputs",
      [](const std::vector<mx::array>& inputs,
         float eps1,
         float eps2,
         float clip_threshold,
         float decay_rate,
         float beta1,
         float one_minus_beta1,
         float weight_decay,
         int flags) {
        AdafactorHyper h{eps1, eps2, clip_threshold, decay_rate, beta1,
                         one_minus_beta1, weight_decay, flags};
        return plan_to_dict(mp::make_plan(
            h, mp::describe_inputs(inputs, flags & AF_MOMENTUM)));
      },
      nb::arg("inputs"), nb::arg("eps1"), nb::arg("eps2"),
      nb::arg("clip_threshold"), nb::arg("decay_rate"), nb::arg("beta1"),
      nb::arg("one_minus_beta1"), nb::arg("weight_decay"), nb::arg("flags"),
      "The plan eval_gpu encodes for the primitive's `inputs` "
      "(NOTE: [slot layout]).");
  m.def(
      "graph_nodes",
      &graph_nodes,
      nb::arg("outputs"),
      nb::arg("stop") = std::vector<mx::array>{},
      "(primitive, bytes read, bytes written) of each node of the graph of "
      "`outputs` down to `stop`; views move no bytes.");
}
