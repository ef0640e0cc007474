"""Shared test fixtures: the golden reference folder and its model builders, and the
compiled op library of the ``cuda`` backend."""
import importlib
import importlib.util
import os
import pathlib
import shutil

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(os.environ.get("RELPROP_GOLDEN", ROOT.parent / "shared" / "golden"))


def load_golden_models():
    spec = importlib.util.spec_from_file_location("golden_models", GOLDEN / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def golden_models():
    if not (GOLDEN / "models.py").exists():
        pytest.fail(f"golden reference folder not found at {GOLDEN} (set RELPROP_GOLDEN)")
    return load_golden_models()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ext():
    """``relprop.extension`` on torch.ops.relprop: the installed relprop._C if importable, else
    csrc/ops.cpp JIT-built (CPU kernels only) into build/relprop-ext-cpu."""
    if not torch._C._dispatch_has_kernel("relprop::split_scale"):
        try:
            importlib.import_module("relprop._C")
        except ImportError:
            if shutil.which("c++") is None and shutil.which("g++") is None:
                pytest.skip("no C++ compiler to build csrc/ops.cpp")
            from torch.utils.cpp_extension import load
            build = ROOT / "build" / "relprop-ext-cpu"
            build.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("MAX_JOBS", "2")
            load(name="relprop_ops_cpu", sources=[str(ROOT / "csrc" / "ops.cpp")], extra_cflags=["-O2"],
                 is_python_module=False, build_directory=str(build), verbose=False)
    assert torch._C._dispatch_has_kernel("relprop::split_scale")
    return importlib.import_module("relprop.extension")


class CountingOps:
    """Stands in for the extension's op library (``relprop.extension._OPS``) and counts the
    calls into it by op name, so a test can tell the native kernels ran."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __getattr__(self, name):
        op = getattr(self.inner, name)

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return op(*args)
        return call
