// Threads, instruction sets, build information.
#include "batchnorm/runtime.hpp"
#include "batchnorm/types.hpp"
#include "bindings.hpp"

namespace batchnorm::python {

void register_runtime(py::module_& m) {
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads, py::arg("n"));
  m.def("compiled_isas", &compiled_isas);
  m.def("supported_isas", &supported_isas);
  m.def("active_isa", &active_isa);
  m.def("max_isa", &max_isa);
  m.def("compiler", &compiler);
  m.def("has_openmp", &has_openmp);
  m.def(
      "copy_memory",
      [](const py::array& src, const py::array& dst, bool nontemporal) {
        if (!(src.flags() & py::array::c_style) || !(dst.flags() & py::array::c_style))
          throw value_error("copy_memory needs C-contiguous arrays");
        if (!dst.writeable()) throw value_error("copy_memory: dst is read-only");
        if (src.nbytes() != dst.nbytes()) throw value_error("copy_memory needs arrays of the same size in bytes");
        const void* from = src.data();
        void* to = const_cast<void*>(dst.data());
        const auto bytes = static_cast<std::size_t>(src.nbytes());
        // Touches only the two buffers, which the arguments keep alive.
        py::gil_scoped_release nogil;
        copy_memory(from, to, bytes, nontemporal);
      },
      py::arg("src").noconvert(), py::arg("dst").noconvert(), py::arg("nontemporal"),
      "Parallel copy between two C-contiguous arrays of equal size (the benchmarks' yardstick)");
}

}  // namespace batchnorm::python
