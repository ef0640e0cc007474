"""RAP -- Relative Attributing Propagation (Nam et al., AAAI 2020; methods.md §2).

* Output Linear ("first propagation", §2.3): the seed (one-hot) enters with the raw
  contributions ``x_i w_ki``, the bias is split between positive and negative evidence,
  then *redistributed*: ``R_in = |C| * sum(C) / sum|C|`` per sample.
* Hidden Linear / Conv (§2.4, §2.5): relevance of both signs flows to all contributors
  in proportion to ``x W+`` and ``x |W-|``; Linear routes ``R-`` through ``W+``, Conv
  through ``|W-|`` (the authors' code differs there, and so do we); then the uniform
  shift of the non-zero entries restores ``sum R``.  Signed inputs (not in the authors'
  nets) are split into ``x+`` and ``|x-|`` passes, each taking its share of ``R`` by
  absolute contribution and shifted to that share's sum (:func:`signed_shares`; the
  authors' code shifts each to the full ``sum R``, doubling it).
* Input conv: z^B with per-image bounds and ``SD``.  BN, ReLU, Dropout: identity; pools
  and residual adds proportional to the input (``SD``).

Generalised beyond the authors' code: BasicBlock ResNets, DenseNet / Inception
concatenations and any input size work, because relevance simply flows through both
residual branches by the proportional Add rule and concatenations are split by slice.
If the output layer is not a Linear, the seed starts as ``z * onehot`` at the output
and every layer uses the hidden rule.  ``add_rule`` (``rules.add_rule``) changes the residual
add only: ``"proportional"`` (default, the signed inputs, as above), ``"abs"`` or ``"equal"``;
``rap-split`` is RAP with ``"abs"``.  Transformers: ``attention_rule="cp-lrp"`` (default)
gives the values of ``a @ v`` (attention weights held constant, >= 0) the hidden Linear rule;
``"attnlrp"`` AttnLRP's rules (rules.attention_layers).
"""
from __future__ import annotations

import torch

from .. import graph as g
from .. import rules
from ..engine import Context, Layer, RuleTable
from ..ops import psum, safe_divide
from . import Method, register


def first_propagation(layer: Layer, pd: torch.Tensor) -> list:
    """Output-layer rule of §2.3 for seed ``pd`` at the output: on ReLU inputs (the authors'
    nets) their pseudo-code, whose closed form is ``R_i = z_k |x_i w_ki| / sum_i' |x_i' w_ki'|``.

    Generalised to signed inputs as that closed form, with ``c = x * bwd(pd, W)``:
    ``R = |c| * sum(pd z) / sum|c|`` (sums per sample; ``z`` with bias), which conserves
    ``sum(pd z)``.  The authors' pseudo-code there splits the bias by ``Pos / (Pos + Neg)``, a
    ratio that is unbounded where ``Pos + Neg = z_k - b_k`` nears 0, and sends both shares
    through the ``x+`` paths only, so a head with ``x+ W+ = 0`` at ``k`` loses them (a
    GELU-headed net's map summed to 20x its logit)."""
    lin, x = layer.lin, layer.x
    if not layer.x_nonneg:
        c = (x * lin.bwd(pd, lin.weight, x.shape)).abs()
        return [c * safe_divide(psum(pd * layer.z), psum(c))]
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z1, z2 = lin.fwd2(xp, "pn")
    z3, z4 = lin.fwd2(xn, "pn")
    r_pp, r_pn, r_np, r_nn = z1 * pd, z2 * pd, z3 * pd, z4 * pd
    pos, neg = psum(r_pp + r_nn), psum(r_pn + r_np)
    b = lin.bias if lin.bias is not None else torch.zeros_like(pd[0])
    b_p = b * pd * safe_divide(pos, pos + neg)
    b_n = b * pd * safe_divide(neg, pos + neg)
    c = (xp * lin.bwd2(safe_divide(r_pp, z1) + safe_divide(b_p, z1), safe_divide(r_pn, z2) + safe_divide(b_n, z2),
                       "pn", x.shape)
         + xn * lin.bwd2(safe_divide(r_np, z3), safe_divide(r_nn, z4), "pn", x.shape))
    p, n = c.clamp(min=0), c.clamp(max=0)
    total = psum(p - n)
    return [(safe_divide(p, total) - safe_divide(n, total)) * psum(p + n)]


def _pos_prop(layer: Layer, x: torch.Tensor, r: torch.Tensor, conv_routing: bool) -> torch.Tensor:
    """One ``pos_prop`` of §2.4/§2.5 for a non-negative input ``x`` (``x+`` or ``|x-|``), in
    its closed form with ``Z+ = fwd(x, W+)``, ``Z- = fwd(x, |W-|)``:

    Linear: ``C = x * (bwd(SD(R, Z+), W+) + bwd(SD(R, Z+ + Z-), |W-|))``
    Conv:   ``C = x * (bwd(SD(R+, Z+), W+) + bwd(SD(R-, Z-) + SD(R, Z+ + Z-), |W-|))``

    then the uniform shift of the non-zero entries restores ``sum R``.  (The authors' masks
    ``[R != 0]`` and ``[Z+ + Z- != 0]`` never change the result: all terms are >= 0.)
    """
    lin, ops = layer.lin, layer.ops
    s1, s2 = ops.split_scale(lin, x, r, "rap-conv" if conv_routing else "rap-linear")
    return ops.split_backward(lin, x, s1, s2, "pa", shift_to=r.flatten(1).sum(1))


def signed_shares(layer: Layer, xp: torch.Tensor, xn: torch.Tensor, r: torch.Tensor) -> tuple:
    """``R`` split between the ``x+`` and the ``|x-|`` inputs of each output ``j`` by their
    absolute contributions, ``A_j = fwd(x+, |W|)`` and ``N_j = fwd(|x-|, |W|)``:
    ``R^- = R * SD(N, A + N)``, ``R^+ = R * SD(A, A + N)`` (``= R`` exactly where ``N = 0``).
    Returns ``(R^+, R^-)``.

    Generalised beyond the authors' code (which meets no signed hidden input: VGG's and
    ResNet's convs read ReLU outputs): there each of the two passes is shifted to the full
    ``sum R``, doubling the sum at every signed layer (§2.4, §8.7), which compounds over a
    ConvNeXt or ViT to sums of 1e4-1e7 for logits of ~10.  Here each pass is shifted to its
    own share, so the layer conserves ``sum R``."""
    lin = layer.lin
    w_abs = lin.derived(torch.abs) if lin.streams else lin.abs
    a, n = lin.fwd(xp, w_abs), lin.fwd(xn, w_abs)
    total = a + n
    rn = r * safe_divide(n, total)
    # R - R^- where N = 0 (exactly R there); R A / (A + N) elsewhere, free of the cancellation
    # R - R^- has where N dominates
    return torch.where(n == 0, r, r * safe_divide(a, total)), rn


# Signed inputs (GELU outputs, LayerNorm outputs) of magnitude up to this count as zero: the
# uniform shift goes to the non-zero entries, and a float32 GELU rounds its outputs below
# ~1.6e-7 to exactly 0 (``1 + erf(x / sqrt 2)`` cancels for x < -5.3) where float64 keeps them,
# so without it the count, and every shifted entry, depended on the precision (rap-split on
# shapes-convnext: float32 1e-2 off float64, now 1.5e-4).  ReLU outputs (the authors' nets)
# keep their exact zeros and are not touched.  In a layer whose largest magnitude is below 1
# the threshold is that much smaller (:func:`signed_zero_threshold`), so that a net of tiny
# activations keeps them (with the fixed threshold a GELU net scaled by 1e-7 lost every entry
# of a layer, and the map was all zeros, unreported).
SIGNED_ZERO = 2.0 ** -21


def signed_zero_threshold(x: torch.Tensor) -> torch.Tensor:
    """``SIGNED_ZERO * min(1, max|x|)`` per leading row of ``x``, shaped to broadcast."""
    scale = x.detach().abs().flatten(1).amax(1).clamp(max=1.0)
    return (SIGNED_ZERO * scale).reshape(-1, *([1] * (x.ndim - 1)))


def hidden(layer: Layer, r: torch.Tensor) -> list:
    """Hidden Linear/Conv rule of RAP (§2.4, §2.5): conserves ``sum R`` per sample.  Generalised
    to signed inputs: entries with ``|x| <= SIGNED_ZERO`` (relative to the layer's largest
    magnitude where that is below 1) count as zero, and the ``x+`` and
    ``|x-|`` passes each take their share of ``R`` (:func:`signed_shares`)."""
    conv = layer.lin.is_conv   # a Conv2d, or a Linear over channels-last positions (a 1x1 conv)
    x = layer.x
    if layer.x_nonneg:
        out = _pos_prop(layer, x, r, conv)   # a ReLU's output: x+ is x (no copy)
        rules.report_zero_crossings(layer, out, rules.near_zero(layer), shift_excess_bound(r))
        return [out]
    # (the count's own threshold, SIGNED_ZERO, is not estimated: a bound of the near-zero form
    # reports every rap-split map of the built-in ConvNeXt and ViT; README, Numerics)
    x = torch.where(x.abs() <= signed_zero_threshold(x), torch.zeros((), dtype=x.dtype, device=x.device), x)
    xp, xn = x.clamp(min=0), (-x).clamp(min=0)
    rp, rn = signed_shares(layer, xp, xn, r)
    return [_pos_prop(layer, xp, rp, conv) + _pos_prop(layer, xn, rn, conv)]


def shift_excess_bound(r: torch.Tensor) -> torch.Tensor:
    """A bound of what ``_pos_prop``'s uniform shift takes from each sample's sum: before it,
    ``sum C - sum R = sum_j R_j f_j`` with ``f_j`` in [-1, 1] (Linear: ``[Z+ != 0] - 1 +
    Z- / (Z+ + Z-)``) or [-2, 2] (Conv, R+ and R- each routed once more), so at most
    ``2 ||R||_1`` (B,); for the count of non-zero entries the shift goes to
    (rules.report_zero_crossings)."""
    return 2 * r.flatten(1).abs().sum(1)


def table(with_head: bool, add_rule: str = "proportional", method: str = "rap",
          attention_rule: str = "cp-lrp") -> RuleTable:
    # normalisations and offsets: the identity, as RAP's (the authors') BatchNorm; its uniform
    # shift makes relevance not proportional to a layer's output (rules.norm_identity)
    by_kind = rules.shared_layers(pool=rules.proportional_pool(), add=rules.add_rule(method, add_rule), norm=None)
    by_kind.update({g.CONV: hidden, g.LINEAR: hidden})
    by_kind.update(rules.attention_layers(method, attention_rule, hidden))
    # signed residual splits (the proportional add rule) carry their errors along the stream
    return RuleTable(by_kind, first=rules.zbox("image", safe_divide),
                     head=first_propagation if with_head else None, name=method,
                     carries_errors=add_rule == "proportional")


@register
class RAP(Method):
    name = "rap"
    summary = "Relative Attributing Propagation: bi-polar relevant/irrelevant attribution (Nam et al. 2020)"

    def __init__(self, add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        self.add_rule, self.attention_rule = add_rule, attention_rule
        self.with_head = table(True, self.add_rule, self.name, attention_rule)
        self.without_head = table(False, self.add_rule, self.name, attention_rule)

    def run(self, ctx: Context) -> torch.Tensor:
        head = ctx.head()
        if head is not None and head.kind == g.LINEAR:
            # the first propagation weights the output layer's contributions by ``pd`` (one-hot:
            # relevance sums to the target logit); a caller's initial_relevance is the output's
            # relevance, as for the LRP family, so it enters as the weight R / z (0 where z = 0)
            pd = safe_divide(ctx.seed, ctx.logits) if ctx.user_seed else ctx.seed
            return ctx.propagate(self.with_head, pd)
        return ctx.propagate(self.without_head, ctx.seed if ctx.user_seed else ctx.logits * ctx.seed)


@register
class RAPSplit(RAP):
    """RAP with residual adds split by ``|x_k| / (|x0| + |x1|)`` (``rules.abs_add``, the ratio
    of LRP-for-ResNet's Relevance Splitting) instead of the signed inputs.  Where a model has
    no residual add (VGG) it is ``rap`` exactly.  On ResNets RAP's signed split meets branches
    that nearly cancel after BatchNorm and hands them large shares of opposite signs; the
    one-signed split does not (README, "Why RAP fails on ResNets")."""

    name = "rap-split"
    summary = "RAP with residual adds split by |x| (LRP-for-ResNet's Relevance Splitting ratio); = rap without adds"

    def __init__(self, add_rule: str = "abs", attention_rule: str = "cp-lrp"):
        super().__init__(add_rule, attention_rule)
