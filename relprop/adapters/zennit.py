"""Zennit's calling convention for relprop methods, so that Zennit and zennit-crp style code
can swap engines::

    from relprop.adapters.zennit import Attributor
    with Attributor(model, "rap") as attributor:              # a context, as Zennit's
        output, relevance = attributor(x, torch.eye(10)[[3]])

    # Zennit's own spelling, zennit.attribution.Gradient(model, composite):
    with Attributor(model, composite=EpsilonPlusFlat()) as attributor:
        output, relevance = attributor(x, torch.eye(10)[[3]])
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from ..explainer import Explainer
from ..targets import is_one_hot

__all__ = ["Attributor", "COMPOSITE_METHODS", "composite_method"]

# Zennit composite (class name; Zennit's registered name) -> the relprop method equal to it
COMPOSITE_METHODS = {"EpsilonPlus": "lrp-epsilon-plus", "EpsilonPlusFlat": "lrp-epsilon-plus-flat",
                     "EpsilonAlpha2Beta1": "lrp-epsilon-alpha2beta1",
                     "EpsilonAlpha2Beta1Flat": "lrp-epsilon-alpha2beta1-flat",
                     "EpsilonGammaBox": "lrp-epsilon-gamma-box"}
_REGISTERED = {"epsilon_plus": "EpsilonPlus", "epsilon_plus_flat": "EpsilonPlusFlat",
               "epsilon_alpha2_beta1": "EpsilonAlpha2Beta1", "epsilon_alpha2_beta1_flat": "EpsilonAlpha2Beta1Flat",
               "epsilon_gamma_box": "EpsilonGammaBox"}
_UNSET = object()
# hook state and registration bookkeeping: not part of what a composite computes
_STATE = frozenset({"canonizers", "handles", "hook_refs", "module_map", "stored_tensors", "tensor_handles", "active"})


def _same(a, b, depth: int = 0) -> bool:
    """``a`` and ``b`` compute the same: equal numbers and tensors, the same code with equal
    closures, equal attributes (recursively; hook state and registrations left out)."""
    if depth > 24:
        return False
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (int, float, complex, str, bytes, bool)):
        return a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, types.MethodType):
        return a.__func__ is b.__func__
    if isinstance(a, types.FunctionType):
        cells = [[c.cell_contents for c in (f.__closure__ or ())] for f in (a, b)]
        return a.__code__ is b.__code__ and _same(a.__defaults__, b.__defaults__, depth + 1) and \
            _same(cells[0], cells[1], depth + 1)
    if isinstance(a, type):
        return False                      # different classes (the same one is caught by `is`)
    if hasattr(a, "__dict__"):
        return _same({k: v for k, v in vars(a).items() if k not in _STATE},
                     {k: v for k, v in vars(b).items() if k not in _STATE}, depth + 1)
    return a == b


def _box_bounds(composite):
    """The ``(low, high)`` an ``EpsilonGammaBox`` was built with (from its ZBox rule), or None."""
    for _, rule in getattr(composite, "first_map", ()):
        found = {}
        for fn in getattr(rule, "input_modifiers", ()):
            code = getattr(fn, "__code__", None)
            for name, cell in zip(code.co_freevars if code is not None else (), getattr(fn, "__closure__", None) or ()):
                if name in ("low", "high"):
                    found[name] = cell.cell_contents
        if len(found) == 2:
            return found["low"], found["high"]
    return None


def composite_method(composite, params: dict | None = None) -> tuple[str, dict]:
    """``(relprop method, params)`` equal to the Zennit composite ``composite``.

    ``composite``: a Zennit composite object (``EpsilonPlusFlat()``, ``EpsilonGammaBox(low,
    high)``...), its class, or its name (``"EpsilonPlusFlat"`` or Zennit's registered
    ``"epsilon_plus_flat"``); one of :data:`COMPOSITE_METHODS`.  ``params`` are relprop
    parameters of that method (``epsilon``, ``stabilizer``, ``gamma``, ``zb_bounds``...).
    A composite object must have been built with the composite's default arguments (for
    ``EpsilonGammaBox``: any ``low``/``high``, which become ``zb_bounds``): its other
    arguments are not readable back, so an object built with others (``epsilon=``,
    ``gamma=``, ``layer_map=``, ``zero_params=``...) is a ValueError saying to pass the name and
    relprop parameters instead.  Its ``canonizers`` are not used: relprop treats BatchNorm and
    residual blocks as Zennit's canonizers do.  Raises ValueError for other composites.
    """
    params = dict(params or {})
    supported = ", ".join(COMPOSITE_METHODS)
    if isinstance(composite, str):
        name = _REGISTERED.get(composite, composite)
        if name not in COMPOSITE_METHODS:
            raise ValueError(f"relprop has no method equal to the Zennit composite {composite!r}; supported: "
                             f"{supported} (or their registered names {', '.join(_REGISTERED)})")
        return COMPOSITE_METHODS[name], params
    try:
        from zennit.core import Composite
    except ImportError:
        Composite = None
    is_class = isinstance(composite, type)
    cls = composite if is_class else type(composite)
    if Composite is None or not issubclass(cls, Composite):
        raise TypeError(f"composite must be a Zennit composite (object, class or name), got {cls.__name__}")
    if cls.__module__ != "zennit.composites" or cls.__name__ not in COMPOSITE_METHODS:
        raise ValueError(f"relprop has no method equal to the Zennit composite {cls.__name__}; supported: "
                         f"{supported}")
    method = COMPOSITE_METHODS[cls.__name__]
    if is_class:
        return method, params
    if cls.__name__ == "EpsilonGammaBox":
        bounds = _box_bounds(composite)
        if "zb_bounds" in params:
            raise TypeError("zb_bounds is given twice: by the EpsilonGammaBox composite (low, high) and as a "
                            "parameter")
        reference = None if bounds is None else cls(*bounds)
        params["zb_bounds"] = bounds
    else:
        reference = cls()
    if reference is None or not _same(composite, reference):
        raise ValueError(f"relprop cannot read the arguments of this {cls.__name__} object: it was built with "
                         "other arguments than the defaults (epsilon, gamma, stabilizer, layer_map, first_map, "
                         f"zero_params); pass the name and relprop parameters instead, e.g. "
                         f"Attributor(model, composite={cls.__name__!r}, epsilon=..., stabilizer=...)")
    return method, params


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
    """``Attributor(model, method="rap", attr_output=None, composite=None, **params)``;
    ``attributor(input, attr_output=None) -> (output, relevance)``.

    ``method`` is a relprop method name; in Zennit's spelling
    (``zennit.attribution.Gradient(model, composite)``) the second argument, or ``composite=``,
    may be a Zennit composite object, class or name instead, explained by the equal relprop
    method (:func:`composite_method`; ``EpsilonPlus``, ``EpsilonPlusFlat``,
    ``EpsilonAlpha2Beta1``, ``EpsilonAlpha2Beta1Flat``, ``EpsilonGammaBox``); ``composite=None``
    given explicitly is Zennit's plain gradient.  Zennit's ``create_graph`` must be False
    (relprop returns detached relevance) and ``retain_graph`` is accepted and unused.

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

    def __init__(self, model: nn.Module, method=_UNSET, attr_output=None, composite=_UNSET,
                 create_graph: bool = False, retain_graph=None, **params):
        if composite is not _UNSET and method is not _UNSET:   # "rap" given explicitly too
            raise TypeError("give either a method or a Zennit composite (composite=), not both")
        if method is _UNSET:
            method = "rap"
        if composite is _UNSET and (not isinstance(method, str) or _REGISTERED.get(method, method) in COMPOSITE_METHODS):
            composite = method                          # Zennit's Gradient(model, composite), a name too
        if composite is None:
            method = "gradient"                         # Zennit's Gradient(model, composite=None)
        elif composite is not _UNSET:
            method, params = composite_method(composite, params)
        if create_graph:
            raise ValueError("create_graph=True is not supported: relprop's relevance is not differentiable "
                             "through the rules (it is returned detached)")
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
            name = self.explainer.method.name

            def target(z):
                s = seed(z.detach())
                if not (s.shape == z.shape and is_one_hot(s)):
                    raise ValueError(f"method {name!r} builds its contrastive duals from one class per sample: "
                                     f"attr_output must be one-hot per sample (it selects that class)")
                return (z * s).sum(dim=1)

            att = self.explainer.attribute(input, target=target)
        return att.logits, att.relevance
