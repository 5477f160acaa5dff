// The per-parameter bookkeeping of Adafactor.apply_gradients, in C++.
//
// NOTE: [leaves in C++]
// For each parameter the optimizer looks up its state entries, checks and
// casts their dtypes, groups the parameters by dtype pair, runs one fused
// step per group and hands back the new parameters and state dicts. Written
// in Python that bookkeeping cost about 2 us per parameter, as much as the
// arithmetic of a 1K-element tensor; here it is a few dict lookups and
// object creations. Errors and their messages are the Python ones
// (optimizer.py keeps the same checks for its pure-MLX fallback).

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <algorithm>

#include "adafactor.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace af = mlx_fused_adafactor;

namespace {

constexpr const char* kRow = "exp_avg_sq_row";
constexpr const char* kCol = "exp_avg_sq_col";
constexpr const char* kSq = "exp_avg_sq";
constexpr const char* kExpAvg = "exp_avg";

// str(dtype) as Python prints it, e.g. "mlx.core.int32".
std::string dtype_str(mx::Dtype t) {
  return nb::str(nb::cast(t)).c_str();
}

[[noreturn]] void missing_key(const std::string& name, const char* key,
                              nb::handle state) {
  auto sorted = nb::module_::import_("builtins").attr("sorted")(state);
  throw nb::value_error(
      ("[adafactor] parameter '" + name + "': state has no '" + key +
       "'; it has " + nb::repr(sorted).c_str() +
       ", which does not fit this parameter or these optimizer options.")
          .c_str());
}

// The state arrays of one parameter in slot order, cast to what the kernel
// takes (second moment float32, exp_avg the parameter dtype).
std::vector<mx::array> input_state(
    nb::handle state,
    const mx::array& p,
    const std::string& name,
    bool momentum,
    const nb::object (&keys)[4]) {
  const bool factored = af::is_factored(p);
  const int n = af::num_second_moment(factored);
  std::vector<mx::array> arrays;
  arrays.reserve(n + momentum);
  auto take = [&](int slot, const char* key, mx::Dtype want) {
    PyObject* v = PyDict_GetItemWithError(state.ptr(), keys[slot].ptr());
    if (v == nullptr) {
      if (PyErr_Occurred()) {
        throw nb::python_error();
      }
      missing_key(name, key, state);
    }
    mx::array a(0.0f);
    if (!nb::try_cast<mx::array>(nb::handle(v), a)) {
      throw nb::value_error(
          ("[adafactor] parameter '" + name + "': a state entry is a " +
           nb::type_name(nb::handle(v).type()).c_str() +
           ", not a float mlx array.")
              .c_str());
    }
    arrays.push_back(a.dtype() == want ? a : mx::astype(a, want));
  };
  if (factored) {
    take(0, kRow, mx::float32);
    take(1, kCol, mx::float32);
  } else {
    take(2, kSq, mx::float32);
  }
  if (momentum) {
    take(3, kExpAvg, p.dtype());
  }
  return arrays;
}

nb::tuple apply_leaves(
    const mx::array& step,
    const mx::array& learning_rate,
    nb::list params,
    nb::list grads,
    nb::list states,
    nb::list names,
    const AdafactorHyper& h,
    bool allow_eager) {
  // Made per call, not static: a static Python object would be released
  // after the interpreter has shut down.
  const nb::object keys[4] = {
      nb::str(kRow), nb::str(kCol), nb::str(kSq), nb::str(kExpAvg)};
  const size_t n = nb::len(params);
  const bool momentum = h.flags & AF_MOMENTUM;

  std::vector<mx::array> p(n, mx::array(0.0f)), g(n, mx::array(0.0f));
  std::vector<std::string> name(n);
  for (size_t i = 0; i < n; ++i) {
    p[i] = nb::cast<mx::array>(params[i]);
    g[i] = nb::cast<mx::array>(grads[i]);
    name[i] = nb::cast<std::string>(names[i]);
  }

  // Group by (parameter dtype, gradient dtype), in order of appearance.
  struct Group {
    mx::Dtype p_dtype, g_dtype;
    std::vector<size_t> members;
  };
  std::vector<Group> groups;
  for (size_t i = 0; i < n; ++i) {
    auto it = std::find_if(groups.begin(), groups.end(), [&](const Group& x) {
      return x.p_dtype == p[i].dtype() && x.g_dtype == g[i].dtype();
    });
    if (it == groups.end()) {
      groups.push_back({p[i].dtype(), g[i].dtype(), {}});
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
    if (!af::is_float_storage(group.p_dtype)) {
      throw nb::type_error(
          ("[adafactor] parameter '" + name[first] + "' has dtype " +
           dtype_str(group.p_dtype) +
           "; Adafactor updates float32, float16 and bfloat16 parameters "
           "only.")
              .c_str());
    }
    if (!af::is_float_storage(group.g_dtype)) {
      throw nb::type_error(
          ("[adafactor] gradient '" + name[first] + "' has dtype " +
           dtype_str(group.g_dtype) +
           "; expected float32, float16 or bfloat16.")
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
      gs.push_back(input_state(states[i], p[i], name[i], momentum, keys));
      gp.push_back(std::move(p[i]));
      gg.push_back(std::move(g[i]));
      gn.push_back(std::move(name[i]));
    }
    auto outs = af::adafactor_step(
        step, learning_rate, gp, gg, gs, gn, h, allow_eager);
    size_t k = 0;
    for (size_t j = 0; j < m; ++j) {
      const bool factored = af::is_factored(gp[j]);
      const size_t i = group.members[j];
      new_params[i] = nb::cast(std::move(outs[k++]));
      nb::dict state;
      if (factored) {
        state[keys[0]] = nb::cast(std::move(outs[k++]));
        state[keys[1]] = nb::cast(std::move(outs[k++]));
      } else {
        state[keys[2]] = nb::cast(std::move(outs[k++]));
      }
      if (momentum) {
        state[keys[3]] = nb::cast(std::move(outs[k++]));
      }
      new_states[i] = std::move(state);
    }
  }
  return nb::make_tuple(new_params, new_states);
}

// (eps1, eps2, clip_threshold, decay_rate, beta1, one_minus_beta1,
//  weight_decay, flags), the fields of AdafactorHyper in order.
AdafactorHyper hyper_from_tuple(nb::handle t) {
  auto f = [&](size_t i) { return nb::cast<float>(t[i]); };
  if (nb::len(t) != 8) {
    throw nb::value_error("[adafactor] hyper must have 8 entries.");
  }
  return {f(0), f(1), f(2), f(3), f(4), f(5), f(6), nb::cast<int>(t[7])};
}

} // namespace

void bind_leaves(nb::module_& m) {
  m.def(
      "apply_leaves",
      [](const mx::array& step,
         const mx::array& learning_rate,
         nb::list params,
         nb::list grads,
         nb::list states,
         nb::list names,
         nb::tuple hyper,
         bool allow_eager) {
        return apply_leaves(
            step,
            learning_rate,
            params,
            grads,
            states,
            names,
            hyper_from_tuple(hyper),
            allow_eager);
      },
      "step"_a,
      "learning_rate"_a,
      "params"_a,
      "grads"_a,
      "states"_a,
      "names"_a,
      "hyper"_a,
      nb::kw_only(),
      "allow_eager"_a = true,
      "One optimizer step over parallel lists of parameters, gradients, "
      "state dicts and names (NOTE: [leaves in C++]); `hyper` is (eps1, "
      "eps2, clip_threshold, decay_rate, beta1, one_minus_beta1, "
      "weight_decay, flags); allow_eager as for adafactor_step. Returns the new parameters and the new state "
      "dicts, in list order. Changes nothing.");
}
