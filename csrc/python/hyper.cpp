// `_ext.Hyper`: the hyper-parameters (NOTE: [hyper-parameters]) with the
// optimizer's option names. Values are converted here (any Python number,
// NumPy scalar or 0-D mlx array; any truth value for the switches) and
// validated by the setters of schema/hyper.h, so a bad value is refused,
// with the option's name, whether it comes through the constructor or an
// assignment, and the object is left as it was.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>
#include <vector>

#include "python/bindings.h"
#include "schema/hyper.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_fused_adafactor {

namespace {

std::string type_of(nb::handle v) {
  return nb::type_name(v.type()).c_str();
}

// A number, as Python's float() takes it (int, float, NumPy scalars, 0-D
// arrays); strings and containers are refused.
double number(const char* option, nb::handle v) {
  if (PyNumber_Check(v.ptr())) {
    PyObject* f = PyNumber_Float(v.ptr());
    if (f) {
      const double d = PyFloat_AsDouble(f);
      Py_DECREF(f);
      return d;
    }
    PyErr_Clear();
  }
  throw nb::type_error(
      (std::string("[adafactor] ") + option + " must be a number, got " +
       nb::repr(v).c_str() + " (" + type_of(v) + ").")
          .c_str());
}

// An integer, as Python's operator.index() takes it (int, NumPy integers,
// integer 0-D arrays).
long long integer(const char* option, nb::handle v) {
  PyObject* i = PyNumber_Index(v.ptr());
  if (i) {
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(i, &overflow);
    Py_DECREF(i);
    if (!overflow && !(value == -1 && PyErr_Occurred())) {
      return value;
    }
    PyErr_Clear();
    return overflow > 0 ? -1 : -2;
  }
  PyErr_Clear();
  throw nb::type_error(
      (std::string("[adafactor] ") + option + " must be an integer, got " +
       nb::repr(v).c_str() + " (" + type_of(v) + ").")
          .c_str());
}

bool truth(nb::handle v) {
  const int t = PyObject_IsTrue(v.ptr());
  if (t < 0) {
    throw nb::python_error();
  }
  return t != 0;
}

void set_eps_from(AdafactorHyper& h, nb::handle v) {
  nb::object items;
  if (!PyUnicode_Check(v.ptr()) && !PyBytes_Check(v.ptr())) {
    items = nb::steal(PySequence_Tuple(v.ptr()));
    if (!items.is_valid()) {
      PyErr_Clear();
    }
  }
  if (!items.is_valid() || nb::len(items) != 2) {
    throw nb::type_error(
        ("[adafactor] eps must be a pair of numbers (eps[0], eps[1]), got " +
         std::string(nb::repr(v).c_str()) + ".")
            .c_str());
  }
  set_eps(h, number("eps[0]", items[0]), number("eps[1]", items[1]));
}

void set_beta_1_from(AdafactorHyper& h, nb::handle v) {
  if (v.is_none()) {
    set_beta_1(h, std::nullopt);
  } else {
    set_beta_1(h, number("beta_1", v));
  }
}

nb::object py_float(float v) {
  return nb::float_(v);
}

// NOTE: [hyper-parameters]: the options as Python sees them, one row each;
// the constructor, the properties and repr are made from this table.
struct Option {
  const char* name;
  nb::object (*get)(const AdafactorHyper&);
  void (*set)(AdafactorHyper&, nb::handle);
};

// A switch: one bit of the flags.
template <int Flag>
Option flag(const char* name) {
  return {
      name,
      [](const AdafactorHyper& h) -> nb::object {
        return nb::bool_(has_flag(h, Flag));
      },
      [](AdafactorHyper& h, nb::handle v) { set_flag(h, Flag, truth(v)); }};
}

const std::vector<Option>& options() {
  static const std::vector<Option> table = {
      {"eps",
       [](const AdafactorHyper& h) -> nb::object {
         return nb::make_tuple(h.eps1, h.eps2);
       },
       set_eps_from},
      {"clip_threshold",
       [](const AdafactorHyper& h) { return py_float(h.clip_threshold); },
       [](AdafactorHyper& h, nb::handle v) {
         set_clip_threshold(h, number("clip_threshold", v));
       }},
      {"decay_rate",
       [](const AdafactorHyper& h) { return py_float(h.decay_rate); },
       [](AdafactorHyper& h, nb::handle v) {
         set_decay_rate(h, number("decay_rate", v));
       }},
      {"beta_1",
       [](const AdafactorHyper& h) -> nb::object {
         auto b = beta_1(h);
         return b ? py_float(*b) : nb::none();
       },
       set_beta_1_from},
      {"weight_decay",
       [](const AdafactorHyper& h) { return py_float(h.weight_decay); },
       [](AdafactorHyper& h, nb::handle v) {
         set_weight_decay(h, number("weight_decay", v));
       }},
      flag<AF_SCALE_PARAMETER>("scale_parameter"),
      flag<AF_RELATIVE_STEP>("relative_step"),
      flag<AF_WARMUP_INIT>("warmup_init"),
      flag<AF_STOCHASTIC_ROUNDING>("stochastic_rounding"),
      {"seed",
       [](const AdafactorHyper& h) -> nb::object { return nb::int_(h.seed); },
       [](AdafactorHyper& h, nb::handle v) {
         set_seed(h, integer("seed", v));
       }},
  };
  return table;
}

std::string repr(const AdafactorHyper& h) {
  std::string out = "Hyper(";
  const char* sep = "";
  for (const auto& o : options()) {
    out += sep;
    out += o.name;
    out += "=";
    out += nb::repr(o.get(h)).c_str();
    sep = ", ";
  }
  return out + ")";
}

// Hyper(**options): every option of the table, nothing else.
void init(AdafactorHyper* self, nb::kwargs kwargs) {
  AdafactorHyper h = empty_hyper();
  for (const auto& o : options()) {
    if (!kwargs.contains(o.name)) {
      throw nb::type_error(
          (std::string("[adafactor] Hyper() needs the option '") + o.name +
           "'.")
              .c_str());
    }
    o.set(h, kwargs[o.name]);
  }
  for (auto [key, value] : kwargs) {
    const std::string name = nb::cast<std::string>(key);
    bool known = false;
    for (const auto& o : options()) {
      known = known || name == o.name;
    }
    if (!known) {
      throw nb::type_error(
          ("[adafactor] Hyper() has no option '" + name + "'.").c_str());
    }
  }
  new (self) AdafactorHyper(h);
}

} // namespace

void bind_hyper(nb::module_& m) {
  nb::class_<AdafactorHyper> cls(
      m,
      "Hyper",
      "The hyper-parameters of one fused step, named as the options of "
      "Adafactor (NOTE: [hyper-parameters]). Every option is a required "
      "keyword; the defaults are those of Adafactor.__init__.");
  cls.def("__init__", &init);
  nb::list names;
  for (const auto& o : options()) {
    names.append(o.name);
    cls.def_prop_rw(
        o.name,
        [get = o.get](const AdafactorHyper& h) { return get(h); },
        [set = o.set](AdafactorHyper& h, nb::handle v) { set(h, v); },
        nb::for_setter(nb::arg("value").none()));
  }
  cls.attr("OPTIONS") = nb::tuple(names);
  cls.def("__repr__", &repr);
  cls.def("__eq__", [](const AdafactorHyper& a, const AdafactorHyper& b) {
    return same_hyper(a, b);
  });
  cls.def("__copy__", [](const AdafactorHyper& h) { return h; });
  cls.def("__deepcopy__", [](const AdafactorHyper& h, nb::handle) { return h; });
  cls.def(
      "__bytes__",
      [](const AdafactorHyper& h) {
        return nb::bytes(reinterpret_cast<const char*>(&h), sizeof(h));
      },
      "The struct as the kernels read it (kernels/adafactor_math.h).");
}

} // namespace mlx_fused_adafactor
