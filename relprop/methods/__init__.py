"""Method registry.  A method is a class: keyword parameters in ``__init__`` (validated
there), an optional node whose gradient its initialisation needs, and ``run(ctx)``
returning the input relevance."""
from __future__ import annotations

import inspect

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

    def grad_node(self, graph: g.Graph) -> g.Node | None:
        """Node whose gradient (of the seeded logits) the initialisation needs, if any."""
        return None

    def run(self, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


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


from . import lrp, rap, rsp, ae, contrastive, gradient  # noqa: E402,F401  (registration)
