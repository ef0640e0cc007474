"""Tensor helpers every rule and primitive shares: the safe divide, the stabiliser, the
per-sample sum, the vector-Jacobian product of a local operation, the max-pool tie split,
the entries a precision's rounding can decide (near ties, near zeros) and per-channel counts
and mean squares.

Notation of methods.md §1.2: ``SD(a, b)`` is the safe divide of the authors' code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0`` and exactly 0 where ``b == 0`` (methods.md §1.2, wjNam repos)."""
    return torch.where(b == 0, torch.zeros((), dtype=a.dtype, device=a.device), a / b)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Zennit's stabiliser: ``z + eps * sign(z)`` with ``sign(0) = +1``."""
    # two passes where z + eps * sign(z) takes five; the same values (z +/- eps in z's dtype,
    # NaN stays NaN: NaN >= 0 is false, NaN - eps is NaN)
    e = torch.tensor(eps, dtype=z.dtype, device=z.device)
    return torch.where(z >= 0, e, -e).add_(z)


def psum(t: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over all non-batch dims, shaped to broadcast against ``t``."""
    return t.sum(dim=tuple(range(1, t.ndim)), keepdim=True)


def vjp(fn, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``d<fn(x), s>/dx`` for an elementwise-local ``fn`` such as a pooling layer."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xg), xg, s)
    return g


def maxpool_windows(x: torch.Tensor, out_hw, kernel, stride, padding, dilation) -> torch.Tensor:
    """The (B, C, OH, OW, kh, kw) windows of a 2-d max pool over ``x`` whose output is
    ``out_hw`` (padding, and the extra row/column of ``ceil_mode``, read as -inf): a view of
    one padded copy of ``x``."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride or kernel)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    h, w = x.shape[2:]
    oh, ow = out_hw
    extra_h = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (w + 2 * pw))
    xp = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=float("-inf"))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    return xp.unfold(2, span_h, sh).unfold(3, span_w, sw)[:, :, :oh, :ow, ::dh, ::dw]


def maxpool_ties_split(x: torch.Tensor, r: torch.Tensor, kernel, stride, padding, dilation, ceil_mode) -> torch.Tensor:
    """Gu's max-pool rule: each window's relevance split equally among all its maximal entries."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride or kernel)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    bsz, c, h, w = x.shape
    oh, ow = r.shape[2:]
    windows = maxpool_windows(x, (oh, ow), kernel, stride, padding, dilation)
    ties = (windows == windows.amax(dim=(-2, -1), keepdim=True)).to(x.dtype)
    share = ties * (r[..., None, None] / ties.sum(dim=(-2, -1), keepdim=True))
    cols = share.permute(0, 1, 4, 5, 2, 3).reshape(bsz, c * kh * kw, oh * ow)
    hp = (oh - 1) * sh + dh * (kh - 1) + 1
    wp = (ow - 1) * sw + dw * (kw - 1) + 1
    out = F.fold(cols, (max(hp, h + 2 * ph), max(wp, w + 2 * pw)), (kh, kw), (dh, dw), 0, (sh, sw))
    return out[..., ph:ph + h, pw:pw + w]


def maxpool_near_ties(x: torch.Tensor, out_hw, kernel, stride, padding, dilation, tol: float) -> torch.Tensor:
    """Per window of a 2-d max pool (B, C, OH, OW): its two largest entries differ by at most
    ``tol`` times the largest's magnitude -- a winner that rounding errors of that relative
    size can change.  An exact tie is a near tie too (rounding may have made it: another
    precision then picks a winner where this one picks the first), except at 0, where ReLU
    zeros tie in every precision."""
    windows = maxpool_windows(x, out_hw, kernel, stride, padding, dilation).flatten(-2)
    if windows.shape[-1] < 2:
        return torch.zeros(windows.shape[:-1], dtype=torch.bool, device=x.device)
    top = windows.topk(2, dim=-1).values
    first, second = top[..., 0], top[..., 1]
    return (first - second <= tol * first.abs()) & (first != 0)


def near_zero_bound(z: torch.Tensor, tol: float) -> torch.Tensor:
    """``tol`` times the largest magnitude in each channel of each sample of ``z`` (dim 1 of a
    ``(B, C, ...)`` tensor; over the features of a ``(B, F)`` one), shaped to broadcast
    against ``z``: the distance from 0 within which rounding errors of that relative size can
    put an entry on either side.  A min/max reduction: no copy of ``z``."""
    if z.ndim > 2:
        lo, hi = torch.aminmax(z.reshape(z.shape[0], z.shape[1], -1), dim=2)
        shape = z.shape[:2] + (1,) * (z.ndim - 2)
    else:
        lo, hi = torch.aminmax(z, dim=1, keepdim=True)
        shape = lo.shape
    return (torch.maximum(hi, lo.neg()) * tol).reshape(shape)


def entries_near(z: torch.Tensor, bound: torch.Tensor, point: float = 0.0) -> torch.Tensor:
    """The entries of ``z`` within ``bound`` (broadcast against ``z``) of ``point``, strictly;
    at ``point == 0`` not an entry exactly 0 (see :func:`near_zero_entries`).  Temporaries:
    two boolean copies of ``z``."""
    near = z.lt(bound + point)
    near &= z.gt(point - bound)
    if point == 0:
        near &= z.ne(0)
    return near


def near_zero_entries(z: torch.Tensor, tol: float) -> torch.Tensor:
    """The non-zero entries of ``z`` nearer to 0 than :func:`near_zero_bound` (a channel that
    is 0 throughout has no scale and no entry near 0).  An entry exactly 0 is not near 0: a
    floating-point sum is exactly 0 only where its terms cancel exactly, in practice where they
    are all 0 (a conv over ReLU zeros, zero padding), and then it is 0 in every precision, as
    is its ReLU's decision.  Temporaries: two boolean copies of ``z``."""
    return entries_near(z, near_zero_bound(z, tol))


def near_zero_counts(z: torch.Tensor, tol: float, chunks: int = 8) -> torch.Tensor:
    """``(B, C)``: how many entries of each channel of each sample :func:`near_zero_entries`
    marks, counted over at most ``chunks`` slices of the channels, so the temporaries are
    two float copies of a slice (``1 / chunks`` of ``z``), not a mask and its integer sum."""
    bound = near_zero_bound(z, tol)
    counts = torch.empty(z.shape[:2], dtype=torch.float32, device=z.device)
    step = -(-z.shape[1] // chunks)
    dims = tuple(range(2, z.ndim))
    for c in range(0, z.shape[1], step):
        zc, bc = z[:, c:c + step], bound[:, c:c + step] if bound.shape[1] > 1 else bound
        # sign(max(bound - |z|, 0)) sign(|z|) is 1 where 0 < |z| < bound, else 0
        size = zc.abs()
        near = size.neg().add_(bc).clamp_(min=0).sign_().mul_(size.sign_())
        del size
        counts[:, c:c + step] = near.sum(dims, dtype=torch.float32) if dims else near
    return counts


def masked_square_sums(g: torch.Tensor, marks, chunks: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C)`` sums of ``g ** 2`` over the entries ``marks(c0, c1)`` marks (a boolean tensor
    shaped like ``g[:, c0:c1]``), and their counts, per channel of each sample, over at most
    ``chunks`` slices of the channels (temporaries of a slice); float32 for a half ``g``."""
    dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    sq = torch.empty(g.shape[:2], dtype=dtype, device=g.device)
    counts = torch.empty_like(sq)
    step = -(-g.shape[1] // chunks)
    dims = tuple(range(2, g.ndim))
    for c in range(0, g.shape[1], step):
        m = marks(c, c + step)
        picked = torch.where(m, g[:, c:c + step], 0).to(dtype).square_()
        sq[:, c:c + step] = picked.sum(dims) if dims else picked
        counts[:, c:c + step] = m.sum(dims, dtype=dtype) if dims else m
    return sq, counts


def mean_square_per_channel(t: torch.Tensor) -> torch.Tensor:
    """``(B, C)``: the mean of ``t ** 2`` over each channel of each sample (``(B, F)``: the
    squares), from a norm reduction (no copy of ``t``); float32 for a half ``t``."""
    flat = t.reshape(t.shape[0], t.shape[1], -1)
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    return torch.linalg.vector_norm(flat, dim=2, dtype=dtype).square_().div_(flat.shape[2])


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
