"""Gradient baselines: ``d<logits, seed>/dx`` and gradient x input (the seed is the
one-hot target, or the caller's ``initial_relevance``)."""
from __future__ import annotations

import torch

from .. import graph as g
from ..engine import Context
from . import Method, register


@register
class Gradient(Method):
    name = "gradient"
    summary = "Plain input gradient of the target logit (saliency baseline)"
    walks = False

    def __init__(self):
        pass

    def grad_node(self, graph: g.Graph) -> g.Node:
        return graph.input

    def run(self, ctx: Context) -> torch.Tensor:
        return ctx.grad(ctx.graph.input, ctx.seed)


@register
class GradientXInput(Gradient):
    name = "gradient-x-input"
    summary = "Input times its gradient (baseline)"

    def run(self, ctx: Context) -> torch.Tensor:
        return ctx.x.detach() * super().run(ctx)
