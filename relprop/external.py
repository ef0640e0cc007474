"""Other libraries' attribution methods as explain callables, so that ``relprop evaluate``
scores them with the same code on the same images: ``captum:<Attribution>`` (a class of
``captum.attr`` built from the model alone, e.g. ``captum:IntegratedGradients``) and
``zennit:<Composite>`` (a class of ``zennit.composites``, e.g. ``zennit:EpsilonPlusFlat``,
run with Zennit's ``Gradient`` attributor).  Used by :mod:`relprop.evaluate` only; the
library does not import it.

Both explain the given class with a one-hot output seed (Zennit's and Captum's usual
call); every map is the channel sum of the attribution.  Each call works on an eval-mode
``copy.deepcopy`` of the model, because Zennit's canonizers and hooks write to the model
they are given and a Captum forward in training mode would update BatchNorm statistics:
the model itself is never touched.  Zennit composites get a BatchNorm canonizer for every
conv -> BatchNorm pair relprop's capture finds (``NamedMergeBatchNorm``, so a ResNet's
``conv1``/``bn1`` attributes are merged too) and Zennit's canonizers of torchvision's
ResNet blocks (which split the residual sum in proportion to its inputs); the residual
adds of other models get no canonizer, so Zennit back-propagates them as a plain gradient
(what a Zennit user gets on such a model without writing one).  A composite that needs z^B bounds (``low``,
``high``, e.g. ``EpsilonGammaBox``) gets each image's own min and max, relprop's
``zb_bounds="image"``.
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["is_external", "check", "explain_function"]

LIBRARIES = ("captum", "zennit")
_EXAMPLES = {"captum": "IntegratedGradients, Saliency, InputXGradient, GuidedBackprop, DeepLift",
             "zennit": "EpsilonPlusFlat, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, GuidedBackprop"}


def is_external(method: str) -> bool:
    """``method`` names another library's method (``library:name``)."""
    return ":" in method


def _class(method: str):
    lib, _, name = method.partition(":")
    if lib not in LIBRARIES:
        raise ValueError(f"unknown library {lib!r} in method {method!r}; external methods are captum:<Attribution> "
                         f"or zennit:<Composite>")
    try:
        module = __import__("captum.attr" if lib == "captum" else "zennit.composites", fromlist=["_"])
    except ImportError:
        raise ValueError(f"method {method!r} needs {lib} (pip install {lib})") from None
    base = module.Attribution if lib == "captum" else module.Composite
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)) or name.startswith("_"):
        raise ValueError(f"{lib} has no {'attribution' if lib == 'captum' else 'composite'} {name!r}; e.g. "
                         f"{_EXAMPLES[lib]}")
    required = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    allowed = ({"forward_func", "model"} if lib == "captum" else {"low", "high"})
    if set(required) - allowed:
        missing = ", ".join(sorted(set(required) - allowed))
        raise ValueError(f"method {method!r} needs constructor arguments ({missing}) that relprop evaluate cannot "
                         f"give; e.g. {_EXAMPLES[lib]}")
    if lib == "captum":
        abstract = {"Attribution", "GradientAttribution", "PerturbationAttribution", "LayerAttribution",
                    "NeuronAttribution"}
        attribute = getattr(cls, "attribute", None)
        call = [] if attribute is None else [
            p.name for p in list(inspect.signature(attribute).parameters.values())[2:]
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if name in abstract or attribute is None:
            raise ValueError(f"{method!r} is one of Captum's base classes, not an attribution method; e.g. "
                             f"{_EXAMPLES[lib]}")
        if call:
            raise ValueError(f"method {method!r} needs arguments ({', '.join(call)}) that relprop evaluate cannot "
                             f"give; e.g. {_EXAMPLES[lib]}")
    return lib, cls, required


def check(method: str) -> None:
    """ValueError unless ``method`` is a usable ``captum:``/``zennit:`` method here."""
    _class(method)


def _batchnorm_pairs(model: nn.Module) -> list:
    """``([conv name], bn name)`` for every BatchNorm that reads one conv/linear output only."""
    from . import graph as g

    graph = g.capture(model)
    pairs = []
    for n in graph.nodes:
        if n.kind == g.BN and n.module is not None and len(n.parents) == 1:
            p = graph.nodes[n.parents[0]]
            if p.kind in (g.CONV, g.LINEAR) and p.module is not None and graph.consumers[p.index] == [n.index]:
                pairs.append(([p.name], n.name))
    return pairs


def explain_function(method: str) -> Callable:
    """``explain(model, x, targets) -> (B, H, W)`` for a ``captum:``/``zennit:`` method."""
    lib, cls, required = _class(method)

    def explain(model: nn.Module, x: torch.Tensor, targets) -> torch.Tensor:
        net = copy.deepcopy(model).eval()
        t = torch.as_tensor(targets, device=x.device).long().reshape(-1).expand(x.shape[0])
        inputs = x.detach().clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(require|requires) grad", category=UserWarning)
            if lib == "captum":
                attribution = cls(net).attribute(inputs, target=t)
            else:
                from zennit.attribution import Gradient
                from zennit.canonizers import NamedMergeBatchNorm

                from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

                kwargs = {"canonizers": [NamedMergeBatchNorm(_batchnorm_pairs(net)), ResNetBasicBlockCanonizer(),
                                         ResNetBottleneckCanonizer()]}
                if required:
                    kwargs.update(low=x.detach().amin(dim=(1, 2, 3), keepdim=True).expand_as(x),
                                  high=x.detach().amax(dim=(1, 2, 3), keepdim=True).expand_as(x))
                with torch.no_grad():
                    classes = net(x[:1]).shape[1]
                onehot = torch.nn.functional.one_hot(t, classes).to(x.dtype)
                with Gradient(net, cls(**kwargs)) as attributor:
                    _, attribution = attributor(inputs, onehot)
        return attribution.detach().sum(dim=1)

    explain.__name__ = explain.__qualname__ = f"explain_{lib}_{cls.__name__}"
    return explain
