"""Triton backend of relprop's fused relevance primitives, installed as ``relprop.kernels``
(never as a top-level ``kernels`` module) and imported only by the backend dispatch
(:func:`relprop.backends.operations`).  Same signatures and semantics as the references
in :mod:`relprop.ops`:

* :func:`split_scale`    -- split forward + scale epilogue (one GEMM pass, W+ / V2 on the fly)
* :func:`split_backward` -- split transposed pass x input, with the per-sample shift fused
* :func:`shift_nonzero`  -- per-sample uniform shift of the non-zero entries
* :func:`ae_masses`      -- AE's per-sample positive / negative mass normalisation

:func:`covers` says which calls the kernels take; :mod:`relprop.ops.dispatch` runs the
:mod:`relprop.ops.reference` primitive for the others: dtypes other than float32 / float16 /
bfloat16 (so float64 always), tensors of mixed dtypes or devices, CPU tensors without
``TRITON_INTERPRET=1``, empty tensors or tensors of 2**31 elements or more, inputs that
require grad while grad mode is on (the kernels have no derivative), grouped convolutions,
Linear inputs that are not (B, C), batches over 65535 (the per-sample kernels' grid), and
per-sample ``excess`` / ``shift_to`` that do not hold exactly one value per sample.
(String paddings never arrive: graph capture writes ``"valid"`` / ``"same"`` out as integers.)
The split-scale rule codes are :data:`relprop.ops.reference.EPILOGUES`'s.
Half-precision inputs are accumulated in fp32; see README.md here for the kernels' tiling.
"""
from __future__ import annotations

import torch

from relprop.ops.linear_map import LinearMap
from relprop.ops.reference import EPILOGUES, one_sided

from . import elementwise, split_conv, split_linear
from ._common import GEMM_DTYPES, MAX_GRID_Y, per_sample_stats, runnable

__all__ = ["covers", "split_scale", "split_backward", "shift_nonzero", "ae_masses"]


def covers(primitive: str, *args, **kwargs) -> bool | str:
    """True if a kernel takes this call of ``primitive`` (same arguments as the reference's),
    else the reason it does not."""
    return _COVERS[primitive](*args, **kwargs)


def _no_grad_needed(*tensors) -> bool:
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _layer_runnable(lin: LinearMap, x: torch.Tensor, *others) -> bool | str:
    if not runnable(x, lin.weight, *others, dtypes=GEMM_DTYPES):
        return f"{x.dtype} {x.device.type} tensors (or mixed, empty or over 2**31 elements)"
    if not _no_grad_needed(x, *others):
        return "an input requires grad (the kernels have no derivative)"
    if lin.is_conv:
        if lin.module.groups != 1:
            return "grouped convolution"
        return True if x.ndim == 4 else "a conv input that is not (B, C, H, W)"
    return True if x.ndim == 2 else "a Linear input that is not (B, C)"


def _per_sample(c: torch.Tensor, values: torch.Tensor | None) -> bool:
    return c.ndim >= 1 and c.shape[0] <= MAX_GRID_Y and (values is None or values.numel() == c.shape[0])


def _covers_split_scale(lin, x, r, rule, alpha=1.0, beta=0.0, eps=0.0) -> bool | str:
    return _layer_runnable(lin, x, r, lin.bias if EPILOGUES[rule].bias else None)


def _covers_split_backward(lin, x, s1, s2, split, shift_to=None) -> bool | str:
    if shift_to is not None and not _per_sample(x, shift_to):
        return "shift_to is not one value per sample (or a batch over 65535)"
    return _layer_runnable(lin, x, s1, s2, shift_to)


def _covers_shift_nonzero(c, excess) -> bool | str:
    if not (runnable(c, excess) and _no_grad_needed(c, excess)):
        return f"{c.dtype} {c.device.type} tensors (or mixed, empty, over 2**31 elements, or requiring grad)"
    return True if _per_sample(c, excess) else "excess is not one value per sample (or a batch over 65535)"


def _covers_ae_masses(r) -> bool | str:
    if not (runnable(r) and _no_grad_needed(r)):
        return f"{r.dtype} {r.device.type} tensors (or empty, over 2**31 elements, or requiring grad)"
    return True if _per_sample(r, None) else "a 0-d tensor or a batch over 65535"


_COVERS = {"split_scale": _covers_split_scale, "split_backward": _covers_split_backward,
           "shift_nonzero": _covers_shift_nonzero, "ae_masses": _covers_ae_masses}


def split_scale(lin: LinearMap, x: torch.Tensor, r: torch.Tensor, rule: str, alpha: float = 1.0,
                beta: float = 0.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`relprop.ops.reference.split_scale` as one fused split-GEMM kernel (conv or linear)."""
    epilogue = EPILOGUES[rule]
    bias = lin.bias if epilogue.bias else None
    two = not one_sided(rule, beta)
    args = (x.contiguous(), lin.weight.contiguous(), None if bias is None else bias.contiguous(), r.contiguous(),
            epilogue.code, epilogue.split == "pa", two, alpha, beta, eps)
    if lin.is_conv:
        return split_conv.split_scale(lin.module, *args)
    return split_linear.split_scale(*args)


def split_backward(lin: LinearMap, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, split: str,
                   shift_to: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`relprop.ops.reference.split_backward`: one transposed split-GEMM kernel with the
    input multiply (and, with ``shift_to``, the per-sample sums / counts) in its epilogue,
    then one fused shift kernel in place."""
    stats = None if shift_to is None else per_sample_stats(x.shape[0], x.device)
    args = (x.contiguous(), lin.weight.contiguous(), s1.contiguous(), None if s2 is None else s2.contiguous(),
            split == "pa", stats)
    c = split_conv.split_backward(lin.module, *args) if lin.is_conv else split_linear.split_backward(*args)
    if stats is None:
        return c
    return elementwise.shift_with_stats(c, *stats, shift_to)


def shift_nonzero(c: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """:func:`relprop.ops.reference.shift_nonzero`: a non-zero count reduction, then the shift pass."""
    return elementwise.shift_nonzero(c, excess)


def ae_masses(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`relprop.ops.reference.ae_masses`: per-sample sums of R+ and R-, then the normalise pass."""
    return elementwise.ae_masses(r)
