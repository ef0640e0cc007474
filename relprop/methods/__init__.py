"""Method registry.  A method is a class: keyword parameters in ``__init__`` (validated
there), an optional node whose gradient its initialisation needs, and ``run(ctx)``
returning the input relevance."""
from __future__ import annotations

import inspect
import math
import numbers

import torch

from .. import graph as g
from ..engine import Context

METHODS: dict[str, type] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


class Method:
    name = ""
    summary = ""
    accepts_initial_relevance = True
    walks = True    # runs a relevance pass over the forward's values (False: a gradient only)

    def grad_node(self, graph: g.Graph) -> g.Node | None:
        """Node whose gradient (of the seeded logits) the initialisation needs, if any."""
        return None

    def run(self, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def __repr__(self) -> str:
        # attention_rule is left out at its default: it changes transformers only, and the
        # reprs of the methods on CNNs stay what they were before it existed
        shown = {k: v for k, v in self.params().items() if not (k == "attention_rule" and v == "cp-lrp")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def number(method: str, name: str, value, low: float | None = None, high: float | None = None,
           low_open: bool = False):
    """``value`` if it is a finite real number in ``[low, high]`` (``(low, high]`` with
    ``low_open``); else a TypeError or ValueError naming the method and the parameter.
    Methods call it in ``__init__`` so bad parameters fail when the explainer is built."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"method {method!r}: {name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"method {method!r}: {name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"method {method!r}: {name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"method {method!r}: {name} must be <= {high:g}, got {value!r}")
    return value


def layer_name(method: str, value):
    """An ``init_layer``: None (the default layer) or a module name string."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"method {method!r}: init_layer must be a layer name (str) or None, "
                        f"got {type(value).__name__} {value!r}")
    return value


def zb_bounds(method: str, value):
    """z^B bounds: ``"image"`` or ``(low, high)``, each a number or per-channel numbers, low <= high."""
    if isinstance(value, str):
        if value != "image":
            raise ValueError(f"method {method!r}: zb_bounds must be 'image' or (low, high), got {value!r}")
        return value
    try:
        low, high = (torch.as_tensor(b, dtype=torch.float64) for b in value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"method {method!r}: zb_bounds must be 'image' or (low, high) numbers or per-channel "
                        f"sequences, got {value!r}") from None
    if not (torch.isfinite(low).all() and torch.isfinite(high).all()) or (low > high).any():
        raise ValueError(f"method {method!r}: zb_bounds must be finite with low <= high, got {value!r}")
    return value


def create(method: str, **params) -> Method:
    """Instantiate a registered method, with a clear error for unknown names/parameters."""
    cls = METHODS.get(method)
    if cls is None:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    valid = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise TypeError(f"method {method!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                        f"its parameters are: {', '.join(valid) or '(none)'}")
    return cls(**params)


from . import lrp, rap, rsp, ae, contrastive, gradient, cam  # noqa: E402,F401  (registration)
