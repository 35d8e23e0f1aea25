// batchnorm._core: the compiled module. This file only wires the register_* functions;
// each family of bindings lives in its own file. The public API is python/batchnorm.
#include <pybind11/pybind11.h>

#include "batchnorm/types.hpp"
#include "bindings.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "batchnorm's compiled core (private: use the batchnorm package)";
  m.attr("__version__") = BATCHNORM_VERSION;

  // The core's errors keep their kind: type_error is a TypeError, value_error a ValueError.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const batchnorm::type_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const batchnorm::value_error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const batchnorm::interrupted&) {
      batchnorm::python::raise_interrupt();
    }
  });

  batchnorm::python::register_runtime(m);
  batchnorm::python::register_functional(m);
  batchnorm::python::register_fast_path(m);
}
