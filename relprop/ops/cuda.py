"""The ``cuda`` backend: relprop's fused primitives on the compiled ops ``torch.ops.relprop.*``.

Same functions, signatures and semantics as the reference in :mod:`relprop.ops.reference`
(``split_scale``, ``split_backward``, ``shift_nonzero``, ``ae_masses``).  The ops come from
the extension module ``relprop._C`` (built by ``setup.py``; see ``csrc/README.md``), which
registers them with CPU and CUDA kernels; if ``torch.ops.relprop`` already holds them (e.g. a
library loaded with ``torch.ops.load_library`` or ``torch.utils.cpp_extension.load``),
``relprop._C`` is not needed.

:func:`covers` says which calls the ops take; :mod:`relprop.ops.dispatch` runs the
reference for the others (the same result):

* grouped convolutions (``groups != 1``), layers other than ``nn.Conv2d`` / ``nn.Linear``;
* inputs of mixed dtypes or devices, dtypes other than float32/float64/float16/bfloat16,
  devices other than CPU and CUDA;
* autograd: any input that requires grad while grad mode is on (the ops have no derivative);
* ``shift_nonzero`` with an ``excess`` that is not one value per sample (shape (B, 1, ..., 1)
  or a 0-d tensor), or of another dtype than ``c``; ``split_backward`` with a ``shift_to``
  that is not one value per sample.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .linear_map import LinearMap
from .reference import EPILOGUES, one_sided


def _registered() -> bool:
    try:
        torch.ops.relprop.split_scale
    except (AttributeError, RuntimeError):
        return False
    return True


if not _registered():
    from .. import _C  # noqa: F401  (registers torch.ops.relprop.*)

_OPS = torch.ops.relprop
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def covers(primitive: str, *args, **kwargs) -> bool | str:
    """True if the compiled ops take this call of ``primitive`` (same arguments as the
    reference's), else the reason they do not."""
    return _COVERS[primitive](*args, **kwargs)


def _tensors_covered(*tensors: torch.Tensor | None) -> bool | str:
    ts = [t for t in tensors if t is not None]
    first = ts[0]
    if first.dtype not in _DTYPES:
        return f"no kernels for {first.dtype}"
    if first.device.type not in ("cpu", "cuda"):
        return f"no kernels for {first.device.type} tensors"
    if any(t.dtype != first.dtype or t.device != first.device for t in ts):
        return "tensors of mixed dtypes or devices"
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return "an input requires grad (the ops have no derivative)"
    return True


def _layer_covered(lin: LinearMap) -> bool | str:
    m = lin.module
    if lin.is_conv:   # a Conv2d, or a Linear over channels-last positions as a 1x1 conv
        return True if m.groups == 1 else "grouped convolution"
    return True if isinstance(m, nn.Linear) else f"layer {type(m).__name__}"


def _covers_split_scale(lin, x, r, rule, alpha=1.0, beta=0.0, eps=0.0) -> bool | str:
    layer = _layer_covered(lin)
    if layer is not True:
        return layer
    return _tensors_covered(x, lin.weight, r, lin.bias if EPILOGUES[rule].bias else None)


def _covers_split_backward(lin, x, s1, s2, split, shift_to=None) -> bool | str:
    layer = _layer_covered(lin)
    if layer is not True:
        return layer
    if shift_to is not None and (shift_to.numel() != x.shape[0] or shift_to.dtype != x.dtype):
        return "shift_to is not one value per sample in the input's dtype"
    return _tensors_covered(x, lin.weight, s1, s2, shift_to)


def _covers_shift_nonzero(c, excess) -> bool | str:
    per_sample = c.ndim >= 1 and (excess.ndim == 0 or (
        excess.ndim == c.ndim and excess.shape[0] == c.shape[0] and excess.numel() == c.shape[0]))
    return _tensors_covered(c, excess) if per_sample else "excess is not one value per sample"


def _covers_ae_masses(r) -> bool | str:
    return _tensors_covered(r) if r.ndim >= 1 else "a 0-d tensor"


_COVERS = {"split_scale": _covers_split_scale, "split_backward": _covers_split_backward,
           "shift_nonzero": _covers_shift_nonzero, "ae_masses": _covers_ae_masses}


def _geometry(lin: LinearMap):
    m = lin.module
    if lin.is_conv:
        return list(m.stride), list(m.padding), list(m.dilation)
    return [1], [0], [1]


def split_scale(lin: LinearMap, x: torch.Tensor, r: torch.Tensor, rule: str, alpha: float = 1.0,
                beta: float = 0.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`relprop.ops.reference.split_scale` as one ATen GEMM over the split ``[W+; V2]``
    plus one fused epilogue writing ``S1, S2``."""
    epilogue = EPILOGUES[rule]
    bias = lin.bias if epilogue.bias else None
    beta = 0.0 if epilogue.one_sided == "always" else float(beta)
    s1, s2 = _OPS.split_scale(x, lin.split(epilogue.split), r, bias, *_geometry(lin), epilogue.kernel,
                              float(alpha), beta, float(eps))
    return s1, None if one_sided(rule, beta) else s2


def split_backward(lin: LinearMap, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, split: str,
                   shift_to: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`relprop.ops.reference.split_backward` as one ATen transposed GEMM over
    ``[S1; S2]`` and ``[W+; V2]``, the input product fused with the per-sample sums / non-zero
    counts, and the shift as one more elementwise pass."""
    return _OPS.split_backward(x, s1, s2, lin.split(split), *_geometry(lin), split,
                               None if shift_to is None else shift_to.reshape(-1))


def shift_nonzero(c: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """:func:`relprop.ops.reference.shift_nonzero`: one per-sample count, one elementwise pass."""
    return _OPS.shift_nonzero(c, excess.reshape(-1).expand(c.shape[0]).contiguous())


def ae_masses(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relprop.ops.reference.ae_masses`: one per-sample sign-sum reduction, one
    elementwise pass."""
    t, o = _OPS.ae_masses(r)
    return t, o
