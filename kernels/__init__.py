"""Triton backend of relprop's fused relevance primitives, installed as ``relprop.kernels``
(never as a top-level ``kernels`` module) and imported only by the backend dispatch
(:func:`relprop.backends.operations`).  Same signatures and semantics as the references
in :mod:`relprop.ops`:

* :func:`split_scale`    -- split forward + scale epilogue (one GEMM pass, W+ / V2 on the fly)
* :func:`split_backward` -- split transposed pass x input, with the per-sample shift fused
* :func:`shift_nonzero`  -- per-sample uniform shift of the non-zero entries
* :func:`ae_masses`      -- AE's per-sample positive / negative mass normalisation

A call falls back to the :mod:`relprop.ops` reference when a kernel does not cover it:
dtypes other than float32 / float16 / bfloat16 (so float64 always), tensors of mixed
dtypes or devices, CPU tensors without ``TRITON_INTERPRET=1``, empty tensors or tensors
of 2**31 elements or more, grouped convolutions, Linear inputs that are not (B, C),
batches over 65535 (the per-sample kernels' grid), and per-sample ``excess`` /
``shift_to`` that do not hold exactly one value per sample.  (String paddings never
arrive: graph capture writes ``"valid"`` / ``"same"`` out as integers.)
Half-precision inputs are accumulated in fp32; see README.md here for the kernels' tiling.
"""
from __future__ import annotations

import torch

from relprop import ops as _ref

from . import elementwise, split_conv, split_linear
from ._common import GEMM_DTYPES, MAX_GRID_Y, per_sample_stats, runnable
from .epilogue import RULES

__all__ = ["split_scale", "split_backward", "shift_nonzero", "ae_masses"]


def _layer_runnable(lin: _ref.LinearMap, x: torch.Tensor, *others) -> bool:
    if not runnable(x, lin.weight, *others, dtypes=GEMM_DTYPES):
        return False
    if lin.is_conv:
        m = lin.module
        return m.groups == 1 and x.ndim == 4
    return x.ndim == 2


def _per_sample(c: torch.Tensor, values: torch.Tensor | None) -> bool:
    return c.ndim >= 1 and c.shape[0] <= MAX_GRID_Y and (values is None or values.numel() == c.shape[0])


def split_scale(lin: _ref.LinearMap, x: torch.Tensor, r: torch.Tensor, rule: str, alpha: float = 1.0,
                beta: float = 0.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`relprop.ops.split_scale` as one fused split-GEMM kernel (conv or linear)."""
    bias = lin.bias if rule == "alphabeta" else None
    if not _layer_runnable(lin, x, r, bias):
        return _ref.split_scale(lin, x, r, rule, alpha, beta, eps)
    two = not _ref.one_sided(rule, beta)
    abs_neg = _ref.SPLIT_RULES[rule] == "pa"
    args = (x.contiguous(), lin.weight.contiguous(), None if bias is None else bias.contiguous(), r.contiguous(),
            RULES[rule], abs_neg, two, alpha, beta, eps)
    if lin.is_conv:
        return split_conv.split_scale(lin.module, *args)
    return split_linear.split_scale(*args)


def split_backward(lin: _ref.LinearMap, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, split: str,
                   shift_to: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`relprop.ops.split_backward`: one transposed split-GEMM kernel with the input
    multiply (and, with ``shift_to``, the per-sample sums / counts) in its epilogue, then
    one fused shift kernel in place."""
    if not (_layer_runnable(lin, x, s1, s2) and (shift_to is None or _per_sample(x, shift_to))):
        return _ref.split_backward(lin, x, s1, s2, split, shift_to)
    stats = None if shift_to is None else per_sample_stats(x.shape[0], x.device)
    args = (x.contiguous(), lin.weight.contiguous(), s1.contiguous(), None if s2 is None else s2.contiguous(),
            split == "pa", stats)
    c = split_conv.split_backward(lin.module, *args) if lin.is_conv else split_linear.split_backward(*args)
    if stats is None:
        return c
    return elementwise.shift_with_stats(c, *stats, shift_to)


def shift_nonzero(c: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """:func:`relprop.ops.shift_nonzero`: a non-zero count reduction, then the shift pass."""
    if not (runnable(c, excess) and _per_sample(c, excess)):
        return _ref.shift_nonzero(c, excess)
    return elementwise.shift_nonzero(c, excess)


def ae_masses(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relprop.ops.ae_masses`: per-sample sums of R+ and R-, then the normalise pass."""
    if not (runnable(r) and _per_sample(r, None)):
        return _ref.ae_masses(r)
    return elementwise.ae_masses(r)
