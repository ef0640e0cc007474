"""Model specs for the command line: built-in, torchvision or ``package.module:function``.

:func:`load_model` resolves a spec to ``(model in eval mode, default preprocessing)``:

* ``shapes-vgg`` / ``shapes-resnet`` / ``shapes-convnext`` / ``shapes-vit``: relprop's
  built-in classifiers of the "shapes in clutter" benchmark (:mod:`relprop.benchmark.models`,
  trained weights shipped with the package); preprocessing 64 x 64 with the benchmark's mean/std
  (:func:`relprop.benchmark.normalise`);
* a torchvision architecture name (``resnet50``, ``vgg16``...): ``weights`` is a state
  dict file or a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``,
  ``ResNet50_Weights.IMAGENET1K_V1``) read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/<file>``, never downloaded); preprocessing: the weights'
  own (resize, crop, mean/std, interpolation) for a weights name, else ImageNet at 224;
* ``package.module:function``: called (with ``num_classes=`` if given), must return an
  ``nn.Module``; ImageNet preprocessing.  An exception raised by the function or while
  importing its module is a :class:`ModelFunctionError` naming the spec; torchvision's own
  builders are called with ``weights_backbone=None`` where they have it (never downloaded).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import urllib.parse
import warnings

import torch
import torch.nn as nn

from .images import IMAGENET, Preprocessing

MODEL_SPEC_HELP = ("a model is a built-in one (shapes-vgg, shapes-resnet, shapes-convnext, shapes-vit), a "
                   "torchvision architecture name (e.g. resnet50, vgg16; --weights a state dict file or a "
                   "torchvision weights name such as "
                   "IMAGENET1K_V1 or DEFAULT) or 'package.module:function', a function importable from the "
                   "Python path that returns a torch.nn.Module")
_WEIGHTS_NAME = re.compile(r"([A-Za-z0-9]+_Weights\.)?[A-Z][A-Z0-9_]*")


def load_model(spec: str, weights=None, num_classes: int | None = None) -> tuple[nn.Module, Preprocessing]:
    """``(model, preprocessing)`` for ``spec`` (see the module docstring).

    ``weights``: path of a state dict (``torch.save(model.state_dict(), path)``; a
    checkpoint dict holding it under ``"state_dict"`` or ``"model"`` works too), loaded
    strictly, or for torchvision architectures a weights name.  Raises ValueError with a
    clear message for an unknown spec, a bad weights file or weights missing from the
    cache.  Randomly initialised models are built with the seed 0 (the caller's random
    state is left alone), so they are the same in every process and run.
    """
    from .benchmark import models as builtin

    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    preprocessing = IMAGENET
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec in builtin.MODELS:
            if num_classes is not None:
                raise ValueError(f"{spec!r} is a built-in model with {len(builtin.CLASSES)} classes; "
                                 "drop --num-classes")
            model = builtin.load(spec) if weights is None else builtin.build(spec)
            preprocessing = builtin_preprocessing()
        elif ":" in spec:
            model = _from_function(spec, kwargs, weights)
        else:
            tv_weights = _torchvision_weights(spec, weights)
            model = _from_torchvision(spec, tv_weights, kwargs)
            if weights is None:   # easy to miss: the maps of an untrained net explain nothing learnt
                warnings.warn(f"{spec}: no weights given, so the model has random weights (seed 0); pass a "
                              "state dict file or a torchvision weights name (--weights) to explain a trained model",
                              UserWarning, stacklevel=2)
            if tv_weights is not None:
                preprocessing = weights_preprocessing(tv_weights)
                weights = None
    if weights is not None:
        load_weights(model, weights)
    return model.eval(), preprocessing


def builtin_preprocessing() -> Preprocessing:
    """64 x 64, normalised like :func:`relprop.benchmark.normalise`."""
    from .benchmark import MEAN, STD
    from .benchmark.models import INPUT_SIZE

    return Preprocessing(INPUT_SIZE, INPUT_SIZE, MEAN, STD)


def weights_preprocessing(weights) -> Preprocessing:
    """The preprocessing of torchvision ``weights`` (its ``transforms()``), ImageNet if it has none."""
    t = weights.transforms()
    if not all(hasattr(t, a) for a in ("crop_size", "resize_size", "mean", "std", "interpolation")):
        return IMAGENET
    return Preprocessing(t.crop_size[0], t.resize_size[0], t.mean, t.std, t.interpolation.value)


def weights_cache_path(weights) -> str:
    """Where torch hub (and so torchvision) looks for the file of ``weights``."""
    name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


class ModelFunctionError(ValueError):
    """A ``package.module:function`` model spec whose module or function raised: ``str(e)`` is
    ``"<spec> raised <exception type>: <message>"`` (or ``"<spec>: importing <module> raised ..."``),
    one line; the exception raised is ``e.__cause__``."""

    def __init__(self, spec: str, detail: str):
        super().__init__(f"{spec}{detail}")
        self.spec = spec


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_torchvision_builder(fn) -> bool:
    return (getattr(fn, "__module__", None) or "").startswith("torchvision.models")


def _from_function(spec: str, kwargs: dict, weights=None) -> nn.Module:
    """Import and call the function of a ``package.module:function`` spec.

    A module or function that is not there is a ValueError with the spec help; an exception
    raised while importing the module or by the function is a :class:`ModelFunctionError`
    naming the spec and the exception.  A torchvision builder
    (``torchvision.models.segmentation:fcn_resnet50``...) is called with
    ``weights_backbone=None`` where it has that argument, so nothing is downloaded (its
    default is the ImageNet backbone, fetched from the internet); its weights are random
    (seed 0) unless ``weights`` (a state dict file) is given, with a warning as for
    torchvision architecture names.
    """
    import inspect

    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name or ":" in fn_name:
        raise ValueError(f"bad model spec {spec!r}: expected 'package.module:function'; {MODEL_SPEC_HELP}")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise ValueError(f"cannot import model function {spec!r} (no module {e.name!r} on the Python path); "
                             f"{MODEL_SPEC_HELP}") from None
        raise ModelFunctionError(spec, f": importing {mod_name} raised {_one_line(e)}") from e
    except (Exception, SystemExit) as e:   # a SyntaxError, or anything the module raises (or exits with) at import
        raise ModelFunctionError(spec, f": importing {mod_name} raised {_one_line(e)}") from e
    if not hasattr(module, fn_name):
        raise ValueError(f"cannot import model function {spec!r} (module {mod_name!r} has no attribute "
                         f"{fn_name!r}); {MODEL_SPEC_HELP}")
    fn = getattr(module, fn_name)
    if not callable(fn):
        raise ValueError(f"{spec!r} is a {type(fn).__name__}, not a function returning a torch.nn.Module")
    if _is_torchvision_builder(fn):
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "weights_backbone" in params:      # its default downloads ImageNet weights for the backbone
            kwargs = dict(kwargs, weights_backbone=None)
    try:
        model = fn(**kwargs)
    except (Exception, SystemExit) as e:   # sys.exit() inside a factory is a failure of the factory too
        raise ModelFunctionError(spec, f" raised {_one_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if _is_torchvision_builder(fn) and weights is None:
        warnings.warn(f"{spec}: a torchvision model built without weights has random weights (seed 0); pass a "
                      "state dict file (--weights) to explain a trained model", UserWarning, stacklevel=3)
    return model


def _torchvision_weights(spec: str, weights):
    """The torchvision weights enum member named by ``weights``, or None for a path / no weights."""
    import torchvision

    # the command line explains image classifiers: torchvision's top-level models (not its
    # detection, segmentation, video, optical-flow or quantized ones)
    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        other = spec in torchvision.models.list_models()
        raise ValueError((f"{spec!r} is a torchvision model but not an image classifier; the command line "
                          "explains image classifiers"
                          if other else f"unknown model {spec!r}") +
                         f"; {MODEL_SPEC_HELP}. torchvision classifiers: {', '.join(names)}")
    if weights is None or not _WEIGHTS_NAME.fullmatch(os.fspath(weights)):
        return None
    enum = torchvision.models.get_model_weights(spec)
    short = os.fspath(weights).removeprefix(enum.__name__ + ".")
    if short not in enum.__members__:
        raise ValueError(f"{spec} has no torchvision weights {weights!r}; its weights are: "
                         f"{', '.join(enum.__members__)} (or give a state dict file)")
    member = enum[short]
    path = weights_cache_path(member)
    if not os.path.isfile(path):
        raise ValueError(f"torchvision weights {member!r} are not available offline: put the file "
                         f"{os.path.basename(path)} (from {member.url}) at {path} (the torch hub cache; "
                         "set TORCH_HOME to use another folder), or give --weights a state dict file")
    return member


def _from_torchvision(spec: str, weights, kwargs: dict) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(spec, weights=weights, progress=False, **kwargs)
    except (RuntimeError, ValueError) as e:
        if weights is None:
            raise
        raise ValueError(f"cannot load torchvision weights {weights!r} from {weights_cache_path(weights)}: "
                         f"{e}") from None


def load_weights(model: nn.Module, path) -> None:
    """Load a state dict file into ``model`` strictly; ValueError if it does not fit."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            raise ValueError(f"weights file {path!r} holds pickled Python objects (a whole model saved with "
                             "torch.save(model)?), which relprop does not unpickle: save model.state_dict() "
                             "instead") from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"cannot read weights file {path!r}: not a file torch.save wrote "
                         f"({type(e).__name__}{f': {first}' if first else ''})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path!r} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise ValueError(f"weights file {path!r} does not fit the model: {_misfit(model.state_dict(), state)}") from None


def _misfit(own: dict, state: dict) -> str:
    """What differs between the model's state dict and a file's, in one line: counts, a few
    names, and the number of classes where only the output layer's size differs."""
    def some(names):
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(getattr(state[k], "shape", ())), tuple(own[k].shape)) for k in own
              if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} tensors are not in the file ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors of the file are not in the model ({some(unexpected)})")
    if shapes:
        k, theirs, ours = shapes[0]
        parts.append(f"{len(shapes)} tensors have other shapes (the first, {k}: {theirs} in the file, {ours} in "
                     f"the model)")
        last = [k for k in own if own[k].dim() >= 1][-2:]   # the output layer's weight and bias
        if not missing and not unexpected and {k for k, _, _ in shapes} <= set(last) and theirs[1:] == ours[1:]:
            parts.append(f"the file's output layer has {theirs[0]} classes, the model's {ours[0]}: build the model "
                         f"with {theirs[0]} classes (--num-classes {theirs[0]})")
    return "; ".join(parts) or "load_state_dict refused it"


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and values of the parameters and buffers."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
