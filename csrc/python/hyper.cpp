// `_ext.Hyper`: the hyper-parameters (NOTE: [hyper-parameters]) with the
// optimizer's option names. Values are converted here (any Python number,
// NumPy scalar or 0-D mlx array; any truth value for the switches) and
// validated by the setters of schema/hyper.h, so a bad value is refused,
// with the option's name, whether it comes through the constructor or an
// assignment, and the object is left as it was.

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <sstream>

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

std::string repr(const AdafactorHyper& h) {
  std::ostringstream os;
  os.precision(9);
  os << "Hyper(eps=(" << h.eps1 << ", " << h.eps2
     << "), clip_threshold=" << h.clip_threshold
     << ", decay_rate=" << h.decay_rate << ", beta_1=";
  if (auto b = beta_1(h)) {
    os << *b;
  } else {
    os << "None";
  }
  os << ", weight_decay=" << h.weight_decay
     << ", scale_parameter=" << (has_flag(h, AF_SCALE_PARAMETER) ? "True" : "False")
     << ", relative_step=" << (has_flag(h, AF_RELATIVE_STEP) ? "True" : "False")
     << ", warmup_init=" << (has_flag(h, AF_WARMUP_INIT) ? "True" : "False")
     << ")";
  return os.str();
}

// A read-write property of a switch: one bit of the flags.
template <int Flag>
void def_flag(nb::class_<AdafactorHyper>& cls, const char* name) {
  cls.def_prop_rw(
      name,
      [](const AdafactorHyper& h) { return has_flag(h, Flag); },
      [](AdafactorHyper& h, nb::handle v) { set_flag(h, Flag, truth(v)); },
      nb::for_setter(nb::arg("value").none()));
}

} // namespace

void bind_hyper(nb::module_& m) {
  nb::class_<AdafactorHyper> cls(
      m,
      "Hyper",
      "The hyper-parameters of one fused step, named as the options of "
      "Adafactor (NOTE: [hyper-parameters]). Every option is required; the "
      "defaults are those of Adafactor.__init__.");
  cls.def(
      "__init__",
      [](AdafactorHyper* self,
         nb::handle eps,
         nb::handle clip_threshold,
         nb::handle decay_rate,
         nb::handle beta_1,
         nb::handle weight_decay,
         nb::handle scale_parameter,
         nb::handle relative_step,
         nb::handle warmup_init) {
        AdafactorHyper h = empty_hyper();
        set_eps_from(h, eps);
        set_clip_threshold(h, number("clip_threshold", clip_threshold));
        set_decay_rate(h, number("decay_rate", decay_rate));
        set_beta_1_from(h, beta_1);
        set_weight_decay(h, number("weight_decay", weight_decay));
        set_flag(h, AF_SCALE_PARAMETER, truth(scale_parameter));
        set_flag(h, AF_RELATIVE_STEP, truth(relative_step));
        set_flag(h, AF_WARMUP_INIT, truth(warmup_init));
        new (self) AdafactorHyper(h);
      },
      nb::kw_only(),
      "eps"_a.none(),
      "clip_threshold"_a.none(),
      "decay_rate"_a.none(),
      "beta_1"_a.none(),
      "weight_decay"_a.none(),
      "scale_parameter"_a.none(),
      "relative_step"_a.none(),
      "warmup_init"_a.none());
  cls.def_prop_rw(
      "eps",
      [](const AdafactorHyper& h) { return nb::make_tuple(h.eps1, h.eps2); },
      [](AdafactorHyper& h, nb::handle v) { set_eps_from(h, v); },
      nb::for_setter(nb::arg("value").none()));
  cls.def_prop_rw(
      "clip_threshold",
      [](const AdafactorHyper& h) { return h.clip_threshold; },
      [](AdafactorHyper& h, nb::handle v) {
        set_clip_threshold(h, number("clip_threshold", v));
      },
      nb::for_setter(nb::arg("value").none()));
  cls.def_prop_rw(
      "decay_rate",
      [](const AdafactorHyper& h) { return h.decay_rate; },
      [](AdafactorHyper& h, nb::handle v) {
        set_decay_rate(h, number("decay_rate", v));
      },
      nb::for_setter(nb::arg("value").none()));
  cls.def_prop_rw(
      "beta_1",
      [](const AdafactorHyper& h) -> nb::object {
        auto b = beta_1(h);
        return b ? nb::object(nb::float_(*b)) : nb::object(nb::none());
      },
      [](AdafactorHyper& h, nb::handle v) { set_beta_1_from(h, v); },
      nb::for_setter(nb::arg("value").none()));
  cls.def_prop_rw(
      "weight_decay",
      [](const AdafactorHyper& h) { return h.weight_decay; },
      [](AdafactorHyper& h, nb::handle v) {
        set_weight_decay(h, number("weight_decay", v));
      },
      nb::for_setter(nb::arg("value").none()));
  def_flag<AF_SCALE_PARAMETER>(cls, "scale_parameter");
  def_flag<AF_RELATIVE_STEP>(cls, "relative_step");
  def_flag<AF_WARMUP_INIT>(cls, "warmup_init");
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
  nb::list options;
  for (const char* name : kHyperOptions) {
    options.append(name);
  }
  cls.attr("OPTIONS") = nb::tuple(options);
}

} // namespace mlx_fused_adafactor
