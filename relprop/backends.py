"""Which compute backends can run the fused relevance primitives, discovered lazily.

A backend is a module exposing the fused primitives of :mod:`relprop.ops` with the same
signatures (``split_scale``, ``split_backward``, ``shift_nonzero``, ``ae_masses``):

* ``torch``  -- :mod:`relprop.ops`, the pure-PyTorch reference; runs everywhere.
* ``triton`` -- :mod:`relprop.kernels`; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``cuda``   -- :mod:`relprop.extension`, the compiled ops ``torch.ops.relprop.*`` (``relprop._C``).

Nothing here imports Triton or the extension until a backend is asked for; an
unavailable backend is reported with its reason, never raised at import time.  A fast
backend falls back to the reference for a call it does not cover (e.g. grouped convs).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "relprop.ops", "triton": "relprop.kernels", "cuda": "relprop.extension"}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends(device: str | torch.device | None = None) -> dict[str, dict]:
    """``{name: {"available": bool, "reason": str}}`` for every backend on ``device``
    (default: CUDA if torch sees a GPU, else CPU)."""
    device = torch.device(device) if device is not None else default_device()
    return {name: {"available": reason is None, "reason": reason or "ok"}
            for name, reason in ((n, unavailable(n, device)) for n in BACKENDS)}


def unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run tensors on ``device``, or None if it can."""
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install triton)"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels need a CUDA device (CPU tensors run only under TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        return None
    return _extension_unavailable(device)


def _extension_unavailable(device: torch.device) -> str | None:
    """The compiled ops are usable when registered (by ``relprop._C`` or a library the user
    loaded) and, for CUDA tensors, when they have CUDA kernels (a CPU-only build has none)."""
    if device.type not in ("cpu", "cuda"):
        return f"the extension has no kernels for {device.type} tensors"
    if not _ops_registered() and importlib.util.find_spec("relprop._C") is None:
        return ("the C++/CUDA extension relprop._C is not built "
                "(RELPROP_BUILD_EXT=1 pip install -e . --no-build-isolation; see csrc/README.md)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        if not _ops_registered():
            importlib.import_module("relprop._C")
        if not torch._C._dispatch_has_kernel_for_dispatch_key("relprop::split_scale", "CUDA"):
            return "relprop._C was built without CUDA kernels (a CPU-only build)"
    return None


def _ops_registered() -> bool:
    return torch._C._dispatch_has_kernel("relprop::split_scale")


def check_backend(backend: str) -> None:
    """Raise if ``backend`` is not a backend name, or names one that cannot run here at all
    (on this machine's default device)."""
    if backend == "auto":
        return
    _check_name(backend)
    reason = unavailable(backend, default_device())
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run tensors on ``device`` with: ``"auto"`` picks the fastest
    available (cuda, then triton, on CUDA tensors; torch on CPU tensors)."""
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        return next(n for n in reversed(BACKENDS) if unavailable(n, device) is None)
    _check_name(backend)
    reason = unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable for {device.type} tensors: {reason}")
    return backend


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")


def operations(backend: str) -> ModuleType:
    """The module implementing the fused primitives for a resolved backend name."""
    return importlib.import_module(_MODULES[backend])
