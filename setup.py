"""Build script: the Python package always; the C++/CUDA extension ``relprop._C`` only when a
CUDA build of torch and nvcc are present (or ``RELPROP_BUILD_EXT=1`` forces it,
``RELPROP_BUILD_EXT=0`` skips it)."""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}


def _want_extension() -> bool:
    flag = os.environ.get("RELPROP_BUILD_EXT", "auto").lower()
    if flag in ("0", "no", "false"):
        return False
    sources = glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")
    if not sources:
        reason = "csrc/ holds no sources yet"
    else:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME
        except ImportError:
            reason = "torch is not installed at build time"
        else:
            reason = None
            if torch.version.cuda is None:
                reason = "torch is a CPU-only build"
            elif CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
                    os.path.join(CUDA_HOME or "", "bin", "nvcc")):
                reason = "nvcc was not found"
    if flag in ("1", "yes", "true"):
        if reason:
            sys.exit(f"RELPROP_BUILD_EXT=1 but the extension cannot be built: {reason}")
        return True
    if reason:
        print(f"relprop: skipping the C++/CUDA extension ({reason}); the torch backend works without it")
        return False
    return True


if _want_extension():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext_modules = [CUDAExtension(
        "relprop._C", sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode", "arch=compute_90,code=sm_90"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(
    packages=find_packages(include=["relprop", "relprop.*"]) + ["relprop.kernels"],
    package_dir={"relprop": "relprop", "relprop.kernels": "kernels"},
    package_data={"relprop.benchmark": ["weights/*.pt", "weights/README.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
