// Shared declarations of the binding files.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "batchnorm/types.hpp"

namespace batchnorm::python {

namespace py = pybind11;

void register_runtime(py::module_& m);
void register_functional(py::module_& m);
void register_fast_path(py::module_& m);

/// Sets the Python error for a call the core stopped (batchnorm::interrupted): the exception
/// a signal handler raised meanwhile, else KeyboardInterrupt.
void raise_interrupt();

/// Element types the kernels take.
enum class Element { f16, bf16, f32, f64 };

/// An n-d NumPy array as the C++ API sees it: pointer, shape, strides in elements.
struct ArrayArg {
  void* data = nullptr;
  Shape shape;
  Strides strides;
  Element element = Element::f32;
};

/// Describes a data array (x, y, dy, dx), a NumPy array or (after use_torch) a CPU torch
/// tensor; TypeError for unsupported dtypes, ValueError for strides that are not whole
/// elements or unaligned data; `writeable` demands it.
ArrayArg describe(py::handle a, const char* name, bool writeable);

/// The element type of a dtype the kernels take (native-order float16/32/64 or bfloat16); false for others.
bool element_if_supported(const py::dtype& dt, Element& e);

// The bindings of moments, normalize, forward and backward (register_functional.cpp), which
// the fast path (register_fast_path.cpp) runs too.
// moments_into and forward_into allocate the statistics outputs left None and then return
// them (with the count for forward); otherwise they return the count.
// A mask (masked statistics) has x's dtype and x's shape without its feature axes.
py::object moments_into(const py::object& x, const std::vector<int>& axes, const py::object& mean,
                        const py::object& variance, const py::object& mask = py::none());
void normalize_into(const py::object& x, const py::object& y, const std::vector<int>& axes, const py::object& mean,
                    const py::object& variance, const py::object& gamma, const py::object& beta, double epsilon,
                    bool relu, const py::object& inv_std);
py::object forward_into(const py::object& x, const py::object& y, const std::vector<int>& axes, const py::object& gamma,
                        const py::object& beta, double epsilon, bool relu, const py::object& mean,
                        const py::object& variance, const py::object& inv_std, const py::object& mask = py::none());
void backward_into(const py::object& dy, const py::object& x, const py::object& dx, const std::vector<int>& axes,
                   const py::object& mean, const py::object& inv_std, const py::object& gamma, const py::object& beta,
                   bool relu, const py::object& dgamma, const py::object& dbeta, bool fixed_statistics,
                   const py::object& mask = py::none());

}  // namespace batchnorm::python
