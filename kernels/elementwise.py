"""Per-sample shift and AE mass normalisation: one atomic reduction pass and one
elementwise pass over a tensor viewed as (B, N).

Grid of every kernel here: ``(cdiv(N, ELEMENT_BLOCK), B)``; program ``(i, b)`` handles
elements ``i*BLOCK .. (i+1)*BLOCK`` of sample ``b``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ELEMENT_BLOCK, new_output, per_sample_stats
from .epilogue import safe_div


@triton.jit
def _count_nonzero_kernel(c_ptr, cnt_ptr, N, BLOCK: tl.constexpr):
    """``cnt[b] += #{c[b, block] != 0}``."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(c_ptr + b * N + offs, mask=offs < N, other=0.0)
    tl.atomic_add(cnt_ptr + b, tl.sum((c != 0).to(tl.int32), axis=0))


@triton.jit
def _shift_kernel(c_ptr, out_ptr, excess_ptr, sum_ptr, target_ptr, cnt_ptr, N,
                  FROM_SUM: tl.constexpr, BLOCK: tl.constexpr):
    """``out = c - [c != 0] * SD(excess[b], cnt[b])`` with ``excess = sum[b] - target[b]``
    if FROM_SUM else ``excess[b]``.  ``out`` may be ``c`` (in place)."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    c = tl.load(c_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    if FROM_SUM:
        excess = tl.load(sum_ptr + b) - tl.load(target_ptr + b).to(tl.float32)
    else:
        excess = tl.load(excess_ptr + b).to(tl.float32)
    shift = safe_div(excess, tl.load(cnt_ptr + b).to(tl.float32))
    out = c - (c != 0).to(tl.float32) * shift
    tl.store(out_ptr + b * N + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _signed_sums_kernel(r_ptr, pos_ptr, neg_ptr, N, BLOCK: tl.constexpr):
    """``pos[b] += sum(R+)``, ``neg[b] += sum(R-)`` over one block of sample ``b``."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = tl.load(r_ptr + b * N + offs, mask=offs < N, other=0.0).to(tl.float32)
    tl.atomic_add(pos_ptr + b, tl.sum(tl.maximum(r, 0.0), axis=0))
    tl.atomic_add(neg_ptr + b, tl.sum(tl.minimum(r, 0.0), axis=0))


@triton.jit
def _masses_kernel(r_ptr, pos_ptr, neg_ptr, t_ptr, o_ptr, N, BLOCK: tl.constexpr):
    """``T = SD(R+, pos[b])``, ``O = -SD(R-, neg[b])``."""
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r = tl.load(r_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    t = safe_div(tl.maximum(r, 0.0), tl.load(pos_ptr + b))
    o = -safe_div(tl.minimum(r, 0.0), tl.load(neg_ptr + b))
    tl.store(t_ptr + b * N + offs, t.to(t_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptr + b * N + offs, o.to(o_ptr.dtype.element_ty), mask=mask)


def _grid(t: torch.Tensor):
    return (triton.cdiv(t[0].numel(), ELEMENT_BLOCK), t.shape[0])


def shift_with_stats(c: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """In place: ``c - [c != 0] * SD(sums - target, counts)`` per sample, with the
    sums/counts a transposed pass accumulated (``c`` contiguous)."""
    target = target.reshape(-1).contiguous()
    _shift_kernel[_grid(c)](c, c, sums, sums, target, counts, c[0].numel(),
                            FROM_SUM=True, BLOCK=ELEMENT_BLOCK)
    return c


def shift_nonzero(c: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """``c - [c != 0] * SD(excess, #nonzero(c))`` per sample; ``excess`` has one value per sample."""
    c = c.contiguous()
    excess = excess.reshape(-1).contiguous()
    _, counts = per_sample_stats(c.shape[0], c.device)
    n = c[0].numel()
    _count_nonzero_kernel[_grid(c)](c, counts, n, BLOCK=ELEMENT_BLOCK)
    out = new_output(c.shape, c)
    _shift_kernel[_grid(c)](c, out, excess, excess, excess, counts, n, FROM_SUM=False, BLOCK=ELEMENT_BLOCK)
    return out


def ae_masses(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AE's ``T = SD(R+, sum R+)`` and ``O = -SD(R-, sum R-)`` per sample."""
    r = r.contiguous()
    pos = torch.zeros(r.shape[0], dtype=torch.float32, device=r.device)
    neg = torch.zeros_like(pos)
    n = r[0].numel()
    _signed_sums_kernel[_grid(r)](r, pos, neg, n, BLOCK=ELEMENT_BLOCK)
    t, o = new_output(r.shape, r), new_output(r.shape, r)
    _masses_kernel[_grid(r)](r, pos, neg, t, o, n, BLOCK=ELEMENT_BLOCK)
    return t, o
