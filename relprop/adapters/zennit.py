"""Zennit's calling convention for relprop methods, so that Zennit and zennit-crp style code
can swap engines::

    from relprop.adapters.zennit import Attributor
    with Attributor(model, "rap") as attributor:              # a context, as Zennit's
        output, relevance = attributor(x, torch.eye(10)[[3]])
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..explainer import Explainer

__all__ = ["Attributor"]


def _as_function(attr_output):
    if attr_output is None:
        return lambda output: output                     # Zennit's default: the output itself
    if callable(attr_output):
        return attr_output
    if not torch.is_tensor(attr_output):
        raise TypeError(f"attr_output must be None, a tensor or a callable on the model output, got "
                        f"{type(attr_output).__name__}")
    return lambda output: attr_output


class Attributor:
    """``Attributor(model, method="rap", attr_output=None, **params)``; ``attributor(input,
    attr_output=None) -> (output, relevance)``.

    ``attr_output`` is Zennit's: the relevance of the model's output ``(B, classes)`` (a
    tensor; a ``(1, classes)`` or ``(classes,)`` row is used for every sample), or a callable
    taking the detached output and returning it; None (Zennit's default) is the output
    itself.  It is the seed of the propagation as given (``Explainer(...,
    initial_relevance=...)``), so LRP relevance sums to the seed's sum, as in Zennit.  The
    argument of the call overrides the one given at construction.  CLRP and SGLRP build
    their own seeds from one class: for them ``attr_output`` must be one-hot per sample
    and selects that class.  ``output`` is the detached logits; ``relevance`` is shaped
    like ``input``.  ``with Attributor(...) as a:`` is accepted for Zennit compatibility
    and registers nothing (relprop adds no hooks).
    """

    def __init__(self, model: nn.Module, method: str = "rap", attr_output=None, **params):
        self.model = model
        self.explainer = Explainer(model, method, **params)
        _as_function(attr_output)                      # a bad type fails here, not at the call
        self.attr_output = attr_output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, input: torch.Tensor, attr_output=None) -> tuple[torch.Tensor, torch.Tensor]:
        fn = _as_function(self.attr_output if attr_output is None else attr_output)

        def seed(output):
            r = torch.as_tensor(fn(output), dtype=output.dtype, device=output.device)
            return r.expand_as(output) if r.ndim == output.ndim and r.shape != output.shape else r

        if self.explainer.method.accepts_initial_relevance:
            att = self.explainer.attribute(input, initial_relevance=seed)
        else:                                          # a one-hot seed is that class's target
            att = self.explainer.attribute(input, target=lambda z: (z * seed(z.detach())).sum(dim=1))
        return att.logits, att.relevance
