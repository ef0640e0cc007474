"""relprop methods as a Captum attribution (``pip install relprop[captum]``)::

    from captum.attr import NoiseTunnel
    from relprop.adapters.captum import RelProp

    rap = RelProp(model, method="rap")
    attributions, delta = rap.attribute(x, target=3, return_convergence_delta=True)
    smooth = NoiseTunnel(rap).attribute(x, nt_type="smoothgrad", nt_samples=8, target=3)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from captum.attr import GradientAttribution
from captum.log import log_usage

from .. import targets as T
from ..explainer import Explainer

__all__ = ["RelProp"]

# Methods whose map is not an input-times-something decomposition of the output score.
_NOT_MULTIPLYING = frozenset({"gradient", "gradcam"})


class RelProp(GradientAttribution):
    """``RelProp(model, method="rap", **params)``: the relprop method ``method`` (one of
    :func:`relprop.available_methods`, with its parameters) as a Captum
    ``GradientAttribution``.

    ``attribute(inputs, target=None, additional_forward_args=None,
    return_convergence_delta=False)`` follows Captum: ``inputs`` a tensor ``(B, C, H, W)``
    or a one-tensor tuple (the result has the same form), ``target`` an int or ``(B,)``
    class indices (None: relprop's predicted class of each input; Captum's tuple targets
    for multi-dimensional outputs are not supported), and, with
    ``return_convergence_delta``, Captum's LRP delta ``output - sum(attributions)`` per
    sample, ``output`` the explained score.  ``additional_forward_args`` must be None
    (relprop explains ``model(x)``).  ``multiplies_by_inputs`` is True for the
    relevance methods (the LRP family, RAP, RSP, AE, gradient x input), False for the
    plain gradient.  The model is never modified and nothing derived from its
    parameters is kept between calls, so a model changed in place is explained as it is.
    """

    def __init__(self, model: nn.Module, method: str = "rap", **params):
        GradientAttribution.__init__(self, model)
        self.model = model
        self.method = method
        self.explainer = Explainer(model, method, **params)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.method not in _NOT_MULTIPLYING

    def has_convergence_delta(self) -> bool:
        return True

    @log_usage()
    def attribute(self, inputs, target=None, additional_forward_args=None, return_convergence_delta: bool = False):
        if additional_forward_args is not None:
            raise ValueError("relprop explains model(x) of one input tensor: additional_forward_args must be None")
        as_tuple = isinstance(inputs, tuple)
        if as_tuple and len(inputs) != 1:
            raise ValueError(f"relprop explains models of one input tensor; got a tuple of {len(inputs)} inputs")
        x = inputs[0] if as_tuple else inputs
        if isinstance(target, tuple) or (isinstance(target, list) and any(isinstance(t, tuple) for t in target)):
            raise ValueError(f"relprop explains (B, classes) outputs: target must be an int or class indices, "
                             f"not Captum's tuple targets; got {target!r}")
        att = self.explainer.attribute(x.detach() if torch.is_tensor(x) else x, target)
        out = (att.relevance,) if as_tuple else att.relevance
        if not return_convergence_delta:
            return out
        score = T.scores(target if T.is_callable_target(target) else att.target, att.logits)
        return out, self.compute_convergence_delta(att.relevance, score)

    def compute_convergence_delta(self, attributions, output: torch.Tensor) -> torch.Tensor:
        """Captum's LRP delta: ``output - sum(attributions)`` per sample (``(B,)``)."""
        if isinstance(attributions, tuple):
            attributions = attributions[0]
        return output.reshape(-1) - attributions.reshape(attributions.shape[0], -1).sum(dim=1)
