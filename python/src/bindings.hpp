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

/// Element types the kernels take.
enum class Element { f16, bf16, f32, f64 };

/// An n-d NumPy array as the C++ API sees it: pointer, shape, strides in elements.
struct ArrayArg {
  void* data = nullptr;
  Shape shape;
  Strides strides;
  Element element = Element::f32;
};

/// Describes a data array (x, y, dy, dx); TypeError for unsupported dtypes, ValueError
/// for strides that are not whole elements or unaligned data; `writeable` demands it.
ArrayArg describe(const py::array& a, const char* name, bool writeable);

}  // namespace batchnorm::python
