"""Split implicit-GEMM convolutions of a Conv2d (groups = 1): input x (B, C, H, W),
weight W (O, C, KH, KW), output (B, O, OH, OW); any stride, padding, dilation, kernel size.

* forward: ``Z1 = conv(x, W+)``, ``Z2 = conv(x, V2)`` (V2 = |W-| or W-) as one implicit GEMM
  over (B*OH*OW) x O x (C*KH*KW): each x patch tile and W tile is loaded once and feeds
  both products, W+ / V2 formed from the loaded W tile; the split-scale epilogue writes
  S1 (and S2) in (B, O, OH, OW).  Grid ``(cdiv(B*OH*OW, BM), cdiv(O, BN))``.
* transposed: ``C = x * (convT(S1, W+) + convT(S2, V2))`` as the implicit GEMM of the
  data gradient over (B*H*W) x C x (O*KH*KW): row (b, h, w), reduction index (o, i, j)
  gathers ``S[b, o, (h + ph - i*dh)/sh, (w + pw - j*dw)/sw]`` where that is an integer
  inside the output; the epilogue multiplies by x and optionally accumulates per-sample
  sums / non-zero counts of C.  Grid ``(cdiv(B*H*W, BM), cdiv(C, BN))``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import dot_precision, gemm_blocks, new_output
from .epilogue import accumulate_stats, dot, operand, scale_and_store, split_weights


@triton.jit
def _split_conv_fwd_kernel(x_ptr, w_ptr, b_ptr, r_ptr, s1_ptr, s2_ptr,
                           C, H, W, O, OH, OW, M, K, sh, sw, ph, pw, dh, dw, alpha, beta, eps,
                           KH: tl.constexpr, KW: tl.constexpr, RULE: tl.constexpr, TWO: tl.constexpr,
                           ABS_NEG: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """S1, S2 of the split-scale rule RULE for a tile of BM output pixels x BN output channels."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask, n_mask = rm < M, rn < O
    ohw = OH * OW
    b, p = rm // ohw, rm % ohw
    ih0 = (p // OW) * sh - ph
    iw0 = (p % OW) * sw - pw
    x_row = b * (C * H * W)
    acc1 = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)          # reduction index (c, i, j), the layout of W[o]
        k_mask = rk < K
        c, ij = rk // (KH * KW), rk % (KH * KW)
        ih = ih0[:, None] + (ij // KW)[None, :] * dh
        iw = iw0[:, None] + (ij % KW)[None, :] * dw
        x_mask = (m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
        xt = tl.load(x_ptr + x_row[:, None] + c[None, :] * (H * W) + ih * W + iw, mask=x_mask, other=0.0)
        xt = operand(xt, PRECISION)
        wt = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        wt = operand(wt, PRECISION)
        wp, v2 = split_weights(wt, ABS_NEG)
        acc1 = dot(xt, wp, acc1, PRECISION)
        if TWO:
            acc2 = dot(xt, v2, acc2, PRECISION)
    offs = (b * (O * ohw) + p)[:, None] + rn[None, :] * ohw
    scale_and_store(acc1, acc2, b_ptr, rn, n_mask, r_ptr, s1_ptr, s2_ptr, offs, m_mask[:, None] & n_mask[None, :],
                    alpha, beta, eps, RULE, TWO, HAS_BIAS)


@triton.jit
def _split_conv_bwd_kernel(s1_ptr, s2_ptr, w_ptr, x_ptr, c_ptr, sum_ptr, cnt_ptr,
                           C, H, W, O, OH, OW, M, K, sh, sw, ph, pw, dh, dw,
                           KH: tl.constexpr, KW: tl.constexpr, TWO: tl.constexpr, ABS_NEG: tl.constexpr,
                           STATS: tl.constexpr, PRECISION: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C = x * (convT(S1, W+) + convT(S2, V2)) for a tile of BM input pixels x BN input
    channels; with STATS, per-sample sums and non-zero counts of C into ``sum`` / ``cnt``."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask, n_mask = rm < M, rn < C
    hw = H * W
    b, q = rm // hw, rm % hw
    th0 = q // W + ph
    tw0 = q % W + pw
    s_row = b * (O * OH * OW)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)          # reduction index (o, i, j)
        k_mask = rk < K
        o, ij = rk // (KH * KW), rk % (KH * KW)
        th = th0[:, None] - (ij // KW)[None, :] * dh
        tw = tw0[:, None] - (ij % KW)[None, :] * dw
        oh, ow = th // sh, tw // sw
        s_mask = (m_mask[:, None] & k_mask[None, :] & (th >= 0) & (tw >= 0)
                  & (oh * sh == th) & (ow * sw == tw) & (oh < OH) & (ow < OW))
        s_offs = s_row[:, None] + o[None, :] * (OH * OW) + oh * OW + ow
        w_offs = (o * (C * KH * KW) + ij)[:, None] + rn[None, :] * (KH * KW)
        wt = operand(tl.load(w_ptr + w_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0), PRECISION)
        wp, v2 = split_weights(wt, ABS_NEG)
        s1 = operand(tl.load(s1_ptr + s_offs, mask=s_mask, other=0.0), PRECISION)
        acc = dot(s1, wp, acc, PRECISION)
        if TWO:
            s2 = operand(tl.load(s2_ptr + s_offs, mask=s_mask, other=0.0), PRECISION)
            acc = dot(s2, v2, acc, PRECISION)
    offs = (b * (C * hw) + q)[:, None] + rn[None, :] * hw
    mask = m_mask[:, None] & n_mask[None, :]
    c = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * acc).to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs, c, mask=mask)
    if STATS:
        accumulate_stats(c.to(tl.float32), b, m_mask, sum_ptr, cnt_ptr)


def _geometry(module):
    return (*module.stride, *module.padding, *module.dilation)


def split_scale(module, x, w, bias, r, rule: int, abs_neg: bool, two: bool, alpha, beta, eps):
    """(S1, S2 or None) for contiguous x (B, C, H, W), w (O, C, KH, KW), r (B, O, OH, OW);
    ``bias`` (or None) is added to Z1 / Z2 by sign, as the ALPHABETA rule does."""
    bsz, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = r.shape[2:]
    s1 = new_output(r.shape, r)
    s2 = new_output(r.shape, r) if two else None
    m, k = bsz * oh * ow, c * kh * kw
    bm, bn, bk = gemm_blocks(m, o, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(o, bn))
    _split_conv_fwd_kernel[grid](x, w, x if bias is None else bias, r, s1, s1 if s2 is None else s2,
                                 c, h, wd, o, oh, ow, m, k, *_geometry(module),
                                 float(alpha), float(beta), float(eps), KH=kh, KW=kw, RULE=rule, TWO=two,
                                 ABS_NEG=abs_neg, HAS_BIAS=bias is not None, PRECISION=dot_precision(x, conv=True),
                                 BM=bm, BN=bn, BK=bk)
    return s1, s2


def split_backward(module, x, w, s1, s2, abs_neg: bool, stats):
    """C = x * (convT(S1, W+) + convT(S2, V2)) for contiguous x, w, s1/s2; ``stats`` =
    (sums, counts) buffers to accumulate into, or None."""
    bsz, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = s1.shape[2:]
    out = new_output(x.shape, x)
    m, k = bsz * h * wd, o * kh * kw
    bm, bn, bk = gemm_blocks(m, c, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(c, bn))
    sums, counts = stats if stats is not None else (out, out)
    _split_conv_bwd_kernel[grid](s1, s1 if s2 is None else s2, w, x, out, sums, counts,
                                 c, h, wd, o, oh, ow, m, k, *_geometry(module),
                                 KH=kh, KW=kw, TWO=s2 is not None, ABS_NEG=abs_neg, STATS=stats is not None,
                                 PRECISION=dot_precision(x, conv=True), BM=bm, BN=bn, BK=bk)
    return out
