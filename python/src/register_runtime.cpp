// Threads, instruction sets, build information.
#include "batchnorm/runtime.hpp"
#include "bindings.hpp"

namespace batchnorm::python {

void register_runtime(py::module_& m) {
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("compiled_isas", &compiled_isas);
  m.def("supported_isas", &supported_isas);
  m.def("active_isa", &active_isa);
  m.def("compiler", &compiler);
  m.def("has_openmp", &has_openmp);
}

}  // namespace batchnorm::python
