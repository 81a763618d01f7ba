// Python module entry point for the compiled extension, without pybind11.
//
// `import mosaic_kernels._C` only has to load the shared library: the static
// initializers of TORCH_LIBRARY (torch_bindings.cpp) then register the ops
// under torch.ops.mosaic_C. The module object itself is empty.
#pragma once

#include <Python.h>

#define MOSAIC_CONCAT_IMPL(A, B) A##B
#define MOSAIC_CONCAT(A, B) MOSAIC_CONCAT_IMPL(A, B)

#define MOSAIC_STRINGIFY_IMPL(A) #A
#define MOSAIC_STRINGIFY(A) MOSAIC_STRINGIFY_IMPL(A)

// Defines PyInit_<NAME>, returning an empty module named NAME.
#define REGISTER_EXTENSION(NAME)                                           \
  PyMODINIT_FUNC MOSAIC_CONCAT(PyInit_, NAME)() {                          \
    static struct PyModuleDef module = {                                   \
        PyModuleDef_HEAD_INIT, MOSAIC_STRINGIFY(NAME), nullptr, 0, nullptr}; \
    return PyModule_Create(&module);                                       \
  }
