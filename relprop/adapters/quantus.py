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
    array with one channel.  Other keyword arguments Quantus passes through
    ``explain_func_kwargs`` are not accepted (TypeError naming them).  Quantus randomises a
    model in place and passes the same object each time: a fresh :class:`Explainer` is
    built per call, and relprop keeps nothing derived from the parameters, so each call
    explains the model as it is then.
    """
    from .. import methods

    methods.create(method, **params)

    def f(model: nn.Module, inputs, targets=None, device=None, **kw) -> np.ndarray:
        if kw:
            raise TypeError(f"relprop's explain_func({method!r}) takes model, inputs, targets and device; got "
                            f"unexpected keyword argument(s) {', '.join(sorted(kw))} (method parameters go to "
                            f"explain_func({method!r}, ...))")
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
