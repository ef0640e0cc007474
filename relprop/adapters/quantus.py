"""relprop methods as a Quantus ``explain_func`` (``pip install relprop[quantus]`` for
Quantus itself)::

    import quantus
    from relprop.adapters.quantus import explain_func

    metric = quantus.MPRT()
    scores = metric(model=model, x_batch=x, y_batch=y, explain_func=explain_func("rap"))
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..explainer import Explainer

__all__ = ["explain_func"]


def explain_func(method: str = "rap", **params):
    """``f(model, inputs, targets, device=None, **kw) -> np.ndarray (B, 1, H, W)``: the relprop
    method ``method`` (with ``params``, checked here) as any Quantus metric's
    ``explain_func``.

    ``inputs`` (NumPy or tensor, ``(B, C, H, W)``) are explained for ``targets`` (``(B,)``
    class indices; None: the predicted classes) on ``device`` (default: the model's),
    in the model's dtype; the map is the channel sum of the relevance, as a float NumPy
    array with one channel.  Quantus calls ``f(model=..., inputs=..., targets=...,
    **explain_func_kwargs)``, adding ``device`` (a metric's ``device=``) and, in
    ``quantus.evaluate``, ``method`` (the key of ``xai_methods``).  Of those keywords:

    * ``method``: a label, ignored, unless it names another relprop method (ValueError: this
      function computes ``method`` only);
    * ``softmax``: False or None (relprop explains the model's output as it is, the logits);
      True is a ValueError;
    * ``channel_first``: True or None (inputs are ``(B, C, H, W)``); False is a ValueError.

    Any other keyword is a TypeError naming it (method parameters go to
    ``explain_func(method, ...)``).  Quantus randomises a model in place and passes the same
    object each time: a fresh :class:`Explainer` is built per call, and relprop keeps nothing
    derived from the parameters, so each call explains the model as it is then.
    """
    from .. import methods
    from ..explainer import available_methods

    methods.create(method, **params)

    def f(model: nn.Module, inputs, targets=None, device=None, **kw) -> np.ndarray:
        label = kw.pop("method", None)
        if isinstance(label, str) and label != method and label in available_methods():
            raise ValueError(f"relprop's explain_func({method!r}) computes {method!r} but was called with "
                             f"method={label!r}; use explain_func({label!r}) for that method")
        if kw.pop("softmax", None):
            raise ValueError(f"relprop's explain_func({method!r}) explains the model's output as it is (the "
                             "logits); softmax=True is not supported: drop it, or explain a model that ends with "
                             "a softmax layer")
        if kw.pop("channel_first", True) is False:
            raise ValueError(f"relprop's explain_func({method!r}) takes channel-first inputs (B, C, H, W); "
                             "channel_first=False is not supported")
        if kw:
            raise TypeError(f"relprop's explain_func({method!r}) takes model, inputs, targets, device (and Quantus' "
                            f"method, softmax=False, channel_first=True); got unexpected keyword argument(s) "
                            f"{', '.join(sorted(kw))} (method parameters go to explain_func({method!r}, ...))")
        p = next(model.parameters(), None)
        dev = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        x = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs).to(dev, dtype)
        t = None
        if targets is not None:
            t = torch.as_tensor(np.asarray(targets) if not torch.is_tensor(targets) else targets).reshape(-1)
            t = t.to(dev)
        relevance = Explainer(model, method, **params)(x, t)
        return relevance.sum(dim=1, keepdim=True).detach().float().cpu().numpy()

    f.__name__ = f.__qualname__ = f"relprop_{method.replace('-', '_')}"
    return f
