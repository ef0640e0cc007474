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
        onehot, z = ctx.seed, ctx.logits
        if self.style == "gu":
            seed_t = z.abs() * onehot
            seed_d = z.abs() * (1 - onehot) if self.variant == "clrp1" else seed_t
        else:
            z_t = psum(z * onehot)
            seed_t = z_t * onehot
            seed_d = (1 - onehot) / (z.shape[1] - 1) * z_t if self.variant == "clrp1" else seed_t
        r_t, r_d = ctx.propagate_together([(self.target_table, seed_t), (self.dual_table, seed_d)])
        if self.style == "gu":
            return _pick(self.output, r_t, r_d, lambda: difference(ctx, r_t / psum(r_t), r_d / psum(r_d)))
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
        onehot = ctx.seed
        p = ctx.logits.softmax(dim=1)
        p_t = psum(p * onehot)
        # 1 - p_t as the sum of the other classes' probabilities: the same number, without
        # the cancellation of 1 - p_t when the model is confident (p_t -> 1 in float32)
        rest = psum(p * (1 - onehot))
        r_t, r_o = ctx.propagate_together([(self.table, onehot * (p_t * rest + 1e-8)),
                                           (self.table, (1 - onehot) * p_t * p)])
        return scaled_difference(ctx, r_t, r_o)
