"""The ``cuda`` backend: relprop's fused primitives on the compiled ops ``torch.ops.relprop.*``.

Same functions, signatures and semantics as the reference in :mod:`relprop.ops`
(``split_scale``, ``split_backward``, ``shift_nonzero``, ``ae_masses``).  The ops come from
the extension module ``relprop._C`` (built by ``setup.py``; see ``csrc/README.md``), which
registers them with CPU and CUDA kernels; if ``torch.ops.relprop`` already holds them (e.g. a
library loaded with ``torch.ops.load_library`` or ``torch.utils.cpp_extension.load``),
``relprop._C`` is not needed.

A call the ops do not cover runs the reference instead, with the same result:

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

from . import ops as _ref
from .ops import SPLIT_RULES, LinearMap


def _registered() -> bool:
    try:
        torch.ops.relprop.split_scale
    except (AttributeError, RuntimeError):
        return False
    return True


if not _registered():
    from . import _C  # noqa: F401  (registers torch.ops.relprop.*)

_OPS = torch.ops.relprop
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _covered(*tensors: torch.Tensor | None) -> bool:
    ts = [t for t in tensors if t is not None]
    first = ts[0]
    if first.dtype not in _DTYPES or first.device.type not in ("cpu", "cuda"):
        return False
    if any(t.dtype != first.dtype or t.device != first.device for t in ts):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def _layer_covered(lin: LinearMap) -> bool:
    m = lin.module
    if isinstance(m, nn.Conv2d):
        return m.groups == 1
    return isinstance(m, nn.Linear)


def _geometry(lin: LinearMap):
    m = lin.module
    if lin.is_conv:
        return list(m.stride), list(m.padding), list(m.dilation)
    return [1], [0], [1]


def split_scale(lin: LinearMap, x: torch.Tensor, r: torch.Tensor, rule: str, alpha: float = 1.0,
                beta: float = 0.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`relprop.ops.split_scale` as one ATen GEMM over the cached ``[W+; V2]`` plus one
    fused epilogue writing ``S1, S2``."""
    split = SPLIT_RULES[rule]
    w = lin.split(split) if _layer_covered(lin) else None
    bias = lin.bias if rule == "alphabeta" else None
    if w is None or not _covered(x, w, r) or (bias is not None and not _covered(x, bias)):
        return _ref.split_scale(lin, x, r, rule, alpha, beta, eps)
    if rule == "zplus":   # the op's alpha-beta, one-sided, with no bias
        rule, beta = "alphabeta", 0.0
    s1, s2 = _OPS.split_scale(x, w, r, bias, *_geometry(lin), rule, float(alpha), float(beta), float(eps))
    return s1, None if _ref.one_sided(rule, beta) else s2


def split_backward(lin: LinearMap, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, split: str,
                   shift_to: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`relprop.ops.split_backward` as one ATen transposed GEMM over ``[S1; S2]`` and
    ``[W+; V2]``, the input product fused with the per-sample sums / non-zero counts, and the
    shift as one more elementwise pass."""
    w = lin.split(split) if _layer_covered(lin) else None
    if shift_to is not None and (shift_to.numel() != x.shape[0] or shift_to.dtype != x.dtype):
        w = None
    if w is None or not _covered(x, w, s1, s2, shift_to):
        return _ref.split_backward(lin, x, s1, s2, split, shift_to)
    return _OPS.split_backward(x, s1, s2, w, *_geometry(lin), split,
                               None if shift_to is None else shift_to.reshape(-1))


def shift_nonzero(c: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """:func:`relprop.ops.shift_nonzero`: one per-sample count, one elementwise pass."""
    per_sample = c.ndim >= 1 and (excess.ndim == 0 or (
        excess.ndim == c.ndim and excess.shape[0] == c.shape[0] and excess.numel() == c.shape[0]))
    if not per_sample or not _covered(c, excess):
        return _ref.shift_nonzero(c, excess)
    return _OPS.shift_nonzero(c, excess.reshape(-1).expand(c.shape[0]).contiguous())


def ae_masses(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relprop.ops.ae_masses`: one per-sample sign-sum reduction, one elementwise pass."""
    if r.ndim < 1 or not _covered(r):
        return _ref.ae_masses(r)
    t, o = _OPS.ae_masses(r)
    return t, o
