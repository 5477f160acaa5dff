// The step as the Python optimizer calls it: state dicts in, state dicts
// out.
//
// NOTE: [leaves in C++]
// For each parameter the optimizer looks up its state entries, checks and
// casts their dtypes, groups the parameters by dtype pair, runs one fused
// step per group and hands back the new parameters and state dicts. Written
// in Python that bookkeeping cost about 2 us per parameter, as much as the
// arithmetic of a 1K-element tensor; here it is a few dict lookups and
// object creations. The state layout comes from schema/slots.h
// (NOTE: [slot layout]); checks of the state belong to this file, checks of
// the arrays to the op.

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <optional>

#include "mlx/ops.h"

#include "cpu/faults.h"
#include "op/adafactor.h"
#include "op/reference.h"
#include "python/bindings.h"
#include "schema/hyper.h"
#include "schema/slots.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_fused_adafactor {

namespace {

// str(dtype) as Python prints it, e.g. "mlx.core.int32".
std::string dtype_str(mx::Dtype t) {
  return nb::str(nb::cast(t)).c_str();
}

[[noreturn]] void state_error(const std::string& name, const std::string& what) {
  throw nb::value_error(
      ("[adafactor] parameter '" + name + "': " + what).c_str());
}

// The keys of the state entries, made per call: a static Python object
// would be released after the interpreter has shut down.
struct EntryKeys {
  nb::object keys[kNumEntries] = {
      nb::str(entry_key(Entry::Row)),
      nb::str(entry_key(Entry::Col)),
      nb::str(entry_key(Entry::Sq)),
      nb::str(entry_key(Entry::ExpAvg))};
  nb::handle operator[](Entry e) const {
    return keys[static_cast<int>(e)];
  }
};

// The state arrays of one parameter in slot order, cast to the dtypes the
// step keeps (entry_dtype).
std::vector<mx::array> input_state(
    nb::handle state,
    const mx::array& p,
    const std::string& name,
    const AdafactorHyper& h,
    const EntryKeys& keys) {
  if (!PyDict_Check(state.ptr())) {
    state_error(
        name,
        std::string("the optimizer state holds a ") +
            nb::type_name(state.type()).c_str() +
            " here, not the state of one parameter (a dict).");
  }
  const EntryList entries = state_entries(p.ndim(), h);
  std::vector<mx::array> arrays;
  arrays.reserve(entries.size());
  for (Entry e : entries) {
    PyObject* v = PyDict_GetItemWithError(state.ptr(), keys[e].ptr());
    if (v == nullptr) {
      if (PyErr_Occurred()) {
        throw nb::python_error();
      }
      auto sorted = nb::module_::import_("builtins").attr("sorted")(state);
      state_error(
          name,
          std::string("state has no '") + entry_key(e) + "'; it has " +
              nb::repr(sorted).c_str() +
              ", which does not fit this parameter or these optimizer "
              "options.");
    }
    // Not try_cast into a placeholder: a placeholder array costs an MLX
    // allocation per entry.
    if (!nb::isinstance<mx::array>(nb::handle(v))) {
      state_error(
          name,
          std::string("state '") + entry_key(e) + "' is a " +
              nb::type_name(nb::handle(v).type()).c_str() +
              ", not a float mlx array.");
    }
    const mx::array& a = *nb::inst_ptr<mx::array>(nb::handle(v));
    const mx::Dtype want = entry_dtype(e, p.dtype());
    arrays.push_back(a.dtype() == want ? a : mx::astype(a, want));
  }
  return arrays;
}

// The value of a Python or NumPy real number (a NumPy array must be 0-D),
// or nothing when `v` is not one.
std::optional<double> number_value(const std::string& what, nb::handle v) {
  if (PyBool_Check(v.ptr()) || PyComplex_Check(v.ptr()) ||
      !PyNumber_Check(v.ptr())) {
    return std::nullopt;
  }
  nb::object ndim = nb::getattr(v, "ndim", nb::none());
  if (!ndim.is_none() && nb::cast<int>(ndim) != 0) {
    throw nb::value_error(
        ("[adafactor] " + what + " must be a scalar, got an array of " +
         std::to_string(nb::cast<int>(ndim)) + " dimensions.")
            .c_str());
  }
  nb::object f = nb::steal(PyNumber_Float(v.ptr()));
  if (!f.is_valid()) {
    PyErr_Clear();
    return std::nullopt;
  }
  return nb::cast<double>(f);
}

// A real scalar of the optimizer: a 0-D mlx array of an integer or float
// dtype, or (`numbers`) a Python or NumPy number, converted as mx.array()
// converts it. `what` names it in the message.
mx::array real_scalar(const std::string& what, nb::handle v, bool numbers) {
  mx::array a(0.0f);
  if (nb::try_cast<mx::array>(v, a)) {
    if (a.ndim() != 0) {
      throw nb::value_error(
          ("[adafactor] " + what + " must be a scalar, got an array of " +
           std::to_string(a.ndim()) + " dimensions.")
              .c_str());
    }
    if (a.dtype() == mx::bool_ || !(mx::issubdtype(a.dtype(), mx::integer) ||
                                    mx::issubdtype(a.dtype(), mx::floating))) {
      throw nb::type_error(
          ("[adafactor] " + what + " must be a real number, got dtype " +
           dtype_str(a.dtype()) + ".")
              .c_str());
    }
    return a;
  }
  if (numbers) {
    if (auto d = number_value(what, v)) {
      return mx::array(static_cast<float>(*d));
    }
  }
  const std::string expected = numbers
      ? ", expected a number or a scalar mlx array."
      : ", expected a scalar mlx array.";
  throw nb::type_error(
      ("[adafactor] " + what + " is a " + nb::type_name(v.type()).c_str() +
       expected)
          .c_str());
}

// A fixed learning rate (constructor, `learning_rate` setter): a real
// scalar, and finite in float32 when it is a number (schema/hyper.h). An
// mlx array is not evaluated: it may be lazy or traced.
void check_learning_rate_value(nb::handle v) {
  if (!nb::isinstance<mx::array>(v)) {
    if (auto d = number_value("learning_rate", v)) {
      check_learning_rate(*d);
      return;
    }
  }
  real_scalar("learning_rate", v, true);
}

// The step count of an optimizer state dict, checked.
mx::array step_count(nb::handle state) {
  if (!PyDict_Check(state.ptr())) {
    throw nb::type_error(
        (std::string("[adafactor] the optimizer state is a ") +
         nb::type_name(state.type()).c_str() + ", not a dict.")
            .c_str());
  }
  PyObject* v = PyDict_GetItemString(state.ptr(), "step");
  if (v == nullptr) {
    throw nb::value_error(
        "[adafactor] the optimizer state has no 'step' (the step count).");
  }
  return real_scalar("optimizer state 'step'", v, false);
}

// A dict of the entries of `t` from `outputs`.
nb::dict state_dict(
    const TensorSlots& t,
    std::vector<mx::array>& outputs,
    const EntryKeys& keys) {
  nb::dict d;
  for (Entry e : t.entries) {
    d[keys[e]] = nb::cast(std::move(outputs[t.state_out(e)]));
  }
  return d;
}

nb::tuple apply_leaves(
    nb::handle step_value,
    nb::handle learning_rate_value,
    nb::list params,
    nb::list grads,
    nb::list states,
    nb::list names,
    const AdafactorHyper& h,
    std::optional<nb::list> shard_groups) {
  const EntryKeys keys;
  const mx::array step = real_scalar("step", step_value, false);
  const mx::array learning_rate =
      real_scalar("learning_rate", learning_rate_value, true);
  const size_t n = nb::len(params);
  std::vector<mx::array> p(n, mx::array(0.0f)), g(n, mx::array(0.0f));
  std::vector<std::string> name(n);
  for (size_t i = 0; i < n; ++i) {
    p[i] = nb::cast<mx::array>(params[i]);
    g[i] = nb::cast<mx::array>(grads[i]);
    name[i] = nb::cast<std::string>(names[i]);
  }

  // Each parameter's shard group (NOTE: [sharded step]); a group of one
  // process shards nothing.
  std::vector<std::optional<mx::distributed::Group>> shard(n);
  for (size_t i = 0; shard_groups && i < n; ++i) {
    nb::handle v = (*shard_groups)[i];
    if (!v.is_none()) {
      auto group = nb::cast<mx::distributed::Group>(v);
      if (group.size() > 1) {
        shard[i] = group;
      }
    }
  }
  auto same_group = [](const std::optional<mx::distributed::Group>& a,
                       const std::optional<mx::distributed::Group>& b) {
    return a.has_value() == b.has_value() &&
        (!a || a->raw_group() == b->raw_group());
  };

  // Group by (parameter dtype, gradient dtype), in order of appearance, and
  // by shard group (whose step takes every dtype at once).
  struct Group {
    mx::Dtype p_dtype, g_dtype;
    std::optional<mx::distributed::Group> shard;
    std::vector<size_t> members;
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < n; ++i) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& x) {
      return same_group(x.shard, shard[i]) &&
          (shard[i] ||
           (x.p_dtype == p[i].dtype() && x.g_dtype == g[i].dtype()));
    });
    if (it == groups.end()) {
      groups.push_back({p[i].dtype(), g[i].dtype(), shard[i], {}});
      it = groups.end() - 1;
    }
    it->members.push_back(i);
  }

  nb::list new_params, new_states;
  for (size_t i = 0; i < n; ++i) {
    new_params.append(nb::none());
    new_states.append(nb::none());
  }
  for (auto& group : groups) {
    const size_t first = group.members.front();
    if (!mx::issubdtype(group.p_dtype, mx::floating)) {
      throw nb::type_error(
          ("[adafactor] parameter '" + name[first] + "' has dtype " +
           dtype_str(group.p_dtype) +
           "; Adafactor updates float32, float16, bfloat16 and float64 "
           "parameters only.")
              .c_str());
    }
    if (!mx::issubdtype(group.g_dtype, mx::floating)) {
      throw nb::type_error(
          ("[adafactor] gradient '" + name[first] + "' has dtype " +
           dtype_str(group.g_dtype) +
           "; expected float32, float16, bfloat16 or float64.")
              .c_str());
    }
    const size_t m = group.members.size();
    std::vector<mx::array> gp, gg;
    std::vector<std::vector<mx::array>> gs;
    std::vector<std::string> gn;
    gp.reserve(m);
    gg.reserve(m);
    gs.reserve(m);
    gn.reserve(m);
    for (size_t i : group.members) {
      gs.push_back(input_state(states[i], p[i], name[i], h, keys));
      gp.push_back(std::move(p[i]));
      gg.push_back(std::move(g[i]));
      gn.push_back(std::move(name[i]));
    }
    std::vector<int> ndims;
    for (const auto& a : gp) {
      ndims.push_back(a.ndim());
    }
    std::vector<mx::array> outs;
    {
      // Evaluating the inputs runs the forward and backward pass: other
      // Python threads keep running meanwhile (tests/test_gil.py).
      std::optional<nb::gil_scoped_release> nogil;
      if (!AF_FAULT(cpu::Fault::StepHoldsGil)) {
        nogil.emplace();
      }
      outs = adafactor_step(
          step, learning_rate, gp, gg, gs, gn, h, group.shard);
    }
    const SlotLayout layout(ndims, h);
    for (size_t j = 0; j < m; ++j) {
      const auto& t = layout[j];
      const size_t i = group.members[j];
      new_params[i] = nb::cast(std::move(outs[t.param_out()]));
      new_states[i] = state_dict(t, outs, keys);
    }
  }
  return nb::make_tuple(new_params, new_states);
}

// The zero state of a parameter (stock's init_single, in this package's
// dtypes).
nb::dict init_state(const mx::array& p, const AdafactorHyper& h) {
  const EntryKeys keys;
  nb::dict d;
  for (Entry e : state_entries(p.ndim(), h)) {
    d[keys[e]] = nb::cast(
        mx::zeros(entry_shape(e, p.shape()), entry_dtype(e, p.dtype())));
  }
  return d;
}

// One tensor through the reference implementation (NOTE: [reference]).
nb::tuple reference(
    const mx::array& step,
    const mx::array& learning_rate,
    const mx::array& param,
    const mx::array& grad,
    nb::handle state,
    const AdafactorHyper& h,
    const std::string& path) {
  const EntryKeys keys;
  std::vector<mx::array> inputs = {step, learning_rate, param, grad};
  for (auto& a : input_state(state, param, "<reference>", h, keys)) {
    inputs.push_back(std::move(a));
  }
  const std::vector<AF_UINT> tensor_keys = {
      has_flag(h, AF_STOCHASTIC_ROUNDING) ? tensor_key(h, path) : 0};
  auto outs = reference_step(
      h, tensor_keys, inputs, mx::default_stream(mx::default_device()));
  const SlotLayout layout({param.ndim()}, h);
  nb::object p = nb::cast(outs[layout[0].param_out()]);
  return nb::make_tuple(p, state_dict(layout[0], outs, keys));
}

} // namespace

void bind_step(nb::module_& m) {
  m.def(
      "apply_leaves",
      &apply_leaves,
      "step"_a.none(),
      "learning_rate"_a.none(),
      "params"_a,
      "grads"_a,
      "states"_a,
      "names"_a,
      "hyper"_a,
      "shard_groups"_a = nb::none(),
      "One optimizer step over parallel lists of parameters, gradients, "
      "state dicts and names (NOTE: [leaves in C++]); `shard_groups`, if "
      "given, holds each parameter's mx.distributed.Group or None "
      "(NOTE: [sharded step]). Returns the new "
      "parameters and the new state dicts, in list order; changes nothing.");
  m.def(
      "check_learning_rate",
      &check_learning_rate_value,
      "value"_a.none(),
      "Check a fixed learning rate; raises naming learning_rate.");
  m.def(
      "step_count",
      &step_count,
      "state"_a.none(),
      "The step count of an optimizer state dict, checked (a scalar mlx "
      "array of a real dtype); raises naming what is wrong.");
  m.def(
      "init_state",
      &init_state,
      "parameter"_a,
      "hyper"_a,
      "The zero state of a parameter (NOTE: [slot layout]).");
  m.def(
      "reference",
      &reference,
      "step"_a,
      "learning_rate"_a,
      "parameter"_a,
      "gradient"_a,
      "state"_a,
      "hyper"_a,
      "path"_a = "",
      "One tensor through the pure-MLX implementation (NOTE: [reference]); "
      "`path` is the parameter's path, which its stochastic rounding depends "
      "on. Returns the new parameter and state dict.");
}

} // namespace mlx_fused_adafactor
