"""Which backend runs the fused relevance primitives: discovery, the one fallback, and the
self-check that ``auto`` trusts.

A backend is a module with the primitives of :mod:`relprop.ops.reference` (same names,
signatures and semantics: ``split_scale``, ``split_backward``, ``shift_nonzero``,
``ae_masses``):

* ``torch``  -- :mod:`relprop.ops.reference`, the pure-PyTorch reference; runs everywhere.
* ``triton`` -- :mod:`relprop.kernels`; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``cuda``   -- :mod:`relprop.ops.cuda`, the compiled ops ``torch.ops.relprop.*`` (``relprop._C``).

A fast backend also has ``covers(primitive, *args, **kwargs) -> True | str``: True when its
kernel takes that call, else the reason it does not.  The fallback is written once, here
(:class:`Operations`): a covered call runs the backend, any other the reference.

**Verified auto.**  Before ``auto`` first uses a fast backend on a device for a dtype, it
runs every covered primitive of that backend on a small conv and linear case against the
reference on that device (:func:`self_check`; milliseconds on a GPU) and keeps the verdict
for the life of the process.  A backend that fails is not used, with one warning naming the
backend, the case and the error; :func:`backends` reports the verdict.  An explicitly
named backend still runs, with one warning if its check failed.

Nothing here imports Triton or the extension until a backend is asked for; an unavailable
backend is reported with its reason, never raised at import time.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn as nn

from . import reference
from .linear_map import LinearMap

BACKENDS = ("torch", "triton", "cuda")
PRIMITIVES = ("split_scale", "split_backward", "shift_nonzero", "ae_masses")
_MODULES = {"torch": "relprop.ops.reference", "triton": "relprop.kernels", "cuda": "relprop.ops.cuda"}

#: The devices on which ``auto`` considers the fast backends, in this order of preference.
#: CPU tensors run the reference: ATen's CPU GEMMs are as fast as the op library's CPU
#: kernels, and Triton on CPU is an interpreter.
AUTO_DEVICES = ("cuda",)
AUTO_ORDER = ("cuda", "triton")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------- availability

def backends(device: str | torch.device | None = None) -> dict[str, dict]:
    """``{name: {"available": bool, "reason": str, "self_check": {dtype: verdict}}}`` for
    every backend on ``device`` (default: CUDA if torch sees a GPU, else CPU).
    ``self_check`` holds the verdicts of the checks this process has run on that device
    (``"passed"`` or ``"failed: ..."``); run one with :func:`self_check`."""
    device = torch.device(device) if device is not None else default_device()
    out = {}
    for name in BACKENDS:
        reason = unavailable(name, device)
        checks = {_dtype_name(k[2]): c.verdict for k, c in _CHECKS.items() if k[:2] == (name, str(device))}
        out[name] = {"available": reason is None, "reason": reason or "ok", "self_check": checks}
    return out


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


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")


# ----------------------------------------------------------------- resolution

def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend to run ``dtype`` tensors on ``device`` with.

    ``"auto"`` picks, on CUDA tensors, the first of cuda, triton that is available and
    passed its :func:`self_check` for this device and dtype, else the reference; on other
    devices the reference.  A named backend must be available (else RuntimeError); it runs
    even if its self-check failed, with one warning saying so."""
    if backend == "auto":
        if device.type not in AUTO_DEVICES:
            return "torch"
        for name in AUTO_ORDER:
            if unavailable(name, device) is None:
                check = self_check(name, device, dtype)
                if check.passed:
                    return name
                check.warn("auto does not use it")
        return "torch"
    _check_name(backend)
    reason = unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable for {device.type} tensors: {reason}")
    if backend != "torch":
        check = self_check(backend, device, dtype)
        if not check.passed:
            check.warn("it runs because it was asked for by name")
    return backend


def operations(backend: str):
    """The fused primitives of a resolved backend name: the reference module for ``torch``,
    else the backend behind the one fallback (:class:`Operations`)."""
    if backend == "torch":
        return reference
    return Operations(backend, importlib.import_module(_MODULES[backend]))


class Operations:
    """A fast backend's primitives with the reference as the one fallback: each call runs the
    backend where its ``covers`` accepts the arguments, else :mod:`relprop.ops.reference`
    (the same result, computed by the reference).  Both are looked up at call time."""

    def __init__(self, name: str, module: ModuleType):
        self.name, self.module = name, module

    def __repr__(self) -> str:
        return f"Operations({self.name!r})"

    def _run(self, primitive: str, args: tuple, kwargs: dict):
        if self.module.covers(primitive, *args, **kwargs) is True:
            return getattr(self.module, primitive)(*args, **kwargs)
        return getattr(reference, primitive)(*args, **kwargs)

    def split_scale(self, *args, **kwargs):
        return self._run("split_scale", args, kwargs)

    def split_backward(self, *args, **kwargs):
        return self._run("split_backward", args, kwargs)

    def shift_nonzero(self, *args, **kwargs):
        return self._run("shift_nonzero", args, kwargs)

    def ae_masses(self, *args, **kwargs):
        return self._run("ae_masses", args, kwargs)


# ----------------------------------------------------------------- self-check

#: Largest error of a checked output, relative to the reference's largest magnitude.
#: float32 allows TF32 (10-bit mantissa), which torch and the kernels use on CUDA where
#: torch's flags allow it; halves are compared with the float32 reference on the same
#: rounded inputs (the kernels accumulate in float32 and round once).
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
_CHECKS: dict[tuple, "SelfCheck"] = {}
_WARNED: set = set()


@dataclass
class SelfCheck:
    """One backend's self-check on one device for one dtype: per case (``primitive[layer,
    variant]``) ``"ok"``, ``"not covered: <reason>"`` (the reference runs those calls) or
    ``"failed: <error>"``."""

    backend: str
    device: str
    dtype: torch.dtype
    results: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> dict[str, str]:
        return {k: v for k, v in self.results.items() if v.startswith("failed")}

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        if self.passed:
            return "passed"
        case, why = next(iter(self.failures.items()))
        more = len(self.failures) - 1
        return f"{why} in {case}" + (f" (and {more} more case{'s' * (more > 1)})" if more else "")

    def warn(self, consequence: str) -> None:
        """One warning per process, backend, device, dtype and consequence."""
        key = (self.backend, self.device, self.dtype, consequence)
        if key in _WARNED:
            return
        _WARNED.add(key)
        warnings.warn(f"relprop: backend {self.backend!r} failed its self-check on {self.device} "
                      f"{_dtype_name(self.dtype)} tensors ({self.verdict}); {consequence}", RuntimeWarning,
                      stacklevel=4)


def self_check(backend: str, device: str | torch.device, dtype: torch.dtype) -> SelfCheck:
    """Run (once per process; later calls return the kept verdict) every primitive of the fast
    ``backend`` on a small conv and linear case against the reference, on ``device`` in
    ``dtype``.  Raises if the backend is unavailable there."""
    device = torch.device(device)
    key = (backend, str(device), dtype)
    if key not in _CHECKS:
        reason = unavailable(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} is unavailable for {device.type} tensors: {reason}")
        _CHECKS[key] = _run_check(backend, device, dtype)
    return _CHECKS[key]


#: (rule, alpha, beta, eps) of the checked split-scale epilogues: every row of EPILOGUES,
#: alpha-beta both two-sided and one-sided.
CHECK_RULES = [("rap-conv", 1.0, 0.0, 0.0), ("rap-linear", 1.0, 0.0, 0.0), ("alphabeta", 2.0, 1.0, 1e-2),
               ("alphabeta", 1.0, 0.0, 1e-2), ("alphabeta-repo", 2.0, 1.0, 0.0), ("zplus", 1.0, 0.0, 1e-6)]


def _run_check(backend: str, device: torch.device, dtype: torch.dtype) -> SelfCheck:
    check = SelfCheck(backend, str(device), dtype)
    fast = importlib.import_module(_MODULES[backend])
    # the reference of a half-precision case runs in float32 on the same rounded values
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    gen = torch.Generator().manual_seed(0)   # never the user's random state
    with torch.no_grad():
        for layer, lin, x, r in _check_layers(gen, device, dtype):
            ref_lin = LinearMap(lin.module, dtype=ref_dtype)
            xr, rr = x.to(ref_dtype), r.to(ref_dtype)
            for rule, alpha, beta, eps in CHECK_RULES:
                args = (rule, alpha, beta, eps)
                _check_case(check, fast, f"split_scale[{layer}, {rule}, beta={beta:g}]", "split_scale",
                            (lin, x, r, *args), lambda: reference.split_scale(ref_lin, xr, rr, *args))
            for split, rule in (("pa", "rap-conv"), ("pn", "alphabeta-repo")):
                s1, s2 = reference.split_scale(lin, x, r, rule, 1.0, 1.0)
                shift_to = r.flatten(1).sum(1)
                for shifted in (None, shift_to):
                    name = f"split_backward[{layer}, {split}{', shift' if shifted is not None else ''}]"
                    _check_case(check, fast, name, "split_backward", (lin, x, s1, s2, split, shifted),
                                lambda s=shifted: reference.split_backward(
                                    ref_lin, xr, s1.to(ref_dtype), s2.to(ref_dtype), split,
                                    None if s is None else s.to(ref_dtype)))
        c = _sparse((3, 4, 5, 6), gen, device, dtype) - _sparse((3, 4, 5, 6), gen, device, dtype)
        excess = torch.randn(3, 1, 1, 1, generator=gen).to(device, dtype)
        _check_case(check, fast, "shift_nonzero", "shift_nonzero", (c, excess),
                    lambda: reference.shift_nonzero(c.to(ref_dtype), excess.to(ref_dtype)))
        _check_case(check, fast, "ae_masses", "ae_masses", (c,), lambda: reference.ae_masses(c.to(ref_dtype)))
    return check


def _check_case(check: SelfCheck, fast: ModuleType, name: str, primitive: str, args: tuple, ref_fn) -> None:
    covered = fast.covers(primitive, *args)
    if covered is not True:
        check.results[name] = f"not covered: {covered}"
        return
    try:
        got = getattr(fast, primitive)(*args)
        ref = ref_fn()
        check.results[name] = _compare(got, ref, check.dtype)
    except Exception as e:   # a kernel that cannot run here fails its check; it is not the user's error
        check.results[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _compare(got, ref, dtype: torch.dtype) -> str:
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    tol = CHECK_TOLERANCE[dtype]
    for g, f in zip(got, ref):
        if f is None or g is None:
            if (f is None) != (g is None):
                return "failed: returned a different number of outputs than the reference"
            continue
        if g.shape != f.shape or g.dtype != dtype:
            return f"failed: returned {tuple(g.shape)} {g.dtype}, expected {tuple(f.shape)} {dtype}"
        g64, f64 = g.double(), f.double()
        if not torch.isfinite(g64).all():
            return "failed: non-finite values where the reference is finite"
        scale = f64.abs().max().item() or 1.0
        err = (g64 - f64).abs().max().item() / scale
        if err > tol:
            return f"failed: error {err:.1e} of the largest magnitude (tolerance {tol:.0e})"
    return "ok"


def _check_layers(gen: torch.Generator, device: torch.device, dtype: torch.dtype):
    """A strided, padded 3x3 conv and a linear layer (weights from ``gen``, not the global
    random state) with non-negative inputs holding exact zeros and signed relevance."""
    conv = nn.utils.skip_init(nn.Conv2d, 3, 5, 3, stride=2, padding=1, device=device, dtype=dtype)
    linear = nn.utils.skip_init(nn.Linear, 9, 4, device=device, dtype=dtype)
    for name, layer, x_shape in (("conv", conv, (2, 3, 7, 6)), ("linear", linear, (3, 9))):
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / 3)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) / 10)
        layer.requires_grad_(False)
        x = _sparse(x_shape, gen, device, dtype)
        r = torch.randn(layer(x).shape, generator=gen).to(device, dtype)
        yield name, LinearMap(layer), x, r


def _sparse(shape, gen, device, dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) - 0.3).clamp(min=0).to(device, dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
