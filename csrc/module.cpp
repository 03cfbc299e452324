// The Python module fluxrt._C: empty. Importing it loads the shared library, whose static TORCH_LIBRARY blocks
// register the fluxrt_C ops (the pattern of pytorch/extension-cpp); callers use torch.ops.fluxrt_C.*.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fluxrt C++/CUDA ops, registered as torch.ops.fluxrt_C",
                               -1, nullptr};
  return PyModule_Create(&module);
}
