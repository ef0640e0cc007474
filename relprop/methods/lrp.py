"""LRP baselines (methods.md §1.4, §1.5).

Two families:

* Zennit-compatible LRP (``lrp-epsilon``, ``lrp-zplus``, ``lrp-alphabeta``, ``lrp-gamma``
  and the composites ``lrp-epsilon-plus[-flat]``, ``lrp-epsilon-alpha2beta1[-flat]``,
  ``lrp-epsilon-gamma-box``; the composites' input layer is Zennit's too): biases in
  the denominators, BatchNorm folded into the conv before it, stabiliser
  ``z + eps*sign(z)``, max-pool as gradient, average pools and residual adds by the
  stabilised proportional ("Norm") rule (``add_rule="abs"`` / ``"equal"``: rules.add_rule).
* ``lrp-rap-repo``: LRP-alpha-beta exactly as the RAP repository computes it (§1.4) on
  ReLU inputs: one denominator per weight sign, biases and BatchNorm ignored, ``SD`` guards,
  z^B with ``+1e-9`` at the input.  The golden ``lrp_*`` cases use it.  On signed inputs
  (not in the authors' nets) each sign group shares one denominator, which conserves where
  the repository's code doubles the sum (:func:`alphabeta_rap_repo`).

Transformers: ``attention_rule="cp-lrp"`` (default) holds the attention weights constant and
gives ``a @ v`` the method's Linear rule (epsilon, z+, alpha-beta, gamma, or the RAP
repository's alpha-beta for ``lrp-rap-repo``); ``"attnlrp"`` takes AttnLRP's softmax and
half/half product rules with the method's quotient (rules.attention_layers).

Relevance starts as ``z_t`` at the target logit (``z * onehot``), or as the
``initial_relevance`` given by the caller.
"""
from __future__ import annotations

import torch

from .. import graph as g
from .. import rules
from ..engine import Context, Layer, RuleTable, epsilon_zone_error
from ..ops import bias_view, safe_divide, stabilize
from . import Method, number, register, zb_bounds as check_bounds

FIRST_LAYER_CHOICES = ("zb", "flat", "same")


# ----------------------------------------------------------------------------- rules
def epsilon(eps: float):
    """LRP-epsilon: ``R_in = x * bwd(R / stabilize(z, eps), W)``, ``z`` with bias; reports the
    error that pre-activations near ``eps`` make of rounding (:func:`epsilon_zone_error`)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin = layer.lin
        s = r / stabilize(layer.z, eps)
        out = layer.x * lin.bwd(s, lin.weight, layer.x.shape)
        if layer.report is not None and eps > 0:
            layer.report(*epsilon_zone_error(layer, s, eps, out))
        return [out]
    return rule


def alphabeta(alpha: float, beta: float, eps: float):
    """Zennit's alpha-beta: activating terms ``x+W+ (+b+)``, ``x-W-`` share one stabilised
    denominator, inhibiting terms ``x+W- (+b-)``, ``x-W+`` another;
    ``R_in = alpha * activating - beta * inhibiting``.  alpha=1, beta=0 is z+ (the
    inhibiting terms are then not computed)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin, x, ops = layer.lin, layer.x, layer.ops
        if layer.x_nonneg:
            s1, s2 = ops.split_scale(lin, x, r, "alphabeta", alpha, beta, eps)
            return [ops.split_backward(lin, x, s1, s2, "pn")]
        b = lin.bias
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        if beta == 0:
            wp, wn = lin.pos, lin.neg
            zp = lin.fwd(xp, wp) + lin.fwd(xn, wn)
            if b is not None:
                zp = zp + bias_view(lin, b.clamp(min=0), zp)
            sp = alpha * r / stabilize(zp, eps)
            return [xp * lin.bwd(sp, wp, x.shape) + xn * lin.bwd(sp, wn, x.shape)]
        zp, zn = lin.fwd2(xp, "pn")          # x+W+, x+W-
        zn_x, zp_x = lin.fwd2(xn, "pn")      # x-W+ (inhibiting), x-W- (activating)
        zp, zn = zp + zp_x, zn + zn_x
        if b is not None:
            zp = zp + bias_view(lin, b.clamp(min=0), zp)
            zn = zn + bias_view(lin, b.clamp(max=0), zn)
        sp = alpha * r / stabilize(zp, eps)
        sn = beta * r / stabilize(zn, eps)
        return [xp * lin.bwd2(sp, -sn, "pn", x.shape) + xn * lin.bwd2(-sn, sp, "pn", x.shape)]
    return rule


def gamma(g: float, eps: float):
    """Zennit 0.5's generalised LRP-gamma (``zennit.rules.Gamma``; Montavon et al. 2019,
    Andéol et al. 2021; not in methods.md, which covers the authors' baselines): weights
    ``U+ = W + g W+`` and ``U- = W + g W-``; where ``z > 0`` relevance follows the positive contributions
    ``Z+ = fwd(x+, U+) + fwd(x-, U-) + b + g b+``, where ``z < 0`` the negative ones
    ``Z- = fwd(x+, U-) + fwd(x-, U+) + b + g b-``, both stabilised (``z + eps*sign(z)``):
    ``R_in = x+ * [bwd(S+, U+) + bwd(S-, U-)] + x- * [bwd(S+, U-) + bwd(S-, U+)]`` with
    ``S+ = [z > 0] R / stabilize(Z+)``, ``S- = [z < 0] R / stabilize(Z-)``; ``z == 0`` passes
    nothing.  ``g = 0`` is LRP-0 with the stabiliser; for ``x >= 0`` it is Montavon's gamma."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin, x = layer.lin, layer.x
        # built per call (weights may change in place); streamed for a large Linear
        up = lin.derived(lambda w: w + g * w.clamp(min=0))
        un = lin.derived(lambda w: w + g * w.clamp(max=0))
        signed = not layer.x_nonneg           # x- == 0 after a ReLU: its terms are exact zeros, skipped
        xp = x.clamp(min=0) if signed else x
        zp, zn = lin.fwd(xp, up), lin.fwd(xp, un)
        if signed:
            xn = x.clamp(max=0)
            zp, zn = zp + lin.fwd(xn, un), zn + lin.fwd(xn, up)
        b = lin.bias
        if b is not None:
            zp = zp + bias_view(lin, b + g * b.clamp(min=0), zp)
            zn = zn + bias_view(lin, b + g * b.clamp(max=0), zn)
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        sp = torch.where(layer.z > 0, r / stabilize(zp, eps), zero)
        sn = torch.where(layer.z < 0, r / stabilize(zn, eps), zero)
        out = xp * (lin.bwd(sp, up, x.shape) + lin.bwd(sn, un, x.shape))
        if signed:
            out = out + xn * (lin.bwd(sp, un, x.shape) + lin.bwd(sn, up, x.shape))
        return [out]
    return rule


def alphabeta_rap_repo(alpha: float):
    """RAP repository's LRP-alpha-beta (beta = alpha - 1), no bias, ``SD`` guards (§1.4).  On
    ReLU inputs (the authors' nets) ``alpha x+ bwd(SD(R, x+W+), W+) - beta x+ bwd(SD(R, x+W-), W-)``.

    Generalised to signed inputs as Transformer-Explainability fixed it (§1.4): each sign
    group shares one denominator, ``Za = x+W+ + x-W-`` and ``Zb = x+W- + x-W+``:
    ``alpha [x+ bwd(SD(R, Za), W+) + x- bwd(SD(R, Za), W-)]
      - beta [x+ bwd(SD(R, Zb), W-) + x- bwd(SD(R, Zb), W+)]``, which conserves ``sum R``
    (wherever ``Za`` and ``Zb`` are non-zero).  The repository's code gives each signed term
    its own denominator, doubling the sum at every signed layer (§8.7)."""
    beta = alpha - 1

    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin, x, ops = layer.lin, layer.x, layer.ops
        if layer.x_nonneg:
            xp = x.clamp(min=0)
            s1, s2 = ops.split_scale(lin, xp, r, "alphabeta-repo", alpha, beta)
            return [ops.split_backward(lin, xp, s1, s2, "pn")]
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        if beta == 0:   # z+: only x+W+ and x-W-
            wp, wn = lin.pos, lin.neg
            sa = alpha * safe_divide(r, lin.fwd(xp, wp) + lin.fwd(xn, wn))
            return [xp * lin.bwd(sa, wp, x.shape) + xn * lin.bwd(sa, wn, x.shape)]
        z_pp, z_pn = lin.fwd2(xp, "pn")
        z_np, z_nn = lin.fwd2(xn, "pn")
        sa, sb = alpha * safe_divide(r, z_pp + z_nn), -beta * safe_divide(r, z_pn + z_np)
        return [xp * lin.bwd2(sa, sb, "pn", x.shape) + xn * lin.bwd2(sb, sa, "pn", x.shape)]
    return rule


def zplus_plain(negate: bool = False, eps: float | None = 1e-9):
    """z+, bias ignored: ``R_in = x * bwd(R / (fwd(x, V) + eps), V)`` with ``V = W+``, or
    ``V = (-W)+`` for the negated output layer of CLRP2.  ``eps=1e-9`` is Gu's CLRP code;
    ``eps=None`` divides by ``SD`` (the RAP repository's alpha=1).  Generalised to inputs that
    are not provably >= 0 (the authors only have ReLU inputs): ``x-`` takes the negative
    weights into the same, non-negative denominator, ``Z = fwd(x+, V+) + fwd(x-, V-)``, as
    Zennit's z+."""
    divide = safe_divide if eps is None else rules.plus_divide(eps)

    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin, x, ops = layer.lin, layer.x, layer.ops
        if layer.x_nonneg and not negate and eps is not None:   # the fused split passes
            s1, _ = ops.split_scale(lin, x, r, "zplus", eps=eps)
            return [ops.split_backward(lin, x, s1, None, "pn")]
        vp = lin.derived(lambda w: (-w).clamp(min=0)) if negate else lin.pos
        if layer.x_nonneg:
            return [x * lin.bwd(divide(r, lin.fwd(x, vp)), vp, x.shape)]
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        vn = lin.derived(lambda w: (-w).clamp(max=0)) if negate else lin.neg
        s = divide(r, lin.fwd(xp, vp) + lin.fwd(xn, vn))
        return [xp * lin.bwd(s, vp, x.shape) + xn * lin.bwd(s, vn, x.shape)]
    return rule


# ----------------------------------------------------------------------------- tables
def first_layer_rule(method: str, first_layer: str, zb_bounds, stabilizer: float):
    """The input layer's rule: z^B (``zb_bounds``), flat, or None (``"same"``: the layer's
    own rule from the table, as in Zennit's ``LayerMapComposite``s)."""
    if not isinstance(first_layer, str) or first_layer not in FIRST_LAYER_CHOICES:
        choices = ", ".join(map(repr, FIRST_LAYER_CHOICES))
        raise ValueError(f"method {method!r}: first_layer must be one of {choices}, got {first_layer!r}")
    if first_layer != "zb" and not (isinstance(zb_bounds, str) and zb_bounds == "image"):
        # bounds that would be ignored: most likely meant for a z^B input layer that is not the default
        raise ValueError(f"method {method!r}: zb_bounds is used by first_layer='zb' only, "
                         f"got first_layer={first_layer!r}")
    if first_layer == "zb":
        return rules.zbox(zb_bounds, rules.eps_divide(stabilizer))
    if first_layer == "flat":
        return rules.flat(stabilizer)
    return None


def zennit_table(conv_rule, linear_rule, first, stabilizer: float, name: str,
                 add_rule: str = "proportional", attention_rule: str = "cp-lrp") -> RuleTable:
    norm = rules.eps_divide(stabilizer)
    by_kind = rules.shared_layers(pool=rules.proportional_pool(divide=norm),
                                  add=rules.add_rule(name, add_rule, divide=norm), maxpool=rules.winner_take_all,
                                  bn=rules.passthrough, norm=norm)
    by_kind.update({g.CONV: conv_rule, g.LINEAR: linear_rule})
    by_kind.update(rules.attention_layers(name, attention_rule, linear_rule, norm))
    return RuleTable(by_kind, first=first, fold_bn=True, name=name)


def rap_repo_table(alpha: float, name: str = "lrp-rap-repo", add_rule: str = "proportional",
                   attention_rule: str = "cp-lrp") -> RuleTable:
    by_kind = rules.shared_layers(pool=rules.proportional_pool(), add=rules.add_rule(name, add_rule))
    ab = alphabeta_rap_repo(alpha)
    by_kind.update({g.CONV: ab, g.LINEAR: ab})
    by_kind.update(rules.attention_layers(name, attention_rule, ab))
    return RuleTable(by_kind, first=rules.zbox("image", rules.plus_divide(1e-9)), name=name)


def logit_relevance(ctx: Context) -> torch.Tensor:
    """``z * onehot(target)``, or the caller's ``initial_relevance``."""
    return ctx.seed if ctx.user_seed else ctx.logits * ctx.seed


class _ZennitLRP(Method):
    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, first_layer: str = "zb",
                 zb_bounds="image", add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        number(self.name, "epsilon", epsilon, low=0)
        number(self.name, "stabilizer", stabilizer, low=0)
        check_bounds(self.name, zb_bounds)
        self.epsilon, self.stabilizer, self.first_layer, self.zb_bounds = epsilon, stabilizer, first_layer, zb_bounds
        self.add_rule, self.attention_rule = add_rule, attention_rule
        first = first_layer_rule(self.name, first_layer, zb_bounds, stabilizer)
        self.table = zennit_table(self._conv_rule(), self._linear_rule(), first, stabilizer, self.name, add_rule,
                                  attention_rule)

    def run(self, ctx: Context) -> torch.Tensor:
        return ctx.propagate(self.table, logit_relevance(ctx))


@register
class Epsilon(_ZennitLRP):
    name = "lrp-epsilon"
    summary = "LRP-epsilon on every conv and linear layer, z^B input layer by default"

    def _conv_rule(self):
        return epsilon(self.epsilon)

    _linear_rule = _conv_rule


@register
class ZPlus(_ZennitLRP):
    name = "lrp-zplus"
    summary = "LRP-z+ (alpha1beta0) on every conv and linear layer, z^B input layer by default"

    def __init__(self, stabilizer: float = 1e-6, first_layer: str = "zb", zb_bounds="image",
                 add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        # no epsilon: z+ has no epsilon rule on any layer (the parameter would be ignored)
        super().__init__(0.0, stabilizer, first_layer, zb_bounds, add_rule, attention_rule)
        del self.epsilon

    def _conv_rule(self):
        return alphabeta(1.0, 0.0, self.stabilizer)

    _linear_rule = _conv_rule


class _ZennitComposite(_ZennitLRP):
    """A method named after a Zennit ``LayerMapComposite`` (``EpsilonPlus``,
    ``EpsilonAlpha2Beta1``): like it, no special input layer by default (the first conv
    takes the conv rule); ``first_layer="zb"`` or ``"flat"`` asks for one."""

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, first_layer: str = "same",
                 zb_bounds="image", add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        super().__init__(epsilon, stabilizer, first_layer, zb_bounds, add_rule, attention_rule)


@register
class EpsilonPlus(_ZennitComposite):
    name = "lrp-epsilon-plus"
    summary = "Zennit's EpsilonPlus: z+ on every conv (the input layer too), epsilon on linear layers"

    def _conv_rule(self):
        return alphabeta(1.0, 0.0, self.stabilizer)

    def _linear_rule(self):
        return epsilon(self.epsilon)


@register
class EpsilonAlpha2Beta1(_ZennitComposite):
    name = "lrp-epsilon-alpha2beta1"
    summary = "Zennit's EpsilonAlpha2Beta1: alpha2beta1 on every conv (the input layer too), epsilon on linear layers"

    def _conv_rule(self):
        return alphabeta(2.0, 1.0, self.stabilizer)

    def _linear_rule(self):
        return epsilon(self.epsilon)


@register
class EpsilonPlusFlat(EpsilonPlus):
    name = "lrp-epsilon-plus-flat"
    summary = "Zennit's EpsilonPlusFlat: EpsilonPlus with the flat rule on the input layer"

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, add_rule: str = "proportional",
                 attention_rule: str = "cp-lrp"):
        super().__init__(epsilon, stabilizer, first_layer="flat", add_rule=add_rule, attention_rule=attention_rule)

    def params(self):
        return {"epsilon": self.epsilon, "stabilizer": self.stabilizer, "add_rule": self.add_rule,
                "attention_rule": self.attention_rule}


@register
class EpsilonAlpha2Beta1Flat(EpsilonAlpha2Beta1):
    name = "lrp-epsilon-alpha2beta1-flat"
    summary = "Zennit's EpsilonAlpha2Beta1Flat: EpsilonAlpha2Beta1 with the flat rule on the input layer"

    def __init__(self, epsilon: float = 1e-6, stabilizer: float = 1e-6, add_rule: str = "proportional",
                 attention_rule: str = "cp-lrp"):
        super().__init__(epsilon, stabilizer, first_layer="flat", add_rule=add_rule, attention_rule=attention_rule)

    params = EpsilonPlusFlat.params


@register
class AlphaBeta(Method):
    name = "lrp-alphabeta"
    summary = "LRP-alpha-beta (default alpha2beta1) on every conv and linear layer, z^B input layer by default"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, first_layer: str = "zb",
                 zb_bounds="image", add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        number(self.name, "alpha", alpha)
        number(self.name, "beta", beta)
        number(self.name, "stabilizer", stabilizer, low=0)
        check_bounds(self.name, zb_bounds)
        if alpha - beta != 1 or beta < 0:
            raise ValueError(f"method {self.name!r}: alpha-beta needs alpha - beta = 1 and beta >= 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.stabilizer = alpha, beta, stabilizer
        self.first_layer, self.zb_bounds, self.add_rule = first_layer, zb_bounds, add_rule
        self.attention_rule = attention_rule
        ab = alphabeta(alpha, beta, stabilizer)
        first = first_layer_rule(self.name, first_layer, zb_bounds, stabilizer)
        self.table = zennit_table(ab, ab, first, stabilizer, self.name, add_rule, attention_rule)

    def run(self, ctx: Context) -> torch.Tensor:
        return ctx.propagate(self.table, logit_relevance(ctx))


@register
class Gamma(Method):
    name = "lrp-gamma"
    summary = "LRP-gamma (Zennit's Gamma rule, gamma=0.25) on every conv and linear layer, z^B input layer by default"

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6, first_layer: str = "zb", zb_bounds="image",
                 add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        number(self.name, "gamma", gamma, low=0)
        number(self.name, "stabilizer", stabilizer, low=0)
        check_bounds(self.name, zb_bounds)
        self.gamma, self.stabilizer, self.first_layer, self.zb_bounds = gamma, stabilizer, first_layer, zb_bounds
        self.add_rule, self.attention_rule = add_rule, attention_rule
        first = first_layer_rule(self.name, first_layer, zb_bounds, stabilizer)
        self.table = self._table(first)

    def _table(self, first) -> RuleTable:
        rule = gamma(self.gamma, self.stabilizer)
        return zennit_table(rule, rule, first, self.stabilizer, self.name, self.add_rule, self.attention_rule)

    def run(self, ctx: Context) -> torch.Tensor:
        return ctx.propagate(self.table, logit_relevance(ctx))


@register
class EpsilonGammaBox(Method):
    name = "lrp-epsilon-gamma-box"
    summary = "Zennit's EpsilonGammaBox: z^B on the input conv, gamma on the other convs, epsilon on linear layers"

    def __init__(self, epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6, zb_bounds="image",
                 add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        number(self.name, "epsilon", epsilon, low=0)
        number(self.name, "gamma", gamma, low=0)
        number(self.name, "stabilizer", stabilizer, low=0)
        check_bounds(self.name, zb_bounds)
        self.epsilon, self.gamma, self.stabilizer, self.zb_bounds = epsilon, gamma, stabilizer, zb_bounds
        self.add_rule, self.attention_rule = add_rule, attention_rule
        self.table = self._table()

    def _table(self) -> RuleTable:
        dense = epsilon(self.epsilon)
        zb = first_layer_rule(self.name, "zb", self.zb_bounds, self.stabilizer)

        def first(layer: Layer, r: torch.Tensor) -> list:
            # Zennit's first map holds convolutions only: an input Linear (an MLP) keeps epsilon
            return (zb if layer.lin.is_conv else dense)(layer, r)
        return zennit_table(gamma(self.gamma, self.stabilizer), dense, first, self.stabilizer, self.name,
                            self.add_rule, self.attention_rule)

    def run(self, ctx: Context) -> torch.Tensor:
        return ctx.propagate(self.table, logit_relevance(ctx))


@register
class RapRepoLRP(Method):
    name = "lrp-rap-repo"
    summary = "LRP-alpha-beta exactly as the RAP authors' code (separate denominators, BN and biases ignored)"

    def __init__(self, alpha: float = 1.0, add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        number(self.name, "alpha", alpha)
        if alpha < 1:
            raise ValueError(f"method {self.name!r}: alpha must be >= 1 (beta = alpha - 1), got {alpha}")
        self.alpha, self.add_rule, self.attention_rule = alpha, add_rule, attention_rule
        self.table = rap_repo_table(alpha, add_rule=add_rule, attention_rule=attention_rule)

    def run(self, ctx: Context) -> torch.Tensor:
        return ctx.propagate(self.table, logit_relevance(ctx))
