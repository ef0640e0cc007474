"""Contrastive methods: CLRP (Gu et al. 2018; methods.md §5) and SGLRP (Iwana et al.
2019; §6).  Each propagates a *target* and a *dual* seed over the same forward pass and
returns their difference.

``clrp`` styles:

* ``"gu"`` (default) -- Gu's released code: z+ everywhere (``+1e-9``), z^B input with the
  constant bounds ``(-2.1179, 2.64)``, max-pool ties shared; target seed ``|z_t|``; dual
  seed ``|z_i|`` for all ``i != t`` (CLRP1) or ``|z_t|`` through the negated output layer
  (CLRP2); map ``R_t / sum R_t - R_dual / sum R_dual`` (sums to 0; not clipped).
* ``"agf"`` -- the dual-rescaled form of AGFVisualization: the RAP repository's LRP
  (alpha=1), target seed ``z_t``, dual ``z_t / (C-1)`` on every other class (CLRP1, as
  in the paper) or ``z_t`` through the negated output layer (CLRP2); map
  ``R_t - R_dual * sum R_t / sum R_dual``.

``sglrp``: seeds from the softmax gradient, ``p_t (1 - p_t) + 1e-8`` at the target and
``p_t p_n`` on the others, both through the RAP repository's LRP (alpha=1), combined like
``agf``.  ``clrp(output="lrp" | "dual")`` returns one of the two raw maps instead.
Transformers: ``attention_rule`` as in :mod:`.lrp` (CP-LRP by default: the values of
``a @ v`` take the table's z+ / alpha-beta Linear rule; or ``"attnlrp"``).

**Dense outputs** ``(B, C, H, W)`` (README, "Dense outputs"): both methods are defined per
position over the class dimension, restricted to the target's region.  With ``w`` the
target's weight at each position (its mask) and ``t`` its class, every formula above holds
at each position with the one-hot vector replaced by ``w`` on class ``t``, and "the other
classes" by ``w`` on every class but ``t``: CLRP1's dual concept is the other classes at the
same positions, SGLRP's softmax is taken over the classes at each position.  For a
classifier (``w = 1``) these are the formulas above, to the bit.  CLRP2 negates the output
layer, the conv producing the output map (upsampling after it is linear and kept); a model
whose output is not produced by one conv or Linear (LR-ASPP's sum of two classifiers) has
no output layer to negate, and CLRP2 raises a ValueError there.
"""
from __future__ import annotations

import torch

from .. import graph as g
from .. import rules
from ..engine import Context, RuleTable, amplification
from ..ops import psum, safe_divide
from . import Method, register, zb_bounds as check_bounds
from .lrp import rap_repo_table, zplus_plain

GU_BOUNDS = (-2.1179, 2.64)
OUTPUTS = ("clrp", "lrp", "dual")


def gu_table(bounds, negate_head: bool, add_rule: str = "proportional", attention_rule: str = "cp-lrp") -> RuleTable:
    by_kind = rules.shared_layers(pool=rules.proportional_pool(), add=rules.add_rule("clrp", add_rule),
                                  maxpool=rules.maxpool_ties_shared)
    by_kind.update({g.CONV: zplus_plain(), g.LINEAR: zplus_plain()})
    by_kind.update(rules.attention_layers("clrp", attention_rule, zplus_plain()))
    return RuleTable(by_kind, first=rules.zbox(bounds, rules.plus_divide(1e-9)),
                     head=zplus_plain(negate=True) if negate_head else None, name="clrp")


def negated_head(table: RuleTable) -> RuleTable:
    """``table`` with the output layer's weights negated (CLRP2's dual concept)."""
    return RuleTable(table.by_kind, first=table.first, head=zplus_plain(negate=True, eps=None),
                     fold_bn=table.fold_bn, name=table.name)


def scaled_difference(ctx: Context, r_t: torch.Tensor, r_o: torch.Tensor) -> torch.Tensor:
    """``R_t - R_o * sum R_t / sum R_o`` per sample (sums to 0)."""
    return difference(ctx, r_t, r_o * safe_divide(psum(r_t), psum(r_o)))


def difference(ctx: Context, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b``, recording in ``ctx`` how much it amplifies relative errors of ``a`` and
    ``b``: ``|| |a| + |b| || / ||a - b||`` per sample (large when the two maps nearly agree)."""
    d = a - b
    ctx.add_error(amplification((a.abs() + b.abs()).flatten(1).norm(dim=1), d.flatten(1).norm(dim=1)))
    return d


def selection(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cls, region)`` of a one-class seed: the target class indicator, shaped to broadcast
    against the output (one-hot (B, C), or (B, C, 1, 1) for a dense output), and the
    target's weight at each position, the seed summed over classes ((B, 1): 1 for a
    classifier's one-hot seed; (B, 1, H, W): the mask of a dense one).  ``seed == cls *
    region``, and ``region - seed`` puts the region's weights on every other class."""
    seed = ctx.seed
    cls = torch.nn.functional.one_hot(ctx.targets, seed.shape[1]).to(seed.dtype)
    return cls.reshape(cls.shape + (1,) * (seed.ndim - 2)), seed.sum(dim=1, keepdim=True)


def class_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the class dim (dim 1), kept: per sample for a classifier's (B, C) (``psum``),
    per position for a dense (B, C, H, W)."""
    return t.sum(dim=1, keepdim=True)


def _pick(output: str, target, dual, combined):
    return {"lrp": target, "dual": dual}[output] if output != "clrp" else combined()


@register
class CLRP(Method):
    name = "clrp"
    summary = "Contrastive LRP: target minus dual-concept relevance (Gu et al. 2018), CLRP1 or CLRP2"
    accepts_initial_relevance = False

    def __init__(self, variant: str = "clrp1", style: str = "gu", output: str = "clrp", zb_bounds=None,
                 add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        if variant not in ("clrp1", "clrp2"):
            raise ValueError(f"method {self.name!r}: variant must be 'clrp1' or 'clrp2', got {variant!r}")
        if style not in ("gu", "agf"):
            raise ValueError(f"method {self.name!r}: style must be 'gu' or 'agf', got {style!r}")
        if output not in OUTPUTS:
            raise ValueError(f"method {self.name!r}: output must be one of {OUTPUTS}, got {output!r}")
        if zb_bounds is not None:
            check_bounds(self.name, zb_bounds)
        self.variant, self.style, self.output, self.zb_bounds = variant, style, output, zb_bounds
        self.add_rule, self.attention_rule = add_rule, attention_rule
        if style == "gu":
            bounds = GU_BOUNDS if zb_bounds is None else zb_bounds
            self.target_table = gu_table(bounds, False, add_rule, attention_rule)
            self.dual_table = gu_table(bounds, variant == "clrp2", add_rule, attention_rule)
        else:
            self.target_table = rap_repo_table(1.0, "clrp", add_rule, attention_rule)
            self.dual_table = negated_head(self.target_table) if variant == "clrp2" else self.target_table

    def run(self, ctx: Context) -> torch.Tensor:
        seed, z = ctx.seed, ctx.logits
        if self.variant == "clrp2" and ctx.head() is None:
            raise ValueError(f"method {self.name!r}: variant 'clrp2' negates the output layer, but the output of "
                             f"{type(ctx.graph.model).__name__} is not computed by one conv or Linear layer (through "
                             "reshapes or upsampling); use variant='clrp1'")
        cls, region = selection(ctx)
        others = region - seed      # the region's weights on every class but the target (1 - onehot)
        if self.style == "gu":
            seed_t = z.abs() * seed
            seed_d = z.abs() * others if self.variant == "clrp1" else seed_t
        else:
            z_t = class_sum(z * cls)     # the target logit (at each position of a dense output)
            seed_t = z_t * seed
            seed_d = others / (z.shape[1] - 1) * z_t if self.variant == "clrp1" else seed_t
        r_t, r_d = ctx.propagate_together([(self.target_table, seed_t), (self.dual_table, seed_d)])
        if self.style == "gu":
            # each map over its own sum; a map that is 0 throughout (a logit of 0: a zero-initialised
            # head) stays 0, as the other methods' safe division gives, instead of NaN
            return _pick(self.output, r_t, r_d,
                         lambda: difference(ctx, safe_divide(r_t, psum(r_t)), safe_divide(r_d, psum(r_d))))
        return _pick(self.output, r_t, r_d, lambda: scaled_difference(ctx, r_t, r_d))


@register
class SGLRP(Method):
    name = "sglrp"
    summary = "Softmax-Gradient LRP: target vs all other classes weighted by the softmax gradient (Iwana et al. 2019)"
    accepts_initial_relevance = False

    def __init__(self, add_rule: str = "proportional", attention_rule: str = "cp-lrp"):
        self.add_rule, self.attention_rule = add_rule, attention_rule
        self.table = rap_repo_table(1.0, "sglrp", add_rule, attention_rule)

    def run(self, ctx: Context) -> torch.Tensor:
        seed = ctx.seed
        cls, region = selection(ctx)
        p = ctx.logits.softmax(dim=1)   # over the classes (at each position of a dense output)
        p_t = class_sum(p * cls)
        # 1 - p_t as the sum of the other classes' probabilities: the same number, without
        # the cancellation of 1 - p_t when the model is confident (p_t -> 1 in float32)
        rest = class_sum(p * (1 - cls))
        r_t, r_o = ctx.propagate_together([(self.table, seed * (p_t * rest + 1e-8)),
                                           (self.table, dual_seed(ctx, cls, region - seed, p_t * p))])
        return scaled_difference(ctx, r_t, r_o)


def dual_seed(ctx: Context, cls: torch.Tensor, others: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """SGLRP's dual seed ``p_t p_n`` on the other classes (``others``: their weights;
    ``product``: ``p_t p`` as computed), up to a factor per sample.

    Where the target is far less likely than the top class, ``p_t p_n`` falls below the
    smallest normal number: float32 rounds it to subnormals or to 0 (a target logit ~100
    below the top), and the dual map came out 0, so the map was ``R_t`` alone, off float64 by
    more than its size and unreported.  The map divides the dual relevance by its own sum
    (:func:`scaled_difference`; every rule is positively homogeneous in the relevance), so a
    factor per sample changes nothing: such a sample's seed is computed in log space, scaled
    so its largest entry is 1 (its ``layer_sums``, the dual pass's, are then on that scale;
    float32 had them 0).  Other samples keep ``product`` bit for bit."""
    dual = others * product
    shape = (-1,) + (1,) * (dual.dim() - 1)
    small = dual.flatten(1).amax(1) < torch.finfo(dual.dtype).tiny * 2.0 ** 26   # its peak 2^26 above underflow
    # in float64 (logits-sized): sums of log-probabilities of ~-100 would lose 1e-5 in float32
    logp = ctx.logits.double().log_softmax(dim=1)
    log_dual = (class_sum(torch.where(cls > 0, logp, 0.0)) + logp).masked_fill(others == 0, float("-inf"))
    top = log_dual.flatten(1).amax(1)
    top = torch.where(torch.isfinite(top), top, 0.0).view(shape)
    return torch.where(small.view(shape), others * (log_dual - top).exp().to(dual.dtype), dual)
