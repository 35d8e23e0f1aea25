// Threads, instruction sets, build information, interrupts.
#include "batchnorm/runtime.hpp"
#include "batchnorm/types.hpp"
#include "bindings.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace batchnorm::python {

namespace {

// Ctrl-C during a long call. Python runs signal handlers only in the main thread, with the
// GIL; the kernels run without it. So the core asks, from the calling thread between chunks
// (at most every 50 ms), and on the main thread this takes the GIL and runs the handlers.
// The exception a handler raised (KeyboardInterrupt) is kept until the call has stopped.
unsigned long g_main_thread = 0;
thread_local PyObject* t_error[3] = {nullptr, nullptr, nullptr};  // type, value, traceback

bool python_signal_pending() {
  if (PyThread_get_thread_ident() != g_main_thread) return false;
  const py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() == 0) return false;
  PyErr_Fetch(&t_error[0], &t_error[1], &t_error[2]);
  return true;
}

}  // namespace

void raise_interrupt() {
  if (t_error[0]) {
    PyErr_Restore(t_error[0], t_error[1], t_error[2]);  // steals the references
    t_error[0] = t_error[1] = t_error[2] = nullptr;
  } else {
    PyErr_SetNone(PyExc_KeyboardInterrupt);
  }
}

void register_runtime(py::module_& m) {
  g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
#if defined(__unix__) || defined(__APPLE__)
  // In a forked child the forking thread is the main thread, the one Python runs handlers in.
  pthread_atfork(nullptr, nullptr, [] { g_main_thread = PyThread_get_thread_ident(); });
#endif
  set_interrupt_check(&python_signal_pending);
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
