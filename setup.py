"""Build script: the Python package always; the C++/CUDA op library ``relprop._C`` on request
or on a GPU machine.

``RELPROP_BUILD_EXT`` decides whether ``relprop._C`` (csrc/, see csrc/README.md) is built:

* unset / ``auto``: build the CUDA extension only when torch is importable at build time, is a
  CUDA build, nvcc is found AND torch sees a CUDA device.  So ``pip install -e .`` (build
  isolation: no torch in the build env) and any build on a CPU-only machine skip it -- the
  full build takes minutes and the ``torch`` backend needs none of it.  On a GPU machine:
  ``pip install -e . --no-build-isolation`` or ``python setup.py build_ext --inplace``.
* ``1``: build it or fail: the CUDA extension when a CUDA torch and nvcc are present (no device
  needed; compiling on a CPU-only machine works), else the CPU-only op library
  (csrc/ops.cpp, a CppExtension).
* ``0``: never build it.

The CUDA toolkit is looked up as $CUDA_HOME, $CUDA_PATH, the root of the nvcc on PATH (symlinks
resolved), /usr/local/cuda, then the newest /usr/local/cuda-*, keeping the first holding both
bin/nvcc and include/cuda_runtime_api.h (so a wrapper script /usr/local/bin/nvcc does not make
/usr/local the root); CUDA_HOME is set to it before torch.utils.cpp_extension reads it.  The
CUDA 13 wheels keep cusparse.h & co. in <site-packages>/nvidia/cu13/include, which is added to
the C++ include path after the toolkit's (-idirafter).  Kernels target Hopper (sm_90 SASS + compute_90 PTX) unless
TORCH_CUDA_ARCH_LIST is set, which then takes over.
"""
import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import find_packages, setup

CPU_SOURCES = ["csrc/ops.cpp", "csrc/module.cpp"]
CUDA_SOURCES = CPU_SOURCES + ["csrc/cuda_ops.cpp"] + sorted(glob.glob("csrc/*.cu"))


def _find_cuda_home():
    """The CUDA toolkit root (sets $CUDA_HOME), or None if no nvcc is found."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:   # a real toolkit root, not e.g. /usr/local with a wrapper bin/nvcc
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return home
    return None


def _nvidia_includes():
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:   # virtualenv's old site module
        pass
    return sorted({p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "cu*", "include"))})


def _plan():
    """'cuda', 'cpu' or None, with the reason when None."""
    flag = os.environ.get("RELPROP_BUILD_EXT", "auto").lower()
    if flag in ("0", "no", "false", "off"):
        return None, "RELPROP_BUILD_EXT=0"
    forced = flag in ("1", "yes", "true", "on")
    if not all(os.path.exists(s) for s in CPU_SOURCES):
        return None, "csrc/ sources are missing"
    cuda_home = _find_cuda_home()
    try:
        import torch
    except ImportError:
        reason = "torch is not importable at build time (use --no-build-isolation)"
        if forced:
            sys.exit(f"RELPROP_BUILD_EXT=1 but the extension cannot be built: {reason}")
        return None, reason
    if torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    elif cuda_home is None:
        reason = "nvcc was not found"
    else:
        reason = None
    if forced:
        return ("cuda" if reason is None else "cpu"), reason
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device is visible (RELPROP_BUILD_EXT=1 builds it anyway)"
    return ("cuda" if reason is None else None), reason


def _extensions():
    kind, reason = _plan()
    if kind is None:
        print(f"relprop: not building the C++/CUDA extension ({reason}); the torch backend works without it")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3"]
    if kind == "cpu":
        print(f"relprop: building the CPU-only op library relprop._C ({reason})")
        ext = CppExtension("relprop._C", CPU_SOURCES, extra_compile_args={"cxx": cxx})
    else:
        nvcc = ["-O3"]   # no --use_fast_math: the epilogues' divisions must stay IEEE (parity with relprop/ops/reference.py)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]
        # -idirafter: these dirs also hold a cuda_runtime_api.h that must not shadow the toolkit's
        cxx += [f for d in _nvidia_includes() for f in ("-idirafter", d)]
        ext = CUDAExtension("relprop._C", CUDA_SOURCES, extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["relprop", "relprop.*"]) + ["relprop.kernels"],
    package_dir={"relprop": "relprop", "relprop.kernels": "kernels"},
    package_data={"relprop.benchmark": ["weights/*.pt", "weights/README.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
