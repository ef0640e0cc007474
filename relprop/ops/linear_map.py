"""The linear map of a Conv2d or Linear layer (a BatchNorm optionally folded in; a Linear
over channels-last positions as a 1x1 conv, :class:`PerPosition`), its sign-split weights,
its transpose, and the per-sample conv products RSP needs.

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


def output_padding(conv: nn.Conv2d, out_shape, in_shape) -> list[int]:
    """The ``output_padding`` that makes the transposed conv of an output of ``out_shape``
    return ``in_shape`` exactly (a strided conv drops the input's last rows it cannot reach)."""
    return [in_shape[2 + i] - ((out_shape[2 + i] - 1) * conv.stride[i] - 2 * conv.padding[i]
                               + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1) for i in range(2)]


# A Linear layer whose weight is larger than this (VGG16's 4096x4096 classifier layer is
# 64 MiB) forms its sign splits per block of output rows inside each product (:class:`RowSplit`) instead of as whole copies: VGG16's
# first classifier layer has 103 M weights, so ``[W+; W-]`` alone would be 822 MB, more than
# the whole gradient pass needs at batch 8.  Convolution weights are far below it.
STREAM_BYTES = 32 * 2**20
ROW_BLOCK_BYTES = 16 * 2**20


class RowSplit:
    """A sign split ``fn(W)`` of a large Linear weight, never held whole: :meth:`LinearMap.fwd`
    and :meth:`LinearMap.bwd` form it per block of rows (``ROW_BLOCK_BYTES`` each) as they
    multiply.  Same products as the materialised split, up to summation order in ``bwd``."""

    def __init__(self, lin: "LinearMap", fn):
        self.lin, self.fn = lin, fn

    def blocks(self):
        w = self.lin.weight
        step = max(1, ROW_BLOCK_BYTES // max(w[:1].numel() * w.element_size(), 1))
        for start in range(0, w.shape[0], step):
            rows = slice(start, start + step)
            yield rows, self.fn(w[rows])


_SPLITS = {"pos": lambda w: w.clamp(min=0), "neg": lambda w: w.clamp(max=0),
           "abs_neg": lambda w: (-w).clamp(min=0)}
_PAIRS = {"pn": ("pos", "neg"), "pa": ("pos", "abs_neg")}


class PerPosition:
    """A Linear applied to the last dim of a channels-last ``(B, H, W, C)`` tensor (ConvNeXt's
    MLP) seen as the 1x1 conv it is on ``(B, C, H, W)``: the Linear's own weight, viewed as
    ``(out, in, 1, 1)`` at every read, never copied or kept, so that every conv rule applies."""

    stride, padding, dilation, kernel_size, groups, padding_mode = (1, 1), (0, 0), (1, 1), (1, 1), 1, "zeros"

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self.in_channels, self.out_channels = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[:, :, None, None]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


def channels_first(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, C, H, W)`` (contiguous: the fast backends' kernels need it)."""
    return t.permute(0, 3, 1, 2).contiguous()


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H, W, C)``."""
    return t.permute(0, 2, 3, 1).contiguous()


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
        self.is_conv = isinstance(module, (nn.Conv2d, PerPosition))
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
        if self.streams:
            return tuple(RowSplit(self, _SPLITS[h]) for h in _PAIRS[name])
        return self.split(name).chunk(2, dim=0)

    def derived(self, fn) -> torch.Tensor | RowSplit:
        """Weights ``fn(W)`` for an elementwise ``fn`` (a rule's own combination of the
        weights, e.g. LRP-gamma's ``W + g W+``): a tensor, or for a streamed map a
        :class:`RowSplit` formed per block of rows inside each product."""
        return RowSplit(self, fn) if self.streams else fn(self.weight)

    @property
    def streams(self) -> bool:
        """A Linear map too large to hold sign-split copies of (``STREAM_BYTES``): its splits
        are :class:`RowSplit` s, formed per block of rows inside each product."""
        w = self.module.weight
        return not self.is_conv and w.numel() * torch.finfo(self.dtype).bits // 8 > STREAM_BYTES

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
    def fwd(self, x: torch.Tensor, v: torch.Tensor | RowSplit) -> torch.Tensor:
        m = self.module
        if isinstance(v, RowSplit):
            out = x.new_empty(x.shape[:-1] + (self.module.weight.shape[0],))
            for rows, block in v.blocks():
                out[..., rows] = F.linear(x, block)
                del block   # freed before the next is formed: one block alive, not two
            return out
        if self.is_conv:
            return F.conv2d(x, v, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, v)

    def bwd(self, s: torch.Tensor, v: torch.Tensor | RowSplit, x_shape: torch.Size) -> torch.Tensor:
        m = self.module
        if isinstance(v, RowSplit):
            out = None
            for rows, block in v.blocks():
                t = s[..., rows] @ block
                del block   # freed before the next is formed: one block alive, not two
                out = t if out is None else out.add_(t)
            return out
        if not self.is_conv:
            return s @ v
        return F.conv_transpose2d(s, v, None, m.stride, m.padding, output_padding(m, s.shape, x_shape),
                                  m.groups, m.dilation)

    def patch_norms(self, x: torch.Tensor) -> torch.Tensor:
        """The L2 norm of the inputs each output reads (its receptive field within its group),
        shaped to broadcast against an output: a box filter over the per-group sum of ``x^2``
        for a conv (a single-channel conv per group: cheap), ``||x||`` over the last dim for
        a linear.  Bounds ``sum_i |x_i w_i| <= ||x patch|| ||w||`` (Cauchy-Schwarz)."""
        sq = x.detach().square()
        if not self.is_conv:
            return sq.sum(-1, keepdim=True).sqrt_()
        m, g = self.module, self.module_groups
        b, c, h, w = sq.shape
        per_group = sq.view(b, g, c // g, h, w).sum(2)
        box = per_group.new_ones((g, 1) + tuple(m.kernel_size))
        norms = F.conv2d(per_group, box, None, m.stride, m.padding, m.dilation, g).clamp_(min=0).sqrt_()
        cout = m.weight.shape[0]
        return norms.unsqueeze(2).expand(-1, -1, cout // g, -1, -1).reshape(b, cout, *norms.shape[2:])

    def fwd2(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fwd(x, V1), fwd(x, V2))`` for the split ``name`` in one call."""
        if self.module_groups != 1 or self.streams:
            v1, v2 = self.halves(name)
            return self.fwd(x, v1), self.fwd(x, v2)
        z = self.fwd(x, self.split(name))
        return z.chunk(2, dim=1 if self.is_conv else -1)

    def bwd2(self, s1: torch.Tensor, s2: torch.Tensor, name: str, x_shape) -> torch.Tensor:
        """``bwd(s1, V1) + bwd(s2, V2)`` for the split ``name`` in one call."""
        if self.module_groups != 1 or self.streams:
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
    y = F.conv_transpose2d(s.reshape(1, -1, *s.shape[2:]), g.reshape(-1, *g.shape[2:]), None,
                           m.stride, m.padding, output_padding(m, s.shape, x_shape), b * m.groups, m.dilation)
    return y.reshape(b, -1, *y.shape[2:])


class WeightsMap:
    """``v -> a @ v`` with the attention weights ``a`` (B, heads, N, M) held constant (CP-LRP),
    as the linear map the methods' Linear rules take.  It acts on the token dim of ``v``
    (B, heads, M, d), so the rules see it transposed, as a Linear over the last dim: the input
    is ``v^T`` (B, heads, d, M), ``fwd(x, V) = x @ V^T = (V @ v)^T`` and ``bwd(S, V) = S @ V``
    its transpose, with per-sample weights ``V`` (``a`` or its sign splits).  No bias; the
    weights are a forward value of this call, never a parameter."""

    is_conv, kernel_is_1x1, streams, module_groups, bias = False, False, False, 1, None

    def __init__(self, a: torch.Tensor):
        self.weight = a

    @property
    def pos(self) -> torch.Tensor:
        return self.weight.clamp(min=0)

    @property
    def neg(self) -> torch.Tensor:
        return self.weight.clamp(max=0)

    @property
    def abs_neg(self) -> torch.Tensor:
        return (-self.weight).clamp(min=0)

    @property
    def abs(self) -> torch.Tensor:
        return self.weight.abs()

    def derived(self, fn) -> torch.Tensor:
        return fn(self.weight)

    def halves(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(_SPLITS[h](self.weight) for h in _PAIRS[name])

    def fwd(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return x @ v.transpose(-1, -2)

    def bwd(self, s: torch.Tensor, v: torch.Tensor, x_shape=None) -> torch.Tensor:
        return s @ v

    def fwd2(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = self.halves(name)
        return self.fwd(x, v1), self.fwd(x, v2)

    def bwd2(self, s1: torch.Tensor, s2: torch.Tensor, name: str, x_shape=None) -> torch.Tensor:
        v1, v2 = self.halves(name)
        return self.bwd(s1, v1) + self.bwd(s2, v2)
