"""Shared test fixtures: the golden reference cases and their model builders, and the
compiled op library of the ``cuda`` backend.

Golden cases come from two folders: the in-repository subset ``tests/data/golden`` (one
sample of 7 cases, cut by ``scripts/make_golden_subset.py``), always there, and the full
set ``../shared/golden`` (or ``RELPROP_GOLDEN``), checked whenever it is present.  The golden
tests parametrise over :data:`GOLDEN_CASES`, which holds both."""
import functools
import importlib
import importlib.util
import os
import pathlib
import shutil

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(os.environ.get("RELPROP_GOLDEN", ROOT.parent / "shared" / "golden"))
GOLDEN_SUBSET = ROOT / "tests" / "data" / "golden"
GOLDEN_PRESENT = (GOLDEN / "models.py").is_file()
FULL_SET_SKIP = (f"{'../shared/golden' if 'RELPROP_GOLDEN' not in os.environ else 'RELPROP_GOLDEN=' + str(GOLDEN)} "
                 f"not found: full golden set skipped; the in-repo subset tests/data/golden ran")


def _case_params():
    """One ``pytest.param(path)`` per golden case: the subset's (ids ``subset-<name>``) and the
    full set's (ids ``<name>``, as before the subset existed), or, without the full set, one
    placeholder that skips with :data:`FULL_SET_SKIP`."""
    params = [pytest.param(p, id=f"subset-{p.stem}") for p in sorted(GOLDEN_SUBSET.glob("*.pt"))]
    if GOLDEN_PRESENT:
        params += [pytest.param(p, id=p.stem) for p in sorted(GOLDEN.glob("*.pt"))]
    else:
        params.append(pytest.param(None, id="full-set", marks=pytest.mark.skip(reason=FULL_SET_SKIP)))
    return params


GOLDEN_CASES = _case_params()


def load_golden_models(folder=None):
    """The ``models.py`` of a golden folder (default: the full set if present, else the subset)."""
    folder = pathlib.Path(folder) if folder is not None else (GOLDEN if GOLDEN_PRESENT else GOLDEN_SUBSET)
    return _load_models(folder.resolve() / "models.py")


@functools.lru_cache(maxsize=None)
def _load_models(path):
    spec = importlib.util.spec_from_file_location("golden_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_golden_case(path):
    """``(case, models)``: a golden case file and the builders of its own folder."""
    return torch.load(path, weights_only=True), load_golden_models(path.parent)


@pytest.fixture(scope="session")
def golden_models():
    """The golden model builders: the full set's ``models.py``, or the subset's copy of it."""
    return load_golden_models()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ext():
    """``relprop.ops.cuda`` (the cuda backend) on torch.ops.relprop: the installed relprop._C if importable, else
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
    return importlib.import_module("relprop.ops.cuda")


class CountingOps:
    """Stands in for the extension's op library (``relprop.ops.cuda._OPS``) and counts the
    calls into it by op name, so a test can tell the native kernels ran."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __getattr__(self, name):
        op = getattr(self.inner, name)

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return op(*args)
        return call
