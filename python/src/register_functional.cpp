// moments, partial_moments, normalize, forward, backward, merge_moments over NumPy arrays
// or CPU torch tensors (once batchnorm.torch has called use_torch).
//
// Arrays arrive as they are (no conversion, no copy): the Python layer has already
// chosen dtypes and allocated outputs; here their buffers are described for the C++ API
// and checked (dtype, shape, size, writeable), then the kernel runs with the GIL
// released. That is safe because the kernels touch only these buffers, which the
// arguments keep alive, and no Python object. The fast path of the public
// functions (register_fast_path.cpp) runs the same *_into functions.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "batchnorm/functional.hpp"
#include "batchnorm/layer.hpp"
#include "bindings.hpp"

namespace batchnorm::python {

namespace {

const char* element_name(Element e) {
  switch (e) {
    case Element::f16:
      return "float16";
    case Element::bf16:
      return "bfloat16";
    case Element::f32:
      return "float32";
    default:
      return "float64";
  }
}

// Whether dt is ml_dtypes' bfloat16 (or another 2-byte void type named so). Reading
// dt.name costs ~0.7 us, so the last dtype object found to be bfloat16 is remembered (a
// strong reference: the pointer can never name another object) and matched by identity.
bool is_bfloat16(const py::dtype& dt) {
  static PyObject* known = nullptr;
  if (dt.ptr() == known) return true;
  if (dt.kind() != 'V' || dt.itemsize() != 2 || py::str(dt.attr("name")).cast<std::string>() != "bfloat16")
    return false;
  Py_INCREF(dt.ptr());
  Py_XDECREF(known);
  known = dt.ptr();
  return true;
}

bool is_float(const py::dtype& dt) {
  const auto size = dt.itemsize();
  return dt.kind() == 'f' && (size == 2 || size == 4 || size == 8);
}

}  // namespace

bool element_if_supported(const py::dtype& dt, Element& e) {
  if (is_float(dt) && dt.byteorder() != '>') {
    const auto size = dt.itemsize();
    e = size == 2 ? Element::f16 : size == 4 ? Element::f32 : Element::f64;
    return true;
  }
  if (is_bfloat16(dt)) {
    e = Element::bf16;
    return true;
  }
  return false;
}

namespace {

// torch.Tensor and torch's float16, bfloat16, float32 and float64 dtype objects (in Element
// order), handed over by batchnorm.torch through use_torch and kept for the process's
// lifetime. Read by reference to torch's objects, so _core itself never imports torch.
struct TorchTypes {
  PyTypeObject* tensor = nullptr;
  PyObject* dtypes[4] = {};
  PyObject* strided = nullptr;  // torch.strided: the layout of dense tensors
  PyObject* int64 = nullptr;    // torch.int64: num_batches_tracked
};
TorchTypes torch_types;

bool is_tensor(py::handle o) { return torch_types.tensor && PyObject_TypeCheck(o.ptr(), torch_types.tensor); }

// t.name (or t.name() when call): a new reference. Each name becomes a Python string once
// (kept for the process's lifetime) and the C API is called directly: several of these run
// per tensor per call, and pybind's attr() (a new string and an argument tuple each time)
// costs more than a small batch's kernel. Called with the GIL held.
py::object tensor_attr(py::handle t, const char* name, bool call = false) {
  static std::unordered_map<const char*, PyObject*> keys;  // by the literal's address
  PyObject*& key = keys[name];
  if (!key) key = PyUnicode_InternFromString(name);
  PyObject* r = call ? PyObject_CallMethodNoArgs(t.ptr(), key) : PyObject_GetAttr(t.ptr(), key);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

// A tensor's element type, if the kernels take it.
bool tensor_element(py::handle t, Element& e) {
  const py::object dtype = tensor_attr(t, "dtype");
  for (int i = 0; i < 4; ++i)
    if (dtype.ptr() == torch_types.dtypes[i]) {
      e = static_cast<Element>(i);
      return true;
    }
  return false;
}

// Kernels read tensor memory directly, so anything but a strided CPU tensor is refused
// before its pointer is taken.
void check_cpu_strided(py::handle t, const char* name) {
  if (tensor_attr(t, "is_cpu").ptr() != Py_True)
    throw value_error(std::string(name) + " is on device '" + py::str(t.attr("device")).cast<std::string>() +
                      "'; batchnorm runs on CPU tensors only (move it with .cpu())");
  if (tensor_attr(t, "layout").ptr() != torch_types.strided)  // sparse, mkldnn; quantized fail on their dtype
    throw type_error(std::string(name) + " must be a dense (strided) tensor, not " +
                     py::str(t.attr("layout")).cast<std::string>());
}

ArrayArg describe_tensor(py::handle t, const char* name) {
  check_cpu_strided(t, name);
  ArrayArg arg;
  if (!tensor_element(t, arg.element))
    throw type_error(std::string(name) + " must be a float16, bfloat16, float32 or float64 tensor; got " +
                     py::str(t.attr("dtype")).cast<std::string>());
  arg.data = reinterpret_cast<void*>(tensor_attr(t, "data_ptr", true).cast<std::uintptr_t>());
  const py::object shape = tensor_attr(t, "shape");  // torch.Size, a tuple
  const py::object strides = tensor_attr(t, "stride", true);
  const Py_ssize_t ndim = PyTuple_GET_SIZE(shape.ptr());
  arg.shape.resize(static_cast<std::size_t>(ndim));
  arg.strides.resize(static_cast<std::size_t>(ndim));
  for (Py_ssize_t d = 0; d < ndim; ++d) {
    arg.shape[static_cast<std::size_t>(d)] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape.ptr(), d));
    arg.strides[static_cast<std::size_t>(d)] = PyLong_AsSsize_t(PyTuple_GET_ITEM(strides.ptr(), d));  // in elements
  }
  return arg;
}

// Whether a per-channel array or tensor holds float64 (else it must hold float32).
bool holds_float64(py::handle o) {
  if (is_tensor(o)) return tensor_attr(o, "dtype").ptr() == torch_types.dtypes[3];
  return py::isinstance<py::array>(o) && py::reinterpret_borrow<py::array>(o).itemsize() == 8;
}

Element element_of(const py::array& a, const char* name) {
  const py::dtype dt = a.dtype();
  Element e{};
  if (element_if_supported(dt, e)) return e;
  const std::string what = is_float(dt) ? "a big-endian array (convert it with x.astype(x.dtype.newbyteorder('=')))"
                                        : "dtype " + py::str(py::handle(dt)).cast<std::string>();
  throw type_error(std::string(name) + " must be a float16, bfloat16, float32 or float64 array; got " + what);
}

template <class F>
decltype(auto) with_element(Element e, F&& f) {
  switch (e) {
    case Element::f16:
      return f(float16_t{});
    case Element::bf16:
      return f(bfloat16_t{});
    case Element::f32:
      return f(float{});
    default:
      return f(double{});
  }
}

Axes to_axes(const std::vector<int>& axes) { return Axes(axes.begin(), axes.end()); }

std::string shape_str(const Shape& shape) {  // as Python prints a tuple
  std::string out = "(";
  for (std::size_t d = 0; d < shape.size(); ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

// a must have b's dtype and shape (out and dy against x).
void check_like(const ArrayArg& a, const char* a_name, const ArrayArg& b, const char* b_name) {
  if (a.element != b.element)
    throw type_error(std::string(a_name) + " has dtype " + element_name(a.element) + "; expected " +
                     element_name(b.element) + ", the dtype of " + b_name);
  if (a.shape != b.shape)
    throw value_error(std::string(a_name) + " has shape " + shape_str(a.shape) + "; expected " + shape_str(b.shape) +
                      ", the shape of " + b_name);
}

// The mask of masked statistics (None: none): x's dtype and x's shape without its feature
// axes (the Python layer broadcasts it, with zero strides, and converts a boolean one).
ArrayArg mask_arg(const py::object& mask, const ArrayArg& xa, const Geometry& g) {
  if (mask.is_none()) return {};
  const ArrayArg m = describe(mask, "mask", false);
  const Axes axes = feature_axes(g.axes, xa.shape.size());
  Shape expected;
  for (std::size_t d = 0; d < xa.shape.size(); ++d)
    if (std::find(axes.begin(), axes.end(), static_cast<int>(d)) == axes.end()) expected.push_back(xa.shape[d]);
  if (m.element != xa.element)
    throw type_error(std::string("mask has dtype ") + element_name(m.element) + "; expected " +
                     element_name(xa.element) + ", the dtype of x");
  if (m.shape != expected)
    throw value_error("mask has shape " + shape_str(m.shape) + "; expected " + shape_str(expected) +
                      ", the shape of x without its feature axes");
  return m;
}

template <class T>
In<T> mask_in(const ArrayArg& m) {
  return {static_cast<const T*>(m.data), m.strides};
}

// Per-channel float16/bfloat16 tensors of one call (a 16-bit module's parameters, buffers
// and parameter gradients), converted to float for the core and, for outputs, rounded back
// into the tensor after it: here that costs nanoseconds, torch's .to() a few microseconds
// each, as much as a small batch's kernels.
class Converted {
 public:
  float* take(void* data, Element e, index_t n, bool output) {
    Item item{data, e, std::vector<float>(static_cast<std::size_t>(n)), output};
    const auto* bits = static_cast<const std::uint16_t*>(data);
    for (std::size_t i = 0; i < item.values.size(); ++i)
      item.values[i] = e == Element::bf16 ? bfloat16_t::to_float(bits[i]) : float16_t::to_float(bits[i]);
    items_.push_back(std::move(item));
    return items_.back().values.data();  // a vector's buffer stays put when the Item moves
  }
  // Rounds the outputs into their tensors (as torch's .to() rounds: to nearest even).
  void write_back() const {
    for (const Item& item : items_) {
      if (!item.output) continue;
      auto* bits = static_cast<std::uint16_t*>(item.data);
      for (std::size_t i = 0; i < item.values.size(); ++i)
        bits[i] = item.element == Element::bf16 ? bfloat16_t::from_float(item.values[i])
                                                : float16_t::from_float(item.values[i]);
    }
  }

 private:
  struct Item {
    void* data;
    Element element;
    std::vector<float> values;
    bool output;
  };
  std::vector<Item> items_;
};

// A per-channel tensor of S: CPU, contiguous, `channels` elements (always writeable). With
// `conv`, a float16/bfloat16 one where S is float is taken through it.
template <class S>
S* tensor_channels(py::handle t, const char* name, index_t channels, bool writeable, Converted* conv) {
  check_cpu_strided(t, name);
  Element e{};
  const Element want = sizeof(S) == 4 ? Element::f32 : Element::f64;
  const bool half = conv && want == Element::f32;
  if (!tensor_element(t, e) || !(e == want || (half && (e == Element::f16 || e == Element::bf16))) ||
      tensor_attr(t, "is_contiguous", true).ptr() != Py_True)
    throw type_error(std::string(name) + " must be a contiguous " + (sizeof(S) == 4 ? "float32" : "float64") +
                     (half ? " (or float16/bfloat16)" : "") + " tensor");
  if (tensor_attr(t, "numel", true).cast<index_t>() != channels)
    throw value_error(std::string(name) + " has " + py::str(t.attr("numel")()).cast<std::string>() +
                      " elements; expected " + std::to_string(channels) + " (one per channel)");
  void* data = reinterpret_cast<void*>(tensor_attr(t, "data_ptr", true).cast<std::uintptr_t>());
  if (e != want) {
    if constexpr (std::is_same_v<S, float>) return conv->take(data, e, channels, writeable);
  }
  return static_cast<S*>(data);
}

// A per-channel array of S: contiguous, `channels` elements. None gives nullptr if allowed.
// With `conv`, float16/bfloat16 tensors are taken too (see Converted).
template <class S>
S* channel_array(const py::object& o, const char* name, index_t channels, bool writeable, bool optional = false,
                 Converted* conv = nullptr) {
  if (o.is_none()) {
    if (optional) return nullptr;
    throw type_error(std::string(name) + " must be an array, not None");
  }
  if (is_tensor(o)) return tensor_channels<S>(o, name, channels, writeable, conv);
  if (!py::isinstance<py::array>(o)) throw type_error(std::string(name) + " must be a NumPy array");
  auto a = py::reinterpret_borrow<py::array>(o);
  if (!py::isinstance<py::array_t<S>>(a) || !(a.flags() & py::array::c_style))
    throw type_error(std::string(name) + " must be a C-contiguous " + (sizeof(S) == 4 ? "float32" : "float64") +
                     " array");
  if (a.size() != channels)
    throw value_error(std::string(name) + " has " + std::to_string(a.size()) + " elements; expected " +
                      std::to_string(channels) + " (one per channel)");
  if (writeable && !a.writeable()) throw value_error(std::string(name) + " is read-only");
  return static_cast<S*>(const_cast<void*>(a.data()));
}

// Whether o is an int as the public functions take one: numbers.Integral or np.integer.
bool is_integer(py::handle o) {
  static const py::handle types =  // kept for the module's lifetime
      py::make_tuple(py::module_::import("numbers").attr("Integral"), py::module_::import("numpy").attr("integer"))
          .release();
  const int r = PyObject_IsInstance(o.ptr(), types.ptr());
  if (r < 0) throw py::error_already_set();
  return r == 1;
}

// The public functions' `axis` (an int or a sequence of ints, not bool) as the core's
// validated feature axes of an array of ndim dimensions, sorted and non-negative.
py::tuple feature_axes_of(const py::object& axis, std::size_t ndim) {
  auto wrong_type = [&] {
    return type_error("axis must be an int or a tuple of ints, got " + py::repr(axis).cast<std::string>());
  };
  std::vector<py::int_> items;
  try {
    const py::object seq = is_integer(axis) ? py::make_tuple(axis) : axis;
    for (py::handle item : seq) {
      if (PyBool_Check(item.ptr())) throw wrong_type();
      items.push_back(py::reinterpret_steal<py::int_>(PyNumber_Index(item.ptr())));
      if (!items.back()) throw py::error_already_set();
    }
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;
    throw wrong_type();
  }
  Axes axes;
  for (const py::int_& item : items) {
    int overflow = 0;
    const long long a = PyLong_AsLongLongAndOverflow(item.ptr(), &overflow);
    if (overflow != 0 || a < std::numeric_limits<int>::min() || a > std::numeric_limits<int>::max())
      throw value_error("axis " + py::str(item).cast<std::string>() + " is out of range for an array of ndim " +
                        std::to_string(ndim));  // beyond int: the core's message for any array
    axes.push_back(static_cast<int>(a));
  }
  const Axes sorted = feature_axes(axes, ndim);
  py::tuple out(sorted.size());
  for (std::size_t i = 0; i < sorted.size(); ++i) out[i] = sorted[i];
  return out;
}

Activation activation_of(bool relu) { return relu ? Activation::relu : Activation::none; }
Statistics statistics_of(bool fixed) { return fixed ? Statistics::fixed : Statistics::batch; }

// Optional gamma and beta (None: 1 and 0).
template <class S>
Affine<S> affine_of(const py::object& gamma, const py::object& beta, index_t channels, Converted& conv) {
  return {channel_array<S>(gamma, "gamma", channels, false, true, &conv),
          channel_array<S>(beta, "beta", channels, false, true, &conv)};
}

}  // namespace

ArrayArg describe(py::handle o, const char* name, bool writeable) {
  if (is_tensor(o)) {
    ArrayArg arg = describe_tensor(o, name);
    const std::uintptr_t itemsize = arg.element == Element::f64 ? 8 : arg.element == Element::f32 ? 4 : 2;
    if (reinterpret_cast<std::uintptr_t>(arg.data) % itemsize != 0)
      throw value_error(std::string(name) + " is not aligned to its element size");
    return arg;
  }
  if (!py::isinstance<py::array>(o))
    throw type_error(std::string(name) + " must be a NumPy array" + (torch_types.tensor ? " or a torch tensor" : ""));
  const auto a = py::reinterpret_borrow<py::array>(o);
  ArrayArg arg;
  arg.element = element_of(a, name);
  const auto itemsize = static_cast<index_t>(a.itemsize());
  if (writeable && !a.writeable()) throw value_error(std::string(name) + " is read-only");
  arg.data = const_cast<void*>(a.data());
  if (reinterpret_cast<std::uintptr_t>(arg.data) % static_cast<std::uintptr_t>(itemsize) != 0)
    throw value_error(std::string(name) + " is not aligned to its element size");
  const auto ndim = static_cast<std::size_t>(a.ndim());
  arg.shape.resize(ndim);
  arg.strides.resize(ndim);
  for (std::size_t d = 0; d < ndim; ++d) {
    arg.shape[d] = static_cast<index_t>(a.shape(static_cast<py::ssize_t>(d)));
    const auto bytes = static_cast<index_t>(a.strides(static_cast<py::ssize_t>(d)));
    if (bytes % itemsize != 0) throw value_error(std::string(name) + " has strides that are not whole elements");
    arg.strides[d] = bytes / itemsize;
  }
  return arg;
}

// The bindings of moments, normalize, forward and backward, shared by the general path
// (each argument as the Python layer prepared it) and the fast path (register_fast_path.cpp).

// A statistics output of moments or forward: the caller's array, or for None a new one of
// the statistics dtype shaped like the feature axes (`allocated` is then set). None stays
// None for an empty batch, which the core refuses before it reads its outputs: C may be
// too large to allocate for nothing.
py::object stat_output(const py::object& given, const ArrayArg& xa, const Geometry& g, bool& allocated) {
  if (!given.is_none()) return given;
  allocated = true;
  if (extent(g).count == 0) return given;
  std::vector<py::ssize_t> kept;
  for (int a : feature_axes(g.axes, xa.shape.size())) kept.push_back(xa.shape[static_cast<std::size_t>(a)]);
  return py::array(xa.element == Element::f64 ? py::dtype::of<double>() : py::dtype::of<float>(), kept);
}

py::object moments_into(const py::object& x, const std::vector<int>& axes, const py::object& mean,
                        const py::object& variance, const py::object& mask) {
  const ArrayArg xa = describe(x, "x", false);
  const Geometry g{xa.shape, to_axes(axes)};
  const ArrayArg ma = mask_arg(mask, xa, g);
  const index_t channels = extent(g).channels;
  bool allocated = false;
  const py::object mean_out = stat_output(mean, xa, g, allocated);
  const py::object variance_out = stat_output(variance, xa, g, allocated);
  const index_t count = with_element(xa.element, [&](auto tag) {
    using T = decltype(tag);
    auto* mu = channel_array<stat_t<T>>(mean_out, "mean", channels, true, true);
    auto* var = channel_array<stat_t<T>>(variance_out, "variance", channels, true, true);
    py::gil_scoped_release nogil;
    return moments<T>(g, {static_cast<const T*>(xa.data), xa.strides}, mu, var, mask_in<T>(ma));
  });
  if (allocated) return py::make_tuple(mean_out, variance_out);
  return py::int_(count);
}

void normalize_into(const py::object& x, const py::object& y, const std::vector<int>& axes, const py::object& mean,
                    const py::object& variance, const py::object& gamma, const py::object& beta, double epsilon,
                    bool relu, const py::object& inv_std) {
  const ArrayArg xa = describe(x, "x", false);
  const ArrayArg ya = describe(y, "out", true);
  check_like(ya, "out", xa, "x");
  const Geometry g{xa.shape, to_axes(axes)};
  const index_t channels = extent(g).channels;
  with_element(xa.element, [&](auto tag) {
    using T = decltype(tag);
    using S = stat_t<T>;
    Converted conv;
    const S* mu = channel_array<S>(mean, "mean", channels, false, false, &conv);
    const S* var = channel_array<S>(variance, "variance", channels, false, false, &conv);
    const Affine<S> affine = affine_of<S>(gamma, beta, channels, conv);
    S* inv = channel_array<S>(inv_std, "inv_std", channels, true, true);
    py::gil_scoped_release nogil;
    normalize<T>(g, {static_cast<const T*>(xa.data), xa.strides}, {static_cast<T*>(ya.data), ya.strides, "out"}, mu,
                 var, affine, epsilon, activation_of(relu), inv);
  });
}

py::object forward_into(const py::object& x, const py::object& y, const std::vector<int>& axes, const py::object& gamma,
                        const py::object& beta, double epsilon, bool relu, const py::object& mean,
                        const py::object& variance, const py::object& inv_std, const py::object& mask) {
  const ArrayArg xa = describe(x, "x", false);
  const ArrayArg ya = describe(y, "out", true);
  check_like(ya, "out", xa, "x");
  const Geometry g{xa.shape, to_axes(axes)};
  const ArrayArg ma = mask_arg(mask, xa, g);
  const index_t channels = extent(g).channels;
  bool allocated = false;
  const py::object mean_out = stat_output(mean, xa, g, allocated);
  const py::object variance_out = stat_output(variance, xa, g, allocated);
  const py::object inv_std_out = stat_output(inv_std, xa, g, allocated);
  const index_t count = with_element(xa.element, [&](auto tag) {
    using T = decltype(tag);
    using S = stat_t<T>;
    Converted conv;
    const Affine<S> affine = affine_of<S>(gamma, beta, channels, conv);
    S* mu = channel_array<S>(mean_out, "mean", channels, true, true);
    S* var = channel_array<S>(variance_out, "variance", channels, true, true);
    S* inv = channel_array<S>(inv_std_out, "inv_std", channels, true, true);
    py::gil_scoped_release nogil;
    return forward<T>(g, {static_cast<const T*>(xa.data), xa.strides}, {static_cast<T*>(ya.data), ya.strides, "out"},
                      affine, epsilon, activation_of(relu), mu, var, inv, mask_in<T>(ma));
  });
  if (allocated) return py::make_tuple(mean_out, variance_out, inv_std_out, count);
  return py::int_(count);
}

namespace {

// What the three backward bindings take alike: x, dy (matched against x), the optional
// dx, the geometry, and per element type the statistics and gamma/beta.
struct BackwardArgs {
  ArrayArg x, dy, dx;
  Geometry g;
  index_t channels;
  BackwardArgs(py::handle dy_arr, py::handle x_arr, py::handle dx_arr, const std::vector<int>& axes)
      : x(describe(x_arr, "x", false)),
        dy(describe(dy_arr, "dy", false)),
        dx(dx_arr ? describe(dx_arr, "out", true) : ArrayArg{}),
        g{x.shape, to_axes(axes)},
        channels(extent(g).channels) {
    check_like(dy, "dy", x, "x");
    if (dx_arr) check_like(dx, "out", x, "x");
  }
  template <class T>
  In<T> dy_in() const {
    return {static_cast<const T*>(dy.data), dy.strides};
  }
  template <class T>
  In<T> x_in() const {
    return {static_cast<const T*>(x.data), x.strides};
  }
  template <class T>
  Out<T> dx_out() const {
    return {static_cast<T*>(dx.data), dx.strides, "out"};
  }
};

template <class S>
struct StatsArgs {
  const S* mean;
  const S* inv_std;
  Affine<S> affine;
};

template <class S>
StatsArgs<S> stats_args(const py::object& mean, const py::object& inv_std, const py::object& gamma,
                        const py::object& beta, index_t channels, const char* mean_name, const char* inv_std_name,
                        Converted& conv) {
  return {channel_array<S>(mean, mean_name, channels, false, false, &conv),  // a 16-bit running mean in eval
          channel_array<S>(inv_std, inv_std_name, channels, false), affine_of<S>(gamma, beta, channels, conv)};
}

}  // namespace

void backward_into(const py::object& dy, const py::object& x, const py::object& dx, const std::vector<int>& axes,
                   const py::object& mean, const py::object& inv_std, const py::object& gamma, const py::object& beta,
                   bool relu, const py::object& dgamma, const py::object& dbeta, bool fixed_statistics,
                   const py::object& mask) {
  const BackwardArgs a(dy, x, dx, axes);
  const ArrayArg ma = mask_arg(mask, a.x, a.g);
  with_element(a.x.element, [&](auto tag) {
    using T = decltype(tag);
    using S = stat_t<T>;
    // named as bn.backward takes them
    Converted conv;
    const auto st = stats_args<S>(mean, inv_std, gamma, beta, a.channels, "stats.mean", "stats.inv_std", conv);
    S* dg = channel_array<S>(dgamma, "dgamma", a.channels, true, false, &conv);
    S* db = channel_array<S>(dbeta, "dbeta", a.channels, true, false, &conv);
    py::gil_scoped_release nogil;
    backward<T>(a.g, a.dy_in<T>(), a.x_in<T>(), a.dx_out<T>(), st.mean, st.inv_std, st.affine, activation_of(relu), dg,
                db, statistics_of(fixed_statistics), mask_in<T>(ma));
    conv.write_back();
  });
}

namespace {

// The data of num_batches_tracked, checked: a CPU int64 tensor of one element.
std::int64_t* counter_data(const py::object& counter) {
  if (!is_tensor(counter)) throw type_error("num_batches_tracked must be a torch tensor");
  check_cpu_strided(counter, "num_batches_tracked");
  if (tensor_attr(counter, "dtype").ptr() != torch_types.int64 ||
      tensor_attr(counter, "numel", true).cast<index_t>() != 1)
    throw type_error("num_batches_tracked must be an int64 tensor of one element");
  return reinterpret_cast<std::int64_t*>(tensor_attr(counter, "data_ptr", true).cast<std::uintptr_t>());
}

// The layer's rule (layer.hpp), the batch variance unbiased by count / (count - 1) (NaN
// for a count of 1, as torch). The buffers are checked before either is written.
void update_running_into(const py::object& running_mean, const py::object& running_var, const py::object& mean,
                         const py::object& variance, double factor, index_t count) {
  auto update = [&](auto tag) {
    using S = decltype(tag);
    const auto channels = static_cast<index_t>(py::len(mean));
    Converted conv;  // 16-bit buffers: updated in float, rounded once (as torch's copy back)
    S* rm = channel_array<S>(running_mean, "running_mean", channels, true, false, &conv);
    S* rv = channel_array<S>(running_var, "running_var", channels, true, false, &conv);
    const S* mu = channel_array<S>(mean, "mean", channels, false);
    const S* var = channel_array<S>(variance, "variance", channels, false);
    const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1)
                                    : std::numeric_limits<double>::quiet_NaN();
    update_running_pytorch(channels, rm, rv, mu, var, factor, unbias);
    conv.write_back();
  };
  if (holds_float64(running_mean))
    update(double{});
  else
    update(float{});
}

}  // namespace

void register_functional(py::module_& m) {
  m.def(
      "use_torch",
      [](const py::object& tensor, const py::object& f16, const py::object& bf16, const py::object& f32,
         const py::object& f64, const py::object& strided, const py::object& int64) {
        if (!PyType_Check(tensor.ptr())) throw type_error("use_torch takes the torch.Tensor type");
        // references kept for the process's lifetime: the pointers are compared by identity
        torch_types.tensor = reinterpret_cast<PyTypeObject*>(tensor.inc_ref().ptr());
        const py::object* dtypes[4] = {&f16, &bf16, &f32, &f64};
        for (int i = 0; i < 4; ++i) torch_types.dtypes[i] = dtypes[i]->inc_ref().ptr();
        torch_types.strided = strided.inc_ref().ptr();
        torch_types.int64 = int64.inc_ref().ptr();
      },
      py::arg("tensor"), py::arg("float16"), py::arg("bfloat16"), py::arg("float32"), py::arg("float64"),
      py::arg("strided"), py::arg("int64"), "Takes CPU torch tensors wherever the bindings take arrays from now on");

  m.def(
      "count_batch", [](const py::object& counter) { ++*counter_data(counter); }, py::arg("counter"),
      "Adds one to an int64 counter tensor in place");

  m.def("feature_axes", &feature_axes_of, py::arg("axis"), py::arg("ndim"),
        "The feature axes of an array of ndim dimensions, validated, sorted and non-negative");

  // moments and forward allocate the statistics outputs left None and then return them.
  m.def("moments", &moments_into, py::arg("x").noconvert(), py::arg("axes"), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::arg("mask") = py::none());

  m.def(
      "partial_moments",
      [](const py::object& x, const std::vector<int>& axes, const py::object& mean, const py::object& m2,
         const py::object& mask) {
        const ArrayArg xa = describe(x, "x", false);
        const Geometry g{xa.shape, to_axes(axes)};
        const ArrayArg ma = mask_arg(mask, xa, g);
        const index_t channels = extent(g).channels;
        auto* mu = channel_array<double>(mean, "mean", channels, true);
        auto* sq = channel_array<double>(m2, "m2", channels, true);
        return with_element(xa.element, [&](auto tag) {
          using T = decltype(tag);
          py::gil_scoped_release nogil;
          return partial_moments<T>(g, {static_cast<const T*>(xa.data), xa.strides}, mu, sq, mask_in<T>(ma));
        });
      },
      py::arg("x").noconvert(), py::arg("axes"), py::arg("mean"), py::arg("m2"), py::arg("mask") = py::none());

  m.def("normalize", &normalize_into, py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("axes"),
        py::arg("mean"), py::arg("variance"), py::arg("gamma"), py::arg("beta"), py::arg("epsilon"), py::arg("relu"),
        py::arg("inv_std") = py::none());

  m.def(
      "merge_moments",
      [](const py::object& count_a, const py::object& mean_a, const py::object& m2_a, const py::object& count_b,
         const py::object& mean_b, const py::object& m2_b) {
        if (!is_tensor(count_a) && !py::isinstance<py::array>(count_a))
          throw type_error("count_a must be a NumPy array");
        const auto channels =
            static_cast<index_t>(is_tensor(count_a) ? count_a.attr("numel")().cast<py::ssize_t>()
                                                    : py::reinterpret_borrow<py::array>(count_a).size());
        auto vector = [channels](const py::object& o, const char* name, bool writeable) {
          double* p = channel_array<double>(o, name, channels, writeable);
          const auto ndim =
              is_tensor(o) ? o.attr("dim")().cast<py::ssize_t>() : py::reinterpret_borrow<py::array>(o).ndim();
          if (ndim != 1) throw value_error(std::string(name) + " must be 1-D");
          return p;
        };
        double* na = vector(count_a, "count_a", true);
        double* ma = vector(mean_a, "mean_a", true);
        double* qa = vector(m2_a, "m2_a", true);
        const double* nb = vector(count_b, "count_b", false);
        const double* mb = vector(mean_b, "mean_b", false);
        const double* qb = vector(m2_b, "m2_b", false);
        merge_moments(channels, na, ma, qa, nb, mb, qb);
      },
      py::arg("count_a").noconvert(), py::arg("mean_a"), py::arg("m2_a"), py::arg("count_b"), py::arg("mean_b"),
      py::arg("m2_b"), "Merges the per-channel partials b into a, in place (Chan et al.)");

  m.def("update_running", &update_running_into, py::arg("running_mean"), py::arg("running_var"), py::arg("mean"),
        py::arg("variance"), py::arg("factor"), py::arg("count"),
        "Moves the running statistics toward a batch's, in place, as torch.nn.BatchNorm does");

  m.def(
      "train_forward",
      [](const py::object& x, const py::object& y, const py::object& gamma, const py::object& beta, double epsilon,
         const py::object& mask, const py::object& running_mean, const py::object& running_var, double factor,
         const py::object& counter) {
        // batchnorm.torch's eager training call in one binding (each binding call costs about
        // a microsecond, as much as a small batch's kernels): forward over axis 1, then the
        // running statistics (if given) and num_batches_tracked (if given) move, only after a
        // pass that succeeded. Returns forward's (mean, variance, inv_std, count), allocated.
        std::int64_t* tracked = counter.is_none() ? nullptr : counter_data(counter);  // checked before anything moves
        static const std::vector<int> channel_axis{1};                                // not a vector allocated per call
        const py::tuple r =
            forward_into(x, y, channel_axis, gamma, beta, epsilon, false, py::none(), py::none(), py::none(), mask);
        const auto count = r[3].cast<index_t>();
        if (count && !running_mean.is_none()) update_running_into(running_mean, running_var, r[0], r[1], factor, count);
        if (tracked) ++*tracked;
        return r;
      },
      py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("gamma"), py::arg("beta"), py::arg("epsilon"),
      py::arg("mask"), py::arg("running_mean"), py::arg("running_var"), py::arg("factor"), py::arg("counter"));

  m.def("forward", &forward_into, py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("axes"),
        py::arg("gamma"), py::arg("beta"), py::arg("epsilon"), py::arg("relu"), py::arg("mean") = py::none(),
        py::arg("variance") = py::none(), py::arg("inv_std") = py::none(), py::arg("mask") = py::none());

  m.def(
      "backward",
      [](const py::object& dy, const py::object& x, const py::object& dx, const std::vector<int>& axes,
         const py::object& mean, const py::object& inv_std, const py::object& gamma, const py::object& beta, bool relu,
         const py::object& dgamma, const py::object& dbeta, bool fixed_statistics,
         const py::object& mask) -> py::object {
        if (!dgamma.is_none() || !dbeta.is_none()) {
          backward_into(dy, x, dx, axes, mean, inv_std, gamma, beta, relu, dgamma, dbeta, fixed_statistics, mask);
          return py::none();
        }
        // Both None: allocated like inv_std (the statistics dtype, one per channel) and returned.
        if (!py::isinstance<py::array>(inv_std))
          throw type_error("dgamma and dbeta may be None only with an array inv_std");
        const auto inv = py::reinterpret_borrow<py::array>(inv_std);
        const py::array dg(inv.dtype(), inv.size()), db(inv.dtype(), inv.size());
        backward_into(dy, x, dx, axes, mean, inv_std, gamma, beta, relu, dg, db, fixed_statistics, mask);
        return py::make_tuple(dg, db);
      },
      py::arg("dy").noconvert(), py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("axes"), py::arg("mean"),
      py::arg("inv_std"), py::arg("gamma"), py::arg("beta"), py::arg("relu"), py::arg("dgamma"), py::arg("dbeta"),
      py::arg("fixed_statistics") = false, py::arg("mask") = py::none());

  m.def(
      "backward_sums",
      [](const py::object& dy, const py::object& x, const std::vector<int>& axes, const py::object& mean,
         const py::object& inv_std, const py::object& gamma, const py::object& beta, bool relu,
         const py::object& sum_dy, const py::object& sum_dy_xc) {
        const BackwardArgs a(dy, x, py::handle(), axes);
        double* s = channel_array<double>(sum_dy, "sum_dy", a.channels, true);
        double* sx = channel_array<double>(sum_dy_xc, "sum_dy_xc", a.channels, true);
        with_element(a.x.element, [&](auto tag) {
          using T = decltype(tag);
          Converted conv;
          const auto st = stats_args<stat_t<T>>(mean, inv_std, gamma, beta, a.channels, "mean", "inv_std", conv);
          py::gil_scoped_release nogil;
          backward_sums<T>(a.g, a.dy_in<T>(), a.x_in<T>(), st.mean, st.inv_std, st.affine, activation_of(relu), s, sx);
        });
      },
      py::arg("dy").noconvert(), py::arg("x").noconvert(), py::arg("axes"), py::arg("mean"), py::arg("inv_std"),
      py::arg("gamma"), py::arg("beta"), py::arg("relu"), py::arg("sum_dy"), py::arg("sum_dy_xc"));

  m.def(
      "parameter_gradients",
      [](const py::object& inv_std, const py::object& sum_dy, const py::object& sum_dy_xc, const py::object& dgamma,
         const py::object& dbeta) {
        const auto channels = static_cast<index_t>(py::len(sum_dy));
        const double* s = channel_array<double>(sum_dy, "sum_dy", channels, false);
        const double* sx = channel_array<double>(sum_dy_xc, "sum_dy_xc", channels, false);
        auto fill = [&](auto tag) {
          using S = decltype(tag);
          parameter_gradients<S>(channels, channel_array<S>(inv_std, "inv_std", channels, false), s, sx,
                                 channel_array<S>(dgamma, "dgamma", channels, true),
                                 channel_array<S>(dbeta, "dbeta", channels, true));
        };
        if (holds_float64(inv_std))
          fill(double{});
        else
          fill(float{});
      },
      py::arg("inv_std"), py::arg("sum_dy"), py::arg("sum_dy_xc"), py::arg("dgamma"), py::arg("dbeta"),
      "dgamma and dbeta from backward_sums' sums, as backward computes and rounds them");

  m.def(
      "backward_apply",
      [](const py::object& dy, const py::object& x, const py::object& dx, const std::vector<int>& axes,
         const py::object& mean, const py::object& inv_std, const py::object& gamma, const py::object& beta, bool relu,
         const py::object& sum_dy, const py::object& sum_dy_xc, double count, bool fixed_statistics,
         const py::object& mask) {
        const BackwardArgs a(dy, x, dx, axes);
        const ArrayArg ma = mask_arg(mask, a.x, a.g);
        const double* s = channel_array<double>(sum_dy, "sum_dy", a.channels, false);
        const double* sx = channel_array<double>(sum_dy_xc, "sum_dy_xc", a.channels, false);
        with_element(a.x.element, [&](auto tag) {
          using T = decltype(tag);
          Converted conv;
          const auto st = stats_args<stat_t<T>>(mean, inv_std, gamma, beta, a.channels, "mean", "inv_std", conv);
          py::gil_scoped_release nogil;
          backward_apply<T>(a.g, a.dy_in<T>(), a.x_in<T>(), a.dx_out<T>(), st.mean, st.inv_std, st.affine,
                            activation_of(relu), s, sx, count, statistics_of(fixed_statistics), mask_in<T>(ma));
        });
      },
      py::arg("dy").noconvert(), py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("axes"), py::arg("mean"),
      py::arg("inv_std"), py::arg("gamma"), py::arg("beta"), py::arg("relu"), py::arg("sum_dy"), py::arg("sum_dy_xc"),
      py::arg("count"), py::arg("fixed_statistics") = false, py::arg("mask") = py::none());
}

}  // namespace batchnorm::python
