// Python module entry for msmartcompute._C. Importing it runs the static
// TORCH_LIBRARY registrations; the ops are reached through torch.ops.msmartcompute.
// Compiled by setup.py only: the CMake library is plain C++ with no Python.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "msmartcompute custom ops", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
