"""Relevance primitives: the pure-PyTorch reference every kernel is tested against.

Notation of methods.md §1.1: for a Linear/Conv2d layer, ``fwd(x, V)`` is the bias-free
layer map with weights ``V`` and ``bwd(S, V)`` its transpose (the gradient of
``<fwd(x, V), S>`` w.r.t. ``x``).  Every z-rule is ``x * bwd(S, V)`` for some scaled
relevance ``S``.  The sign-split variants compute two products in one call by
concatenating ``[V1; V2]`` along the output channels, as the design asks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b != 0`` and exactly 0 where ``b == 0`` (methods.md §1.2, wjNam repos)."""
    return torch.where(b == 0, torch.zeros((), dtype=a.dtype, device=a.device), a / b)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Zennit's stabiliser: ``z + eps * sign(z)`` with ``sign(0) = +1``."""
    return z + eps * ((z == 0).to(z.dtype) + z.sign())


def psum(t: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over all non-batch dims, shaped to broadcast against ``t``."""
    return t.sum(dim=tuple(range(1, t.ndim)), keepdim=True)


def shift_nonzero(c: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """Uniform shift of RAP/RSP/AE: ``c - [c != 0] * SD(excess, #nonzero(c))`` per sample."""
    nz = (c != 0).to(c.dtype)
    return c - nz * safe_divide(excess, psum(nz))


class LinearMap:
    """The bias-free linear map of a Conv2d or Linear layer, with its sign-split weights.

    ``weight``/``bias`` may differ from the module's (a BatchNorm folded in, see
    :meth:`folded`; a compute ``dtype`` wider than the module's).  The map only reads the
    module, never writes it.  Derived weights (the fold, the sign splits) are built on first
    use and kept for the life of the map, which is one attribution call: nothing derived
    from a parameter or buffer outlives the call, so an in-place change of the model
    (``load_state_dict``, an optimiser step, new BatchNorm statistics) is always seen.
    """

    def __init__(self, module: nn.Module, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None):
        self.module = module
        self.is_conv = isinstance(module, nn.Conv2d)
        self.dtype = dtype or module.weight.dtype
        self._scale, self._shift = scale, shift   # folded BN: W*scale, (b - mean)*scale + beta
        self._cache: dict = {}

    @classmethod
    def folded(cls, module: nn.Module, bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> "LinearMap":
        """The map of ``bn(module(x))`` in inference mode: ``W * s`` and ``(b - mean) * s + beta``
        with ``s = gamma / sqrt(var + eps)``, computed in ``dtype`` (default: the module's)."""
        dtype = dtype or module.weight.dtype
        scale = (bn.running_var.to(dtype) + bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(dtype)
        shift = -bn.running_mean.to(dtype) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(dtype)
        return cls(module, scale, shift, dtype)

    # ---- parameters
    def _cached(self, name, fn):
        hit = self._cache.get(name)
        if hit is None:
            hit = self._cache[name] = fn()
        return hit

    @property
    def weight(self) -> torch.Tensor:
        def build():
            w = self.module.weight.detach().to(self.dtype)
            return w if self._scale is None else w * self._scale.reshape(-1, *([1] * (w.ndim - 1)))
        return self._cached("w", build)

    @property
    def bias(self) -> torch.Tensor | None:
        def build():
            b = self.module.bias
            b = None if b is None else b.detach().to(self.dtype)
            if self._scale is None:
                return b
            return (0 if b is None else b) * self._scale + self._shift
        return self._cached("b", build)

    def split(self, name: str) -> torch.Tensor:
        """Sign-split weights concatenated along output channels, built once per weight:
        ``"pn"`` = ``[W+; W-]``, ``"pa"`` = ``[W+; |W-|]``.  The halves are views."""
        def build():   # written in place into one buffer: no temporaries (rebuilt every call)
            w = self.weight
            out = torch.empty((2 * w.shape[0],) + tuple(w.shape[1:]), dtype=w.dtype, device=w.device)
            pos, neg = out.chunk(2, dim=0)
            torch.clamp(w, min=0, out=pos)
            if name == "pn":
                torch.clamp(w, max=0, out=neg)
            else:
                torch.neg(w, out=neg).clamp_(min=0)
            return out
        return self._cached("split-" + name, build)

    def halves(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(name).chunk(2, dim=0)

    @property
    def pos(self) -> torch.Tensor:
        """W+ = max(W, 0) (a view into whichever split is already built)."""
        built = "split-pa" in self._cache
        return self.halves("pa" if built else "pn")[0]

    @property
    def neg(self) -> torch.Tensor:
        """W- = min(W, 0)."""
        return self.halves("pn")[1]

    @property
    def abs_neg(self) -> torch.Tensor:
        """|W-| = max(-W, 0)."""
        return self.halves("pa")[1]

    @property
    def abs(self) -> torch.Tensor:
        """|W|."""
        return self._cached("abs", lambda: self.weight.abs())

    # ---- maps
    def fwd(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.is_conv:
            return F.conv2d(x, v, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, v)

    def bwd(self, s: torch.Tensor, v: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
        m = self.module
        if not self.is_conv:
            return s @ v
        out_pad = [x_shape[2 + i] - ((s.shape[2 + i] - 1) * m.stride[i] - 2 * m.padding[i]
                                      + m.dilation[i] * (m.kernel_size[i] - 1) + 1) for i in range(2)]
        return F.conv_transpose2d(s, v, None, m.stride, m.padding, out_pad, m.groups, m.dilation)

    def fwd2(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fwd(x, V1), fwd(x, V2))`` for the split ``name`` in one call."""
        if self.module_groups != 1:
            v1, v2 = self.halves(name)
            return self.fwd(x, v1), self.fwd(x, v2)
        z = self.fwd(x, self.split(name))
        return z.chunk(2, dim=1 if self.is_conv else -1)

    def bwd2(self, s1: torch.Tensor, s2: torch.Tensor, name: str, x_shape) -> torch.Tensor:
        """``bwd(s1, V1) + bwd(s2, V2)`` for the split ``name`` in one call."""
        if self.module_groups != 1:
            v1, v2 = self.halves(name)
            return self.bwd(s1, v1, x_shape) + self.bwd(s2, v2, x_shape)
        return self.bwd(torch.cat([s1, s2], dim=1 if self.is_conv else -1), self.split(name), x_shape)

    @property
    def module_groups(self) -> int:
        return getattr(self.module, "groups", 1)

    @property
    def kernel_is_1x1(self) -> bool:
        return self.is_conv and tuple(self.module.kernel_size) == (1, 1)


def conv_weight_grad_per_sample(lin: LinearMap, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``G[b] = d<conv(a[b], W), r[b]>/dW`` for every sample: shape (B, O, C/groups, kh, kw).

    Computed as one grouped weight-gradient with the batch folded into the groups.
    """
    m = lin.module
    b, c = a.shape[:2]
    o = r.shape[1]
    g = m.groups
    grad = torch.nn.grad.conv2d_weight(
        a.reshape(1, b * c, *a.shape[2:]), (b * o, c // g, *m.kernel_size), r.reshape(1, b * o, *r.shape[2:]),
        m.stride, m.padding, m.dilation, b * g)
    return grad.reshape(b, o, c // g, *m.kernel_size)


def conv_per_sample(lin: LinearMap, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``conv(x[b], g[b])`` for every sample (``g`` from :func:`conv_weight_grad_per_sample`)."""
    m = lin.module
    b = x.shape[0]
    y = F.conv2d(x.reshape(1, -1, *x.shape[2:]), g.reshape(-1, *g.shape[2:]), None,
                 m.stride, m.padding, m.dilation, b * m.groups)
    return y.reshape(b, -1, *y.shape[2:])


def conv_transpose_per_sample(lin: LinearMap, s: torch.Tensor, g: torch.Tensor, x_shape) -> torch.Tensor:
    """Transpose of :func:`conv_per_sample`: ``bwd(s[b], g[b])`` for every sample."""
    m = lin.module
    b = s.shape[0]
    out_pad = [x_shape[2 + i] - ((s.shape[2 + i] - 1) * m.stride[i] - 2 * m.padding[i]
                                  + m.dilation[i] * (m.kernel_size[i] - 1) + 1) for i in range(2)]
    y = F.conv_transpose2d(s.reshape(1, -1, *s.shape[2:]), g.reshape(-1, *g.shape[2:]), None,
                           m.stride, m.padding, out_pad, b * m.groups, m.dilation)
    return y.reshape(b, -1, *y.shape[2:])


def vjp(fn, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``d<fn(x), s>/dx`` for an elementwise-local ``fn`` such as a pooling layer."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xg), xg, s)
    return g


def maxpool_ties_split(x: torch.Tensor, r: torch.Tensor, kernel, stride, padding, dilation, ceil_mode) -> torch.Tensor:
    """Gu's max-pool rule: each window's relevance split equally among all its maximal entries."""
    kh, kw = _pair(kernel)
    sh, sw = _pair(stride or kernel)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    bsz, c, h, w = x.shape
    oh, ow = r.shape[2:]
    extra_h = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (w + 2 * pw))
    xp = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=float("-inf"))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = xp.unfold(2, span_h, sh).unfold(3, span_w, sw)[:, :, :oh, :ow, ::dh, ::dw]  # (B,C,OH,OW,kh,kw) view
    ties = (windows == windows.amax(dim=(-2, -1), keepdim=True)).to(x.dtype)
    share = ties * (r[..., None, None] / ties.sum(dim=(-2, -1), keepdim=True))
    cols = share.permute(0, 1, 4, 5, 2, 3).reshape(bsz, c * kh * kw, oh * ow)
    out = F.fold(cols, xp.shape[2:], (kh, kw), (dh, dw), 0, (sh, sw))
    return out[..., ph:ph + h, pw:pw + w]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ----------------------------------------------------------------- fused primitives
# The units a fast backend replaces (relprop.backends dispatches them): the split forward
# with its scaling epilogue, the split transposed pass times the input (optionally with
# the uniform shift), and the per-sample shift and mass normalisation on their own.
# Each takes a non-negative input ``x``; rules keep signed inputs on the plain path.

SPLIT_RULES = {"rap-conv": "pa", "rap-linear": "pa", "alphabeta": "pn", "alphabeta-repo": "pn", "zplus": "pn"}


def split_scale(lin: LinearMap, x: torch.Tensor, r: torch.Tensor, rule: str, alpha: float = 1.0,
                beta: float = 0.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled relevances ``(S1, S2)`` from ``Z1 = fwd(x, W+)`` and ``Z2 = fwd(x, V2)``.

    * ``rap-conv``   (V2 = |W-|): ``S1 = SD(R+, Z1)``, ``S2 = SD(R, Z1 + Z2) + SD(R-, Z2)``
    * ``rap-linear`` (V2 = |W-|): ``S1 = SD(R, Z1)``,  ``S2 = SD(R, Z1 + Z2)``
    * ``alphabeta``  (V2 = W-, Zennit): ``Z1 += b+``, ``Z2 += b-``,
      ``S1 = alpha R / stabilize(Z1, eps)``, ``S2 = -beta R / stabilize(Z2, eps)``
    * ``alphabeta-repo`` (V2 = W-, RAP repository): ``S1 = alpha SD(R, Z1)``, ``S2 = -beta SD(R, Z2)``
    * ``zplus`` (Gu's CLRP z+): ``alphabeta`` with ``beta = 0`` and the bias ignored,
      ``S1 = alpha R / stabilize(Z1, eps)`` (``= R / (Z1 + eps)``, as ``Z1 >= 0``)

    With ``beta == 0`` (always for ``zplus``) only ``Z1`` is computed and ``S2 = None``.
    """
    split = SPLIT_RULES[rule]
    zennit = rule in ("alphabeta", "zplus")
    b = lin.bias if rule == "alphabeta" else None
    if one_sided(rule, beta):
        z1 = lin.fwd(x, lin.pos)
        if b is not None:
            z1 = z1 + bias_view(lin, b.clamp(min=0), z1)
        return (alpha * r / stabilize(z1, eps) if zennit else alpha * safe_divide(r, z1)), None
    z1, z2 = lin.fwd2(x, split)
    if rule == "rap-conv":
        return safe_divide(r.clamp(min=0), z1), safe_divide(r, z1 + z2) + safe_divide(r.clamp(max=0), z2)
    if rule == "rap-linear":
        return safe_divide(r, z1), safe_divide(r, z1 + z2)
    if zennit:
        if b is not None:
            z1 = z1 + bias_view(lin, b.clamp(min=0), z1)
            z2 = z2 + bias_view(lin, b.clamp(max=0), z2)
        return alpha * r / stabilize(z1, eps), -beta * r / stabilize(z2, eps)
    return alpha * safe_divide(r, z1), -beta * safe_divide(r, z2)


def one_sided(rule: str, beta: float) -> bool:
    """Whether ``split_scale`` computes only ``S1`` for this rule."""
    return rule == "zplus" or (rule.startswith("alphabeta") and beta == 0)


def split_backward(lin: LinearMap, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, split: str,
                   shift_to: torch.Tensor | None = None) -> torch.Tensor:
    """``C = x * (bwd(S1, W+) + bwd(S2, V2))`` (``V2`` = W- for ``"pn"``, |W-| for ``"pa"``;
    ``S2 = None`` drops the second term).  With ``shift_to`` (B,), ``C`` is then shifted
    uniformly over its non-zero entries so that each sample sums to ``shift_to``."""
    if s2 is None:
        c = x * lin.bwd(s1, lin.pos, x.shape)
    else:
        c = x * lin.bwd2(s1, s2, split, x.shape)
    if shift_to is None:
        return c
    return shift_nonzero(c, psum(c) - shift_to.reshape(-1, *([1] * (c.ndim - 1))))


def ae_masses(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AE's target and hostile masses per sample: ``T = SD(R+, sum R+)`` (sums to 1) and
    ``O = -SD(R-, sum R-)`` (sums to -1, or 0 where there is no negative relevance)."""
    rp, rn = r.clamp(min=0), r.clamp(max=0)
    return safe_divide(rp, psum(rp)), -safe_divide(rn, psum(rn))


def bias_view(lin: LinearMap, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bias shaped to broadcast against a layer output."""
    return b.reshape(1, -1, *([1] * (like.ndim - 2))) if lin.is_conv else b
