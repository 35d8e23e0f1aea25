// The fast path of the public functions in python/batchnorm/_functional.py: the common
// call is recognised here and run without the Python layer's argument handling.
#include <optional>
#include <vector>

#include "batchnorm/functional.hpp"
#include "bindings.hpp"

namespace batchnorm::python {

namespace {

// fast_moments, fast_normalize, fast_forward and fast_backward take the public function's
// arguments untouched (for backward, stats.mean and stats.inv_std of a BatchStats). When
// every argument is already in the form the general path (the rest of the Python function)
// would hand to the *_into bindings (register_functional.cpp), that path has nothing to
// convert or copy and no check of its own can fail; then these allocate the outputs as it
// would, run the same binding and return its results. Otherwise they return None and the
// general path runs. They never raise on their own: an error comes from the binding, given
// what the general path would give it. They read only exact built-in types (no subclass,
// no user code runs twice). Accepted:
//   x, dy   exact np.ndarray (np.asarray has nothing to do), aligned (_data copies
//           unaligned ones), of a dtype the kernels take, C-contiguous and not empty (a
//           new output is then C-ordered like np.empty_like's; empty arrays would differ in
//           strides), ndim >= 1 for normalize, 2 otherwise; dy of x's shape. Not empty
//           also means the batch is not, so forward's and moments' empty-batch error cannot apply.
//   axis    exact int in range (not bool, not np.integer): the single feature axis.
//   per-channel arrays (mean, variance, gamma, beta, stats.mean, stats.inv_std)
//           None where optional, else an exact np.ndarray whose dtype is the statistics
//           dtype's own descriptor object (float32, or float64 for float64 x), aligned,
//           C-contiguous, one element per channel: np.ascontiguousarray returns it as is
//           (a 0-d one as a 1-d view of it), so the core reads the same memory either way.
//   epsilon exact float.  activation: None or the str "relu".
//   out     None, or an exact np.ndarray with x's dtype object and shape, writeable,
//           C-contiguous (no two elements share memory) and each input either out itself
//           or in other bytes, so the exact overlap checks of _output have nothing to find.

constexpr int kAligned = 0x0100;  // NPY_ARRAY_ALIGNED

struct FastTypes {
  PyTypeObject* ndarray;
  PyObject* float32;  // the descriptor objects of the statistics dtypes
  PyObject* float64;
};
FastTypes fast_types{};  // set by register_fast_path, kept alive for the module's lifetime

bool exact_array(py::handle o) { return Py_TYPE(o.ptr()) == fast_types.ndarray; }

bool aligned_c_contiguous(const py::array& a) {
  const int want = py::array::c_style | kAligned;
  return (a.flags() & want) == want;
}

std::vector<py::ssize_t> shape_of(const py::array& a) { return {a.shape(), a.shape() + a.ndim()}; }

// x or dy; `stat` receives the descriptor of its statistics dtype.
bool fast_data(py::handle o, py::ssize_t min_ndim, PyObject*& stat) {
  if (!exact_array(o)) return false;
  const auto a = py::reinterpret_borrow<py::array>(o);
  Element e{};
  if (a.ndim() < min_ndim || a.size() == 0 || !aligned_c_contiguous(a) || !element_if_supported(a.dtype(), e))
    return false;
  stat = e == Element::f64 ? fast_types.float64 : fast_types.float32;
  return true;
}

bool fast_axis(py::handle axis, py::ssize_t ndim, int& feature) {
  if (!PyLong_CheckExact(axis.ptr())) return false;
  int overflow = 0;
  const long a = PyLong_AsLongAndOverflow(axis.ptr(), &overflow);  // an exact int cannot fail
  if (overflow != 0 || a < -ndim || a >= ndim) return false;
  feature = static_cast<int>(a < 0 ? a + ndim : a);
  return true;
}

bool fast_channel(py::handle p, PyObject* stat, py::ssize_t channels, bool optional) {
  if (p.is_none()) return optional;
  if (!exact_array(p)) return false;
  const auto a = py::reinterpret_borrow<py::array>(p);
  return a.dtype().ptr() == stat && a.size() == channels && aligned_c_contiguous(a);
}

bool fast_relu(py::handle activation, bool& relu) {
  relu = !activation.is_none();
  return !relu ||
         (PyUnicode_CheckExact(activation.ptr()) && PyUnicode_CompareWithASCIIString(activation.ptr(), "relu") == 0);
}

bool apart(const py::array& a, const py::array& b) {  // bytes of C-contiguous arrays
  const auto* pa = static_cast<const char*>(a.data());
  const auto* pb = static_cast<const char*>(b.data());
  return pa + a.nbytes() <= pb || pb + b.nbytes() <= pa;
}

// out, or a new array like x; nothing if out is not in the accepted form.
std::optional<py::array> fast_output(py::handle out, const py::array& x, const py::array* dy = nullptr) {
  if (out.is_none()) return py::array(x.dtype(), shape_of(x));
  if (!exact_array(out)) return std::nullopt;
  auto y = py::reinterpret_borrow<py::array>(out);
  if (y.dtype().ptr() != x.dtype().ptr() || shape_of(y) != shape_of(x) || !y.writeable() ||
      !(y.flags() & py::array::c_style))
    return std::nullopt;
  for (const py::array* a : {&x, dy})
    if (a && a->ptr() != y.ptr() && !apart(*a, y)) return std::nullopt;
  return y;
}

py::array stat_array(PyObject* stat, py::ssize_t channels) {
  return py::array(py::reinterpret_borrow<py::dtype>(stat), std::vector<py::ssize_t>{channels});
}

py::object fast_moments(py::handle x, py::handle axis) {
  PyObject* stat = nullptr;
  int a = 0;
  if (!fast_data(x, 2, stat)) return py::none();
  const auto xa = py::reinterpret_borrow<py::array>(x);
  if (!fast_axis(axis, xa.ndim(), a)) return py::none();
  py::array mean = stat_array(stat, xa.shape(a)), variance = stat_array(stat, xa.shape(a));
  moments_into(xa, {a}, mean, variance);
  return py::make_tuple(mean, variance);
}

py::object fast_normalize(py::handle x, py::handle mean, py::handle variance, py::handle gamma, py::handle beta,
                          py::handle axis, py::handle epsilon, py::handle activation, py::handle out) {
  PyObject* stat = nullptr;
  int a = 0;
  bool relu = false;
  if (!fast_data(x, 1, stat)) return py::none();
  const auto xa = py::reinterpret_borrow<py::array>(x);
  if (!fast_axis(axis, xa.ndim(), a)) return py::none();
  const py::ssize_t channels = xa.shape(a);
  if (!fast_channel(mean, stat, channels, false) || !fast_channel(variance, stat, channels, false) ||
      !fast_channel(gamma, stat, channels, true) || !fast_channel(beta, stat, channels, true) ||
      !PyFloat_CheckExact(epsilon.ptr()) || !fast_relu(activation, relu))
    return py::none();
  const std::optional<py::array> y = fast_output(out, xa);
  if (!y) return py::none();
  normalize_into(xa, *y, {a}, py::reinterpret_borrow<py::object>(mean), py::reinterpret_borrow<py::object>(variance),
                 py::reinterpret_borrow<py::object>(gamma), py::reinterpret_borrow<py::object>(beta),
                 PyFloat_AS_DOUBLE(epsilon.ptr()), relu, py::none());
  return *y;
}

py::object fast_forward(py::handle x, py::handle gamma, py::handle beta, py::handle axis, py::handle epsilon,
                        py::handle activation, py::handle out) {
  PyObject* stat = nullptr;
  int a = 0;
  bool relu = false;
  if (!fast_data(x, 2, stat)) return py::none();
  const auto xa = py::reinterpret_borrow<py::array>(x);
  if (!fast_axis(axis, xa.ndim(), a)) return py::none();
  const py::ssize_t channels = xa.shape(a);
  if (!fast_channel(gamma, stat, channels, true) || !fast_channel(beta, stat, channels, true) ||
      !PyFloat_CheckExact(epsilon.ptr()) || !fast_relu(activation, relu))
    return py::none();
  const std::optional<py::array> y = fast_output(out, xa);
  if (!y) return py::none();
  py::array mean = stat_array(stat, channels), variance = stat_array(stat, channels),
            inv_std = stat_array(stat, channels);
  const index_t count =
      forward_into(xa, *y, {a}, py::reinterpret_borrow<py::object>(gamma), py::reinterpret_borrow<py::object>(beta),
                   PyFloat_AS_DOUBLE(epsilon.ptr()), relu, mean, variance, inv_std)
          .cast<index_t>();
  return py::make_tuple(*y, mean, variance, inv_std, count);
}

py::object fast_backward(py::handle dy, py::handle x, py::handle mean, py::handle inv_std, py::handle gamma,
                         py::handle beta, py::handle axis, py::handle activation, py::handle out) {
  PyObject* stat = nullptr;
  PyObject* unused = nullptr;
  int a = 0;
  bool relu = false;
  if (!fast_data(x, 2, stat) || !fast_data(dy, 2, unused)) return py::none();
  const auto xa = py::reinterpret_borrow<py::array>(x);
  const auto dya = py::reinterpret_borrow<py::array>(dy);
  if (shape_of(dya) != shape_of(xa) || !fast_axis(axis, xa.ndim(), a)) return py::none();
  const py::ssize_t channels = xa.shape(a);
  if (!fast_channel(mean, stat, channels, false) || !fast_channel(inv_std, stat, channels, false) ||
      !fast_channel(gamma, stat, channels, true) || !fast_channel(beta, stat, channels, true) ||
      !fast_relu(activation, relu))
    return py::none();
  const std::optional<py::array> dx = fast_output(out, xa, &dya);
  if (!dx) return py::none();
  py::array dgamma = stat_array(stat, channels), dbeta = stat_array(stat, channels);
  backward_into(dya, xa, *dx, {a}, py::reinterpret_borrow<py::object>(mean),
                py::reinterpret_borrow<py::object>(inv_std), py::reinterpret_borrow<py::object>(gamma),
                py::reinterpret_borrow<py::object>(beta), relu, dgamma, dbeta, false);
  return py::make_tuple(*dx, dgamma, dbeta);
}

}  // namespace

void register_fast_path(py::module_& m) {
  py::object ndarray = py::module_::import("numpy").attr("ndarray");
  fast_types.ndarray = reinterpret_cast<PyTypeObject*>(ndarray.release().ptr());
  fast_types.float32 = py::dtype::of<float>().release().ptr();
  fast_types.float64 = py::dtype::of<double>().release().ptr();
  m.def("fast_moments", &fast_moments);
  m.def("fast_normalize", &fast_normalize);
  m.def("fast_forward", &fast_forward);
  m.def("fast_backward", &fast_backward);
}

}  // namespace batchnorm::python
