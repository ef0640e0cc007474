"""Split GEMMs of a Linear layer (x (B, C), weight W (O, C)).

* forward: ``Z1 = x W+^T``, ``Z2 = x V2^T`` (V2 = |W-| or W-) in one pass over x and W,
  W+ / V2 formed from the loaded W tile, the split-scale epilogue writing S1 (and S2).
  Grid ``(cdiv(B, BM), cdiv(O, BN))``, K = C.
* transposed: ``C = x * (S1 W+ + S2 V2)`` with the input multiply and (optionally) the
  per-sample sums / non-zero counts in the epilogue.  Grid ``(cdiv(B, BM), cdiv(C, BN))``, K = O.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import dot_precision, gemm_blocks, new_output
from .epilogue import accumulate_stats, dot, operand, scale_and_store, split_weights


@triton.jit
def _split_linear_fwd_kernel(x_ptr, w_ptr, b_ptr, r_ptr, s1_ptr, s2_ptr, B, C, O, alpha, beta, eps,
                             RULE: tl.constexpr, TWO: tl.constexpr, ABS_NEG: tl.constexpr,
                             HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """S1, S2 (B, O) of the split-scale rule RULE for one (BM, BN) tile."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask, n_mask = rm < B, rn < O
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, C, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < C
        xt = tl.load(x_ptr + rm[:, None] * C + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        xt = operand(xt, PRECISION)
        wt = tl.load(w_ptr + rn[None, :] * C + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        wt = operand(wt, PRECISION)
        wp, v2 = split_weights(wt, ABS_NEG)
        acc1 = dot(xt, wp, acc1, PRECISION)
        if TWO:
            acc2 = dot(xt, v2, acc2, PRECISION)
    offs = rm[:, None] * O + rn[None, :]
    scale_and_store(acc1, acc2, b_ptr, rn, n_mask, r_ptr, s1_ptr, s2_ptr, offs, m_mask[:, None] & n_mask[None, :],
                    alpha, beta, eps, RULE, TWO, HAS_BIAS)


@triton.jit
def _split_linear_bwd_kernel(s1_ptr, s2_ptr, w_ptr, x_ptr, c_ptr, sum_ptr, cnt_ptr, B, C, O,
                             TWO: tl.constexpr, ABS_NEG: tl.constexpr, STATS: tl.constexpr,
                             PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C (B, C) = x * (S1 W+ + S2 V2) for one (BM, BN) tile; with STATS, per-sample sums and
    non-zero counts of C into ``sum`` / ``cnt``."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask, n_mask = rm < B, rn < C
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, O, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < O
        s_offs = rm[:, None] * O + rk[None, :]
        s_mask = m_mask[:, None] & k_mask[None, :]
        wt = tl.load(w_ptr + rk[:, None] * C + rn[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        wt = operand(wt, PRECISION)
        wp, v2 = split_weights(wt, ABS_NEG)
        s1 = operand(tl.load(s1_ptr + s_offs, mask=s_mask, other=0.0), PRECISION)
        acc = dot(s1, wp, acc, PRECISION)
        if TWO:
            s2 = operand(tl.load(s2_ptr + s_offs, mask=s_mask, other=0.0), PRECISION)
            acc = dot(s2, v2, acc, PRECISION)
    offs = rm[:, None] * C + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    c = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * acc).to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs, c, mask=mask)
    if STATS:
        accumulate_stats(c.to(tl.float32), rm, m_mask, sum_ptr, cnt_ptr)


def split_scale(x, w, bias, r, rule: int, abs_neg: bool, two: bool, alpha, beta, eps):
    """(S1, S2 or None) for contiguous x (B, C), w (O, C), r (B, O); ``bias`` (or None) is
    added to Z1 / Z2 by sign, as the ALPHABETA rule does."""
    (b, c), o = x.shape, w.shape[0]
    s1 = new_output((b, o), r)
    s2 = new_output((b, o), r) if two else None
    bm, bn, bk = gemm_blocks(b, o, c)
    grid = (triton.cdiv(b, bm), triton.cdiv(o, bn))
    _split_linear_fwd_kernel[grid](x, w, x if bias is None else bias, r, s1, s2 if two else s1, b, c, o,
                                   float(alpha), float(beta), float(eps), RULE=rule, TWO=two, ABS_NEG=abs_neg,
                                   HAS_BIAS=bias is not None, PRECISION=dot_precision(x, conv=False),
                                   BM=bm, BN=bn, BK=bk)
    return s1, s2


def split_backward(x, w, s1, s2, abs_neg: bool, stats):
    """C = x * (S1 W+ + S2 V2) for contiguous x (B, C), w (O, C), s1/s2 (B, O); ``stats``
    = (sums, counts) buffers to accumulate into, or None."""
    (b, c), o = x.shape, w.shape[0]
    out = new_output((b, c), x)
    bm, bn, bk = gemm_blocks(b, c, o)
    grid = (triton.cdiv(b, bm), triton.cdiv(c, bn))
    sums, counts = stats if stats is not None else (out, out)
    _split_linear_bwd_kernel[grid](s1, s1 if s2 is None else s2, w, x, out, sums, counts, b, c, o,
                                   TWO=s2 is not None, ABS_NEG=abs_neg, STATS=stats is not None,
                                   PRECISION=dot_precision(x, conv=False), BM=bm, BN=bn, BK=bk)
    return out
