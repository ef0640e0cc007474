"""RSP -- Relative Sectional Propagation (Nam et al., AAAI 2021; methods.md §3).

Starts from the Grad-CAM channel map at ``init_layer`` normalised by its maximum
(``R0 = cam / (max cam + 1e-9)``, per sample), so the map sums to ``sum R0``, not the logit.

Hidden conv ("comparative gradients", §3.2): with ``a = x+``, ``P = R+``, ``N = (-R)+``,
the data-dependent kernels ``G+- = d<conv(a, W), P|N>/dW`` replace the layer weights:
``C = 2 (a*bwd(SD(P, conv(a,G+)), G+) - a*bwd(SD(N, conv(a,G-)), G-))`` followed by the
uniform shift by ``sum(P - N)``; 1x1 kernels skip the factor 2 and the shift.  The layer
weights never enter.  Input conv: z^B (image bounds, SD).  Pools on ``x + 1e-9``.

Generalised: the kernels are computed per sample (the authors' code sums them over the
batch, which only works for B=1); residual adds split relevance in proportion to
``x+ + 1e-9`` as the authors' Add does, so ResNets work (their code crashes there);
concatenations are split by slice; any input size works.  The "purging" step of the
released code is a no-op and is not reproduced.  RSP has no Linear rule: ``init_layer``
must lie before the classifier.
"""
from __future__ import annotations

import torch

from .. import graph as g
from .. import rules
from ..engine import Context, Layer, RuleTable
from ..ops import conv_per_sample, conv_transpose_per_sample, conv_weight_grad_per_sample, psum, safe_divide
from . import Method, layer_name, register
from .cam import channel_cam, resolve_layer


def conv(layer: Layer, r: torch.Tensor) -> list:
    """RSP hidden conv rule (§3.2), per sample."""
    lin = layer.lin
    a = layer.x.clamp(min=0)
    p, n = r.clamp(min=0), (-r).clamp(min=0)
    kernels = conv_weight_grad_per_sample(lin, a, torch.cat([p, n], 1))      # [G+; G-]
    za, zb = conv_per_sample(lin, a, kernels).chunk(2, dim=1)
    za, zb = za * (p != 0), zb * (n != 0)
    c = a * conv_transpose_per_sample(lin, torch.cat([safe_divide(p, za), -safe_divide(n, zb)], 1), kernels,
                                      a.shape)
    if lin.kernel_is_1x1:
        return [c]
    excess = psum(p - n)
    out = layer.ops.shift_nonzero(2 * c, excess)
    rules.report_zero_crossings(layer, out, rules.near_zero(layer), excess.flatten())   # the shift's count
    return [out]


# [G+; G-] and the weight gradient that forms them: about four weight-sized tensors per
# sample, so the engine runs a large layer over slices of the batch (Context._apply).
conv.weights_per_sample = 4


def _plus_tiny(x):
    return x + 1e-9


def _relu_plus_tiny(x):
    return x.clamp(min=0) + 1e-9


def table(add_rule: str = "proportional") -> RuleTable:
    by_kind = rules.shared_layers(pool=rules.proportional_pool(_plus_tiny),
                                  add=rules.add_rule("rsp", add_rule, _relu_plus_tiny), norm=None)
    by_kind[g.CONV] = conv
    return RuleTable(by_kind, first=rules.zbox("image", safe_divide), name="rsp")


@register
class RSP(Method):
    name = "rsp"
    summary = "Relative Sectional Propagation: target vs hostile attribution from Grad-CAM channels (Nam et al. 2021)"

    def __init__(self, init_layer: str | None = None, add_rule: str = "proportional"):
        self.init_layer = layer_name(self.name, init_layer)
        self.add_rule = add_rule
        self.table = table(add_rule)

    def grad_node(self, graph: g.Graph) -> g.Node:
        return resolve_layer(graph, self.init_layer)

    def run(self, ctx: Context) -> torch.Tensor:
        node = resolve_layer(ctx.graph, self.init_layer)
        cam = channel_cam(ctx, node)
        ctx.detach()
        r0 = cam / (cam.amax(dim=(1, 2, 3), keepdim=True) + 1e-9)
        return ctx.propagate(self.table, r0, start=node)
