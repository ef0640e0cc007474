"""AE -- Attribution Equilibrium (Nam & Lee, arXiv 2205.11109; methods.md §4).

Starts from the Grad-CAM channel map at ``init_layer`` scaled to ``|sum| = 1``.  Hidden
conv (k > 1, §4.2), with ``T = R+/sum R+`` (mass 1), ``O = -R-/sum R-`` (mass -1),
``a = x+``: ``C = a*bwd(SD(r T + O, conv(a,|W|)), |W|)`` shifted uniformly by 1, plus
``A = act*bwd(SD(T, conv(act,|W|)), |W|)`` onto active units (``act = [x > 0]``) and
``B = ina*bwd(SD(O, conv(ina,|W|)), |W|)`` onto inactive ones (``ina = [x <= 0]``).  Each
3x3 conv thus sums to ``r - 2`` (0 for the default ``r = 2``: the equilibrium); 1x1
convs use ``T`` instead of ``r T`` and no shift (sum 0).  Input conv: z^B (image bounds,
SD).  Pools on ``x+ + 1e-9``.

Generalised: ``T`` and ``O`` are normalised per sample (the authors' code normalises over
the whole batch, so it only works for B=1); residual adds split relevance in proportion
to ``x+ + 1e-9`` through both branches (the authors' ResNet code discards the skip
branch and crashes before that); concatenations are split by slice.
"""
from __future__ import annotations

import torch

from .. import graph as g
from .. import rules
from ..engine import Context, Layer, RuleTable
from ..ops import psum, safe_divide
from . import Method, layer_name, number, register
from .cam import channel_cam, resolve_layer
from .rsp import _relu_plus_tiny


def conv(ratio: float):
    """AE hidden conv rule (§4.2), normalised per sample.

    Discontinuous at inputs of 0: such an input takes the A term in one precision and the B
    term in another, and the uniform shift's count changes; inputs within rounding of 0 report
    ``|A - B|`` and the shift to the map's estimate (rules.report_zero_crossings)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin, x, ops = layer.lin, layer.x, layer.ops
        w = lin.abs
        a = x.clamp(min=0)
        t, o = ops.ae_masses(r)
        active = x > 0
        on = lin.bwd(safe_divide(t, lin.fwd(active.to(x.dtype), w)), w, x.shape)
        off = lin.bwd(safe_divide(o, lin.fwd((~active).to(x.dtype), w)), w, x.shape)
        extra = torch.where(active, on, off)
        near = rules.near_zero(layer)
        masks_err = None if near is None else on.sub_(off).mul_(near.sqrt()).flatten(1).norm(dim=1)   # near: counts
        del on, off, active
        z = lin.fwd(a, w)
        if lin.kernel_is_1x1:
            out = a * lin.bwd(safe_divide(t + o, z), w, x.shape) + extra
        else:
            tr = ratio * t
            c = a * lin.bwd(safe_divide(tr + o, z), w, x.shape)
            out = ops.shift_nonzero(c, safe_divide(psum(tr), psum(tr))) + extra
        # the shift takes 1 from each sample's sum (ratio * T sums to ratio, the layer to ratio - 1)
        excess = None if lin.kernel_is_1x1 else safe_divide(psum(tr), psum(tr)).flatten()
        rules.report_zero_crossings(layer, out, near, excess, masks_err)
        return [out]
    return rule


def table(ratio: float, add_rule: str = "proportional") -> RuleTable:
    pool = rules.proportional_pool(_relu_plus_tiny)
    by_kind = rules.shared_layers(pool=pool, add=rules.add_rule("ae", add_rule, _relu_plus_tiny), norm=None)
    by_kind[g.CONV] = conv(ratio)
    return RuleTable(by_kind, first=rules.zbox("image", safe_divide), name="ae")


@register
class AE(Method):
    name = "ae"
    summary = "Attribution Equilibrium: balanced positive/negative evidence with ratio r (Nam & Lee 2022)"

    def __init__(self, ratio: float = 2.0, init_layer: str | None = None, add_rule: str = "proportional"):
        number(self.name, "ratio", ratio)
        layer_name(self.name, init_layer)
        if not 1 <= ratio <= 2:
            raise ValueError(f"method {self.name!r}: ratio r must lie in [1, 2], got {ratio}")
        self.ratio, self.init_layer, self.add_rule = ratio, init_layer, add_rule
        self.table = table(ratio, add_rule)

    def grad_node(self, graph: g.Graph) -> g.Node:
        return resolve_layer(graph, self.init_layer)

    def run(self, ctx: Context) -> torch.Tensor:
        node = resolve_layer(ctx.graph, self.init_layer)
        cam = channel_cam(ctx, node)
        ctx.detach()
        r0 = safe_divide(cam, psum(cam).abs())
        return ctx.propagate(self.table, r0, start=node)
