"""Which compute backends can run the relevance primitives, discovered lazily.

``torch`` (the pure-PyTorch reference) runs everywhere.  ``triton`` and ``cuda`` (the
compiled extension) are looked up only when asked for; their absence is reported with a
reason, never raised at import time.
"""
from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("torch", "triton", "cuda")


def backends() -> dict[str, dict]:
    """``{name: {"available": bool, "reason": str}}`` for every backend."""
    return {name: {"available": reason is None, "reason": reason or "ok"}
            for name, reason in ((n, _unavailable(n)) for n in BACKENDS)}


def _unavailable(name: str) -> str | None:
    if name == "torch":
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        return "relprop's Triton kernels are not implemented yet (fused kernels issue)"
    if importlib.util.find_spec("relprop._C") is None:
        return "the C++/CUDA extension relprop._C is not built (pip install -e . on a machine with nvcc and CUDA torch)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return "relprop's CUDA kernels are not implemented yet (fused kernels issue)"


def resolve_backend(backend: str) -> str:
    """The backend to use for ``backend`` ("auto" picks the fastest available)."""
    if backend == "auto":
        return next(n for n in reversed(BACKENDS) if _unavailable(n) is None)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    reason = _unavailable(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    return backend
