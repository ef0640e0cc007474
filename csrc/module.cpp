// Makes the op library importable as the Python module relprop._C: importing it runs the
// TORCH_LIBRARY registrations of ops.cpp / cuda_ops.cpp (torch.ops.relprop.*).  It defines no
// Python functions; call the ops through torch.ops.relprop or relprop.extension.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "relprop's C++/CUDA ops (torch.ops.relprop)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
