"""Capture a model once as a :class:`~.nodes.Graph` of relevance-relevant operations.

Why torch.fx: ``fx.Tracer`` records a graph whose nodes keep the *module* boundaries
(``features.28``, ``layer4.0.conv3``) that users, the authors' code and the golden files
name layers by, it traces every torchvision classifier without running it, and it never
touches the model: leaf modules are recorded, not executed, and the other modules' forward
is traced without their hooks, so no hook fires (:func:`hooks_not_run`) and no buffer moves.
``torch.export`` would decompose modules into aten ops (losing those names and the
conv/BN/pool structure the rules are defined on) and needs example inputs of a fixed size;
relprop has to work at any input size.

:func:`capture` makes one :class:`~.nodes.Node` per fx node with its kind from the tables
of :mod:`.kinds`, then resolves what a kind alone cannot say (helpers computing sizes,
products that are gates or constant scales, getitems that are indices or pieces of a
split), refuses every operation left without a rule in one :class:`UnsupportedModelError`,
and marks provably non-negative outputs and the layers reading the input.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import operator
import sys
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .kinds import (ACTIVATION, ACTIVATIONS, ADD, ATTENTION, BN, CAT, CONV, EXPAND, GATE, GATE_ACTIVATION, GETITEM,
                    HELPER, INDEX, INPUT, LEAKY_RELU, LINEAR, MATMUL, MEANS, METADATA_READERS, METHOD_KINDS, PERMUTE,
                    NAMED_MODULE_KINDS, NONNEG_UPSAMPLING, OFFSET, OUTPUT, PAD, PASS, PIECE, PRODUCT, RELU, RESHAPE,
                    SCALE, SIGN_PRESERVING, SIZE_OP, SOFTMAX, SPLIT, SUBTRACT, UPSAMPLE, function_kind, module_kind)
from . import through
from .nodes import (Graph, InProjection, Node, Ref, UnsupportedModelError, flatten, mean_dims, substitute)


class _Tracer(fx.Tracer):
    """fx tracer that also records the output node of every (container) module."""

    def __init__(self):
        super().__init__()
        self.module_outputs: dict[str, fx.Node] = {}
        # buffers read in forward are proxies too (fx's default runs what forward does with
        # them for real: ``self.count += 1`` would update the model's buffer at capture)
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """torch.nn modules, and the optional libraries' modules relprop knows whole."""
        return super().is_leaf_module(m, qualname) or (type(m).__module__, type(m).__name__) in NAMED_MODULE_KINDS

    def call_module(self, m, forward, args, kwargs):
        """Modules re-written with operations that have rules (:mod:`.through`) are traced
        through their re-writing; the others as fx does."""
        if type(m) is nn.MultiheadAttention and not through.mha_refusal(m, *args, **kwargs):
            out = through.multi_head_attention(m, *args, **kwargs)
            self.module_outputs[self.path_of_module(m)] = out[0].node
            return out
        if (rewrite := through.rewrite(m)) is not None:
            out = rewrite(m, *args, **kwargs)
            self.module_outputs[self.path_of_module(m)] = out.node
            return out
        if (inner := _wrapped(m)) is not None:   # a DataParallel / compiled submodule: trace what it wraps
            return inner[0](*args, **kwargs)
        # fx's ``forward`` is the module's __call__, which would run its hooks on proxies (their side
        # effects once, at capture; their traceable return values into the graph, for container
        # modules only): the module's own forward instead, so that no hook ever runs (hooks_not_run)
        out = super().call_module(m, m.forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_outputs[self.path_of_module(m)] = out.node
        return out


def _wrapped(m: nn.Module) -> tuple[nn.Module, str] | None:
    """The module that ``m`` wraps without changing what it computes, and the prefix of its
    names within ``m``: ``nn.DataParallel`` and ``DistributedDataParallel`` (``.module``: they
    only split the batch over devices) and a ``torch.compile``d module (``._orig_mod``: the
    compiled code computes its forward); None for any other module."""
    if isinstance(m, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return m.module, "module."
    # OptimizedModule exists only once torch._dynamo is imported (torch.compile imports it)
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if optimized is not None and isinstance(m, optimized) and isinstance(getattr(m, "_orig_mod", None), nn.Module):
        return m._orig_mod, "_orig_mod."
    return None


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The eager module computing ``model``'s output, through any nesting of the wrappers
    :func:`_wrapped` knows, and the prefix of its qualified names within ``model`` (``""``
    for an unwrapped model).  Nothing is changed: the wrapper is only read."""
    prefix = ""
    while (inner := _wrapped(model)) is not None:
        model, prefix = inner[0], prefix + inner[1]
    return model, prefix


# hook dicts of nn.Module, by kind; the module-global ones of torch.nn.modules.module share the names
_FORWARD_HOOKS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"))
_BACKWARD_HOOKS = (("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def hooks_not_run(model: nn.Module, backward: bool = False) -> list[tuple[str, int]]:
    """The hooks of ``model`` that relprop never runs, one ``(line, key)`` each (``key``: the
    hook's handle id, unique to it, which holds no reference to the hook): the line names
    the hooked module's qualified name (``<model>`` for the model itself, ``<all modules>`` for
    a hook registered with ``torch.nn.modules.module.register_module_forward_hook`` and the
    like), its type, the kind of hook and the hook's name.  Forward and forward pre-hooks
    always (the captured graph computes each module from its parameters, without calling it);
    backward hooks with ``backward=True`` (a method that differentiates the captured graph:
    module backward hooks are installed by the module's call, which never happens).  Whether
    a hook changes what the model computes (returns a value) cannot be known without running
    it, so every hook is listed, the ones that only record activations too."""
    kinds = _FORWARD_HOOKS + (_BACKWARD_HOOKS if backward else ())
    found = []
    for name, m in model.named_modules():
        for attr, kind in kinds:
            found += [(f"{name or '<model>'} ({type(m).__name__}): {kind} {_hook_name(h)}", key)
                      for key, h in getattr(m, attr, {}).items()]
    glob = sys.modules["torch.nn.modules.module"]
    for attr, kind in kinds:
        found += [(f"<all modules>: global {kind} {_hook_name(h)}", key)
                  for key, h in getattr(glob, "_global" + attr, {}).items()]
    return found


# plain values, compared by value; any other attribute by identity
_PLAIN = (type(None), bool, int, float, complex, str, bytes, tuple, torch.Size, torch.dtype, torch.device)
_ABSENT = object()


class ModelWatch:
    """What a capture of ``model`` depends on besides its parameters and buffers, to tell
    cheaply (once per call) whether it changed: every submodule by qualified name and
    identity, and each module's attributes (a stride, a negative slope, a GELU's
    approximation, a padding mode: plain values by value, other objects by identity; the
    training flag aside).  nn.Module's own dicts (parameters, buffers, submodules, hooks) are
    the same objects as long as the module is, and compare equal.  Not covered: an attribute
    container changed in place (a list appended to), and what fx traced of the model's own
    Python."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.entries = [(name, m, dict(vars(m))) for name, m in model.named_modules(remove_duplicate=False)]

    def changed(self) -> bool:
        now = list(self.model.named_modules(remove_duplicate=False))
        if len(now) != len(self.entries):
            return True
        for (name, m), (old_name, old_m, old) in zip(now, self.entries):
            if m is not old_m or name != old_name:
                return True
            attrs = vars(m)
            if len(attrs) != len(old):
                return True
            for k, v in attrs.items():
                o = old.get(k, _ABSENT)
                if v is o or k == "training":
                    continue
                try:
                    if not (type(v) is type(o) and isinstance(v, _PLAIN) and v == o):
                        return True
                except RuntimeError:   # a tuple of tensors
                    return True
        return False


class _ModuleState:
    """Every module's own attributes, and its parameter, buffer and submodule tables, as they
    are: the trace runs the forward's Python on proxies, which may assign to the model
    (``self.feats = h`` leaves a Proxy; ``self.count = self.count + 1`` a proxy buffer) and sets
    train flags; :meth:`restore` puts back what was there, so capturing never writes the model.
    (A write into a tensor's values is refused instead: :func:`_refuse_writes_to_model`.)"""

    def __init__(self, model: nn.Module):
        self.root = model
        self.saved = [(m, dict(vars(m)), {k: dict(getattr(m, k)) for k in _MODULE_TABLES})
                      for m in model.modules()]
        self.by_module = {id(m): (attrs, tables) for m, attrs, tables in self.saved}

    def had(self, target: str) -> bool:
        """Whether the attribute path ``target`` (``a.b.c``) existed before the trace."""
        *path, name = target.split(".")
        entry = self.by_module[id(self.root)]
        for part in path:
            m = entry[1]["_modules"].get(part)
            if m is None or id(m) not in self.by_module:
                return False
            entry = self.by_module[id(m)]
        return any(name in d for d in (entry[0], *entry[1].values()))

    def restore(self) -> None:
        for m, attrs, tables in self.saved:
            now = vars(m)
            for k in [k for k in now if k not in attrs]:
                del now[k]
            now.update(attrs)
            for k, table in tables.items():
                cur = getattr(m, k)
                if len(cur) != len(table) or any(cur.get(name, _ABSENT) is not v for name, v in table.items()):
                    cur.clear()
                    cur.update(table)


_MODULE_TABLES = ("_parameters", "_buffers", "_modules")


def _attr(model: nn.Module, target: str):
    return functools.reduce(getattr, target.split("."), model)


def _hook_name(hook) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


def _refuse_torchscript(model: nn.Module) -> None:
    """A TorchScript module has no Python forward that torch.fx could trace."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(f"TorchScript modules cannot be captured ({type(model).__name__}); pass the "
                                    "eager nn.Module (the model before torch.jit.script / torch.jit.trace)")
    scripted = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise UnsupportedModelError(f"TorchScript modules cannot be captured, and these submodules are TorchScript: "
                                    f"{', '.join(scripted)}; pass the eager nn.Module (the submodules before "
                                    "torch.jit.script / torch.jit.trace)")


def capture(model: nn.Module, output_key: str | None = None) -> Graph:
    """Trace ``model`` (in inference mode, flags restored afterwards) into a :class:`Graph`.

    ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers are
    captured as the module they wrap (:func:`unwrap`; the graph's layer names are that
    module's, and :meth:`Graph.node` also takes them with the wrapper's prefix); a TorchScript
    module is refused.  No hook of the model runs (:func:`hooks_not_run`).

    A model returning a dict of tensors (torchvision's segmentation models:
    ``{"out": ..., "aux": ...}``) is explained at one entry: ``output_key``, by default
    ``"out"``; the other entries (the auxiliary head) receive no relevance
    (:func:`_select_output`)."""
    model, prefix = unwrap(model)
    _refuse_torchscript(model)
    state = _ModuleState(model)
    try:
        model.eval()
        tracer = _Tracer()
        # extra forward parameters with defaults (timm's ``attn_mask=None, is_causal=False``) are
        # fixed at their defaults: their placeholders only feed fx's checks of those values
        try:
            params = list(inspect.signature(model.forward).parameters.values())[1:]
        except (TypeError, ValueError):   # no signature to read: trace as before
            params = []
        concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        try:
            fx_graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "cannot capture"
            hint = ("Its forward must not assign into tensors (x[...] = v, a buffer's entries): write it out of "
                    "place (torch.where, torch.cat)" if "does not support item assignment" in str(e) else
                    "Its forward must not branch on tensor values")
            raise UnsupportedModelError(
                f"relprop could not capture {type(model).__name__} with torch.fx: {type(e).__name__}: {e}. "
                f"{hint}.") from e
        # tensors the forward makes from no input (``torch.tensor(...)``) fx stores on the model
        # as ``_tensor_constant<i>``: the graph holds them instead, and the model is restored
        made = {n: _attr(model, n.target) for n in fx_graph.nodes if n.op == "get_attr" and not state.had(n.target)}
    finally:
        state.restore()

    index: dict[fx.Node, int] = {}
    nodes: list[Node] = []
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    fixed = placeholders[1:] if concrete and len(placeholders) == len(concrete) + 1 else []
    placeholders = [n for n in placeholders if n not in fixed]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model's forward must take exactly one tensor; it takes {len(placeholders)}")
    seen: dict[str, int] = {}
    for fn in fx_graph.nodes:
        node = _make_node(fn, model, len(nodes), index)
        if fn in fixed:
            node.kind = HELPER
        if node.name in seen:  # a module called more than once (ResNet's shared relu)
            seen[node.name] += 1
            node.name = f"{node.name}#{seen[node.name]}"
        else:
            seen[node.name] = 0
        if fn in made:
            node.held = made[fn]
        index[fn] = node.index
        nodes.append(node)
    _select_output(nodes[-1], output_key)
    _refuse_writes_to_model(nodes)
    _resolve_helpers(nodes)
    constant = _constants(nodes)
    _resolve_constants(nodes, constant)
    _resolve_attention(nodes, constant)
    _resolve_gates(nodes, constant)
    for n in nodes:
        if n.kind is None and n.module is not None and not n.why and nn.utils.parametrize.is_parametrized(n.module):
            # its weight is computed on access (and spectral_norm's, in training mode, updates
            # buffers as it is read): relprop reads only plain parameters
            n.why = ("a parametrized module (torch.nn.utils.parametrize: weight_norm, spectral_norm, ...); "
                     "explain a copy of the model with torch.nn.utils.parametrize.remove_parametrizations("
                     "module, 'weight') applied")
    problems = [n.describe() for n in nodes if n.kind is None]
    if problems:
        raise UnsupportedModelError(
            "relprop has no relevance rule for these operations of "
            f"{type(model).__name__}:\n  " + "\n  ".join(problems))
    out = nodes[-1]
    if len(out.parents) != 1 or len(out.args) != 1 or not isinstance(out.args[0], Ref):
        raise UnsupportedModelError("the model must return a single tensor of class scores")

    _mark_signs_and_first_layers(nodes)
    module_outputs = {k: index[v] for k, v in tracer.module_outputs.items() if v in index}
    return Graph(model, nodes, module_outputs, prefix)


def _select_output(out: Node, output_key: str | None) -> None:
    """Make the output node return the one tensor that is explained: the model's output, or
    its ``output_key`` entry (default ``"out"``) when the model returns a dict.  The other
    entries' nodes stay in the graph (they are computed, not explained: no relevance reaches
    them), so the model's own forward is matched node for node."""
    value = out.args[0] if len(out.args) == 1 else None
    if isinstance(value, dict):
        keys = list(value)
        key = "out" if output_key is None else output_key
        if key not in value:
            how = ("pass output_key= (relprop.Explainer, relprop.explain) to choose the entry to explain"
                   if output_key is None
                   else f"output_key={output_key!r} is not one of them")
            raise UnsupportedModelError(f"the model returns a dict with keys {keys}; relprop explains one tensor "
                                        f"entry: {how}")
        if not isinstance(value[key], Ref):
            raise UnsupportedModelError(f"the model's output entry {key!r} is not a tensor computed by the model")
        out.args, out.kwargs, out.parents = (value[key],), {}, (int(value[key]),)
    elif output_key is not None:
        raise ValueError(f"output_key={output_key!r} selects an entry of a dict output, but the model returns "
                         f"{'a single tensor' if isinstance(value, Ref) else type(value).__name__}")


def _make_node(fn: fx.Node, model: nn.Module, i: int, index: dict) -> Node:
    args = substitute(fn.args, index)
    kwargs = substitute(fn.kwargs, index)
    kind: str | None
    target: Any = fn.target
    name = fn.name
    why = ""
    if fn.op == "placeholder":
        kind = INPUT
    elif fn.op == "output":
        kind = OUTPUT
    elif fn.op == "call_module":
        target = model.get_submodule(fn.target)
        name = fn.target
        kind = module_kind(target)
        if kind == CONV:
            target, why = _explicit_padding(target)
            if target.padding_mode != "zeros":
                why = f"padding_mode={target.padding_mode!r} has no transposed map here (only 'zeros')"
            if why:
                kind = None
        if kind == BN and (target.running_mean is None or target.running_var is None):
            kind, why = None, BN_WITHOUT_RUNNING_STATS
        if type(target) is nn.MultiheadAttention:
            why = through.mha_refusal(target, *fn.args, **fn.kwargs)
    elif fn.op == "call_function":
        kind = function_kind(fn.target) or _no_mask_kind(fn)
        if fn.target in through.SIZE_FUNCTIONS:
            kind = HELPER
        elif fn.target is through.unexplained_weights:
            why = through.UNEXPLAINED_WEIGHTS_WHY
        why = why or through.opaque_why(fn.target)
        if fn.target is F.linear and (owner := _in_projection_owner(fn, model)) is not None:
            target, name = InProjection(owner), _module_path(model, owner) + ".in_proj"
        elif fn.target in _OWNED:
            owner, why = _owning_module(fn, model)
            if owner is not None:
                target, name = owner, _module_path(model, owner)
            if owner is None or why:
                kind = None
    elif fn.op == "call_method":
        kind = METHOD_KINDS.get(fn.target)
    else:  # get_attr: a parameter or buffer used outside a module
        kind = None
    tensor_args = list(args) + list(kwargs.values())
    if kind == CAT:
        tensor_args = list(args[0]) if args else list(kwargs.get("tensors", []))
    parents = tuple(int(a) for a in flatten(tensor_args) if isinstance(a, Ref))
    node = Node(i, name, kind, fn.op, target, args, kwargs, why=why)
    if kind == HELPER:
        node.parents = ()
    elif kind in (ADD, SUBTRACT, CAT, PRODUCT, SIZE_OP, MATMUL, ATTENTION):
        node.parents = parents
    elif kind not in (INPUT, None):
        node.parents = parents[:1]
    if kind == LEAKY_RELU and not _is_number(slope := _negative_slope(node), minimum=0):
        node.kind, node.why = None, f"negative_slope={slope!r}: only a constant slope >= 0 keeps the sign"
    if node.kind in (RELU, LEAKY_RELU, ACTIVATION, GATE_ACTIVATION):
        node.act = _activation(node)
    if kind == SPLIT:
        node.dim = node.param("dim", 1, 0) if target in ("unbind", torch.unbind) else node.param("dim", 2, 0)
    if kind == PAD and (why := _pad_refusal(node)):
        node.kind, node.why = None, why
    if kind == UPSAMPLE and (mode := _upsample_mode(node)) not in NONNEG_UPSAMPLING:
        node.kind, node.why = None, f"mode={mode!r}: only {', '.join(NONNEG_UPSAMPLING)} interpolate with weights >= 0"
    if fn.op != "get_attr" and target in MEANS and not (isinstance(dims := mean_dims(node), tuple)
                                                        and 0 not in dims):
        node.kind, node.why = None, (f"a mean over dim={dims!r} averages across the batch; average over "
                                     "the feature dims only, e.g. x.mean((2, 3))")
    return node


def _pad_refusal(n: Node) -> str:
    """``F.pad`` has a rule in constant mode with a constant number as the value (rules.pad)."""
    mode, value = n.param("mode", 2, "constant"), n.param("value", 3, None)
    if mode != "constant":
        return f"mode={mode!r}: only constant padding (mode='constant') is supported"
    if not (value is None or _is_number(value, minimum=-math.inf)):
        return "the padding value must be a constant number"
    return ""


def _no_mask(fn) -> bool:
    """A call of timm's ``resolve_self_attn_mask(n, attn, attn_mask, is_causal)`` building no mask."""
    if not (isinstance(fn, fx.Node) and getattr(fn.target, "__module__", "") == "timm.layers.attention"
            and getattr(fn.target, "__name__", "") == "resolve_self_attn_mask"):
        return False
    mask = fn.args[2] if len(fn.args) > 2 else fn.kwargs.get("attn_mask")
    causal = fn.args[3] if len(fn.args) > 3 else fn.kwargs.get("is_causal", False)
    return mask is None and causal is False


def _no_mask_kind(fn: fx.Node) -> str | None:
    """timm's unfused attention without a mask (fx-wrapped calls): ``resolve_self_attn_mask``
    then computes no mask (a helper) and ``maybe_add_mask(scores, None)`` is the identity."""
    if _no_mask(fn):
        return HELPER
    if getattr(fn.target, "__module__", "") == "timm.layers.attention" and fn.target.__name__ == "maybe_add_mask":
        mask = fn.args[1] if len(fn.args) > 1 else fn.kwargs.get("attn_mask")
        return PASS if mask is None or _no_mask(mask) else None
    return None


def _activation(n: Node):
    """The node's elementwise activation as an out-of-place function of its input."""
    key = type(n.module) if n.module is not None else n.target
    if n.kind == LEAKY_RELU:
        return functools.partial(F.leaky_relu, negative_slope=_negative_slope(n))
    if key in (nn.GELU, F.gelu):
        return functools.partial(F.gelu, approximate=n.param("approximate", 1, "none"))
    return ACTIVATIONS[key]


# Functional calls that a module subclass makes on its own tensors (timm's BatchNormAct2d and
# Linear, torchvision's LayerNorm2d trace through): the module class, the call's arguments
# after the input in order, the module's tensors among them, the optional ones.
_BN_OWNED = (nn.BatchNorm2d, ("running_mean", "running_var", "weight", "bias"),
             ("running_mean", "running_var", "weight", "bias"), ("weight", "bias"))
_OWNED = {F.batch_norm: _BN_OWNED, torch.batch_norm: _BN_OWNED,
          F.linear: (nn.Linear, ("weight", "bias"), ("weight", "bias"), ("bias",)),
          F.layer_norm: (nn.LayerNorm, ("normalized_shape", "weight", "bias"), ("weight", "bias"), ("weight", "bias"))}


BN_WITHOUT_RUNNING_STATS = (
    "track_running_stats=False: relprop explains with inference semantics, which normalise by the running "
    "mean and variance; this BatchNorm keeps none and normalises by the statistics of the batch, which would "
    "make each sample's map depend on the other samples in the batch; build it with track_running_stats=True "
    "and estimate its statistics on training data (forward passes in train mode) before explaining")


def _owning_module(fn: fx.Node, model: nn.Module) -> tuple[nn.Module | None, str]:
    """The module whose own tensors a functional ``batch_norm`` / ``linear`` / ``layer_norm``
    call reads (a BatchNorm2d / Linear / LayerNorm subclass that traces through), or None and
    why not."""
    cls, names, tensors, optional = _OWNED[fn.target]
    given = dict(zip(("input",) + names, fn.args), **{k: v for k, v in fn.kwargs.items() if k in tensors})
    if fn.target is F.batch_norm and (given.get("running_mean") is None or given.get("running_var") is None):
        # a BatchNorm subclass built with track_running_stats=False (timm's BatchNormAct2d): named if found
        w = given.get("weight")
        owner = (model.get_submodule(w.target.rpartition(".")[0])
                 if isinstance(w, fx.Node) and w.op == "get_attr" and w.target.endswith("weight") else None)
        return (owner if isinstance(owner, cls) else None), BN_WITHOUT_RUNNING_STATS
    why = f"a functional {fn.target.__name__} must read the tensors of one {cls.__name__} of the model"
    owners = set()
    for attr in tensors:
        a = given.get(attr)
        if a is None and attr in optional:
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr" and a.target.rpartition(".")[2] == attr):
            return None, why
        owners.add(a.target.rpartition(".")[0])
    owner = model.get_submodule(owners.pop()) if len(owners) == 1 else None
    return (owner, "") if isinstance(owner, cls) else (None, why)


def _in_projection_owner(fn: fx.Node, model: nn.Module) -> nn.MultiheadAttention | None:
    """The MultiheadAttention whose ``in_proj_weight`` (and bias) a functional linear reads."""
    tensors = list(fn.args[1:3]) + [fn.kwargs.get("weight"), fn.kwargs.get("bias")]
    owners = {a.target.rpartition(".")[0] for a in tensors if isinstance(a, fx.Node) and a.op == "get_attr"
              and a.target.rpartition(".")[2] in ("in_proj_weight", "in_proj_bias")}
    if len(owners) != 1 or not (isinstance(fn.args[1], fx.Node) and fn.args[1].target.endswith("in_proj_weight")):
        return None
    owner = model.get_submodule(owners.pop())
    return owner if type(owner) is nn.MultiheadAttention else None


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _resolve_helpers(nodes: list[Node]) -> None:
    """Helpers compute shapes and sizes, never relevance: parameters and buffers read outside a
    module (``get_attr``) that no relevance-carrying node takes as an input (a functional
    BatchNorm reads them through its module), and sums, products, comparisons, assertions and
    indexing that read only helpers (``c // 2`` of ``x.shape``, timm's ``_assert(x.ndim == 4)``).
    MultiheadAttention's weights output that nothing reads is a helper too."""
    inputs = {p for n in nodes for p in n.parents}
    read = {r for n in nodes for r in _refs(n)}
    for n in nodes:
        on_sizes = all(nodes[p].kind == HELPER and nodes[p].op != "get_attr" for p in n.parents)
        if n.op == "get_attr" and n.index not in inputs:
            n.kind = HELPER
        elif n.target is through.unexplained_weights and n.index not in read:
            n.kind, n.parents = HELPER, ()
        elif n.kind in (ADD, SUBTRACT, PRODUCT, SIZE_OP, GETITEM) and on_sizes:
            n.kind, n.parents = HELPER, ()
        elif n.kind == SIZE_OP and n.target is operator.sub:   # on tensors
            n.kind = SUBTRACT   # x - c: an offset if c is a constant (_resolve_constants)
            if len(n.parents) == 1 and _number_operand(n) and isinstance(n.args[0], Ref):
                n.kind = OFFSET     # x - 0.5: a bias (not 0.5 - x)
        elif n.kind == SIZE_OP:
            n.kind, n.why = None, "compares or computes with tensor values"
        elif n.kind in (ADD, SUBTRACT) and len(n.parents) == 1 and _number_operand(n) \
                and (n.kind == ADD or isinstance(n.args[0], Ref)):
            n.kind = OFFSET     # x + 0.5, 0.5 + x, x - 0.5: a bias
        elif n.kind == ADD and len(n.parents) != 2:
            n.kind, n.why = None, "adds to the signal something that is neither a model tensor nor a number"
        elif n.kind == GETITEM:
            n.kind, n.why = _getitem_kind(n, nodes)
            if n.kind == PIECE:
                n.dim = nodes[n.parents[0]].dim
                n.stack = nodes[n.parents[0]].target in ("unbind", torch.unbind)


def _getitem_kind(n: Node, nodes: list[Node]) -> tuple[str | None, str]:
    """``a[i]`` on a tensor: a piece of a split, or an index; only basic indexing (ints,
    slices, None, ...) is an index."""
    source = nodes[n.parents[0]].kind if n.parents else None
    index = n.args[1]
    if n.parents and source is None:   # e.g. nn.LSTM's (output, (h, c)): the producer is the problem
        return None, f"takes an item of the output of {nodes[n.parents[0]].name}, itself unsupported"
    if source == SPLIT:
        by_position = isinstance(index, int) and not isinstance(index, Ref)
        return (PIECE, "") if by_position else (None, "a split's pieces are taken by position")
    items = index if isinstance(index, tuple) else (index,)
    if source is not None and all(_basic_index(v, nodes) for v in items):
        return INDEX, ""
    return None, "only basic indexing (ints, slices, None, ...) of a tensor is supported"


def _basic_index(v, nodes: list[Node]) -> bool:
    if isinstance(v, slice):
        return all(_basic_index(b, nodes) for b in (v.start, v.stop, v.step))
    if isinstance(v, Ref):   # a size computed from shapes, not a tensor
        return nodes[v].kind == HELPER and nodes[v].op != "get_attr"
    return v is None or v is Ellipsis or (isinstance(v, int) and not isinstance(v, bool))


def _refs(n: Node):
    """Every node reference among the node's arguments (nested in tuples, lists, dicts, slices)."""
    return (int(a) for a in flatten((n.args, n.kwargs)) if isinstance(a, Ref))


def _in_place(n: Node) -> bool:
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return n.target in (operator.setitem, operator.iadd) or (name.endswith("_") and not name.endswith("__"))


# Calls whose result is a view of their first argument (writing into it writes into that).
_VIEWS = (RESHAPE, PERMUTE, EXPAND, PASS, GETITEM, SPLIT)


def _refuse_writes_to_model(nodes: list[Node]) -> None:
    """An in-place call into a parameter or buffer (``self.count.add_(1)``,
    ``self.buf.copy_(x)``), or into a view of one, would write the model at every relprop
    forward (``self.count += 1`` is traced as an add and an assignment, which the capture
    undoes: :class:`_ModuleState`): refused with the tensor's name, since relprop reads the model and never writes
    it (and a forward that updates state is not one function of its input to explain)."""
    for n in nodes:
        if n.op not in ("call_function", "call_method") or not _in_place(n) or not n.args:
            continue
        base = n.args[0]
        while isinstance(base, Ref) and nodes[int(base)].op in ("call_function", "call_method") \
                and nodes[int(base)].kind in _VIEWS and nodes[int(base)].args:
            base = nodes[int(base)].args[0]
        if isinstance(base, Ref) and nodes[int(base)].op == "get_attr":
            n.kind, n.parents = None, ()
            n.why = (f"writes into the model's tensor {nodes[int(base)].target!r} in place: relprop reads the "
                     "model and never writes it; keep state updates out of forward (or explain a copy without them)")


def _constants(nodes: list[Node]) -> list[bool]:
    """Which nodes are constants: computed from the model's parameters and buffers and from
    sizes only, never from the input's values.  Parameters and buffers (``get_attr``), and the
    calls that read only constants and sizes and change nothing in place: a ViT's class token
    expanded to the batch, a Swin's relative position bias gathered from its table
    (torchvision's ``_get_relative_position_bias``, timm's ``table[index].view(...)``), its
    shifted windows' mask (a buffer in timm, :func:`.through.shift_mask` in torchvision), an
    attention mask.  They are evaluated at every forward like any node; a consumer that takes
    a constant (an offset, a concatenation, a layer scale, an attention mask) makes it and
    what it is computed from helpers (:func:`_mark_constant`), and relevance reaching it is
    dropped like a bias's share."""
    constant = [False] * len(nodes)

    def known(r: int) -> bool:
        return constant[r] or (nodes[r].kind == HELPER and nodes[r].op != "get_attr")   # a constant or a size

    for n in nodes:
        if n.op == "get_attr":
            constant[n.index] = True
        elif n.op in ("call_function", "call_method") and n.kind != HELPER and not _in_place(n):
            refs = list(_refs(n))
            if n.target in METADATA_READERS and n.args and isinstance(n.args[0], Ref):
                refs = refs[1:]   # the tensor whose shape, dtype and device it reads
            constant[n.index] = all(known(r) for r in refs)
    return constant


def _resolve_constants(nodes: list[Node], constant: list[bool]) -> None:
    """Model tensors that enter the signal: a ViT's class token concatenated to the patch
    tokens (``cat([cls.expand(B, -1, -1), x])``) and its position embedding added to them
    (``x + pos``), a Swin's relative position bias and shift mask added to its attention
    logits.  They are read at every forward like any parameter (helpers); relevance
    reaching them is dropped, as a bias's share is.  An add of one signal and one constant
    (:func:`_constants`) is an offset (a bias, rules.offset).  A constant that nothing reads
    is a helper."""
    read = {r for n in nodes for r in _refs(n)}
    for n in reversed(nodes):
        if constant[n.index] and n.index not in read and n.kind != HELPER:
            _mark_constant(nodes, n.index, constant)
    for n in nodes:
        if constant[n.index]:
            continue
        if n.kind == CAT:
            for p in n.parents:
                if constant[p] and len(n.parents) > 1:
                    _mark_constant(nodes, p, constant)
        elif n.kind == ADD and len(n.parents) == 2:
            constants = [constant[p] for p in n.parents]
            if sum(constants) == 1:
                n.kind = OFFSET
                _mark_constant(nodes, n.parents[constants.index(True)], constant)
        elif n.kind == SUBTRACT:
            signal_first = isinstance(n.args[0], Ref) if n.args else False
            if len(n.parents) == 2 and signal_first and not constant[n.parents[0]] and constant[n.parents[1]]:
                n.kind = OFFSET
                _mark_constant(nodes, n.parents[1], constant)
            else:
                n.kind, n.why = None, SUBTRACT_WHY


def _through_pass(nodes: list[Node], i: int, kinds=(PASS,)) -> Node:
    n = nodes[i]
    while n.kind in kinds and n.parents:
        n = nodes[n.parents[0]]
    return n


# What may lie between ``q @ k^T`` and its softmax: dropout, a scale (a product, resolved to a
# scale or refused by _resolve_gates), an additive constant (a relative position bias, a mask:
# offsets), reshapes (Swin's windows and heads).
_LOGITS_PATH = (PASS, PRODUCT, SCALE, OFFSET, RESHAPE)


def _resolve_attention(nodes: list[Node], constant: list[bool]) -> None:
    """Attention's softmax and products, refused elsewhere: a softmax over the last dim whose
    output (through dropout) only weights values, ``softmax(...) @ v``; ``q @ k^T`` feeding
    only softmaxes, possibly through a scale, additive constants (a relative position bias, a
    mask) and reshapes; the fused ``scaled_dot_product_attention(q, k, v)``, possibly causal or
    with a constant ``attn_mask`` (additive float or boolean, computed from model tensors and
    sizes: :func:`_constants`), without dropout."""
    consumers: list[list[tuple[Node, int]]] = [[] for _ in nodes]
    for n in nodes:
        for k, p in enumerate(n.parents):
            consumers[p].append((n, k))

    def readers(i: int, through=(PASS,)) -> list[tuple[Node, int]]:
        out = []
        for c, k in consumers[i]:
            out += readers(c.index, through) if c.kind in through else [(c, k)]
        return out

    for n in nodes:
        if n.kind == SOFTMAX:
            dim = n.param("dim", 1, None)
            if dim not in (-1,) or not readers(n.index) or any(c.kind != MATMUL or k != 0 for c, k in readers(n.index)):
                n.kind, n.why = None, ("only attention's softmax over the last dim (dim=-1) whose output weights "
                                       "values (softmax(...) @ v) is supported")
            else:
                n.nonneg = True
        elif n.kind == MATMUL:
            weights = len(n.parents) == 2 and _through_pass(nodes, n.parents[0]).kind == SOFTMAX
            scores = len(n.parents) == 2 and bool(readers(n.index, _LOGITS_PATH)) and all(
                c.kind == SOFTMAX for c, _ in readers(n.index, _LOGITS_PATH))
            if not (weights or scores) or any(constant[p] for p in n.parents):
                n.kind, n.why = None, ("only attention's products are supported: q @ k^T feeding a softmax (through "
                                       "scales, additive constants and reshapes), and softmax(...) @ v")
        elif n.kind == ATTENTION:
            dropout = n.param("dropout_p", 4, 0.0)
            mask = n.param("attn_mask", 3, None)
            scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
            constant_mask = isinstance(mask, Ref) and constant[mask]
            good_scale = scale is None or _is_number(scale, minimum=0)
            if len(n.parents) != 3 + isinstance(mask, Ref) or not (mask is None or constant_mask) or dropout != 0 \
                    or not good_scale or n.kwargs.get("enable_gqa", False):
                n.kind, n.why = None, ("only scaled_dot_product_attention(q, k, v) without dropout or grouped queries, "
                                       "possibly causal or with an attn_mask computed from model tensors and sizes "
                                       "(not from the input), is supported")
            elif constant_mask:
                _mark_constant(nodes, mask, constant)


def _resolve_gates(nodes: list[Node], constant: list[bool]) -> None:
    """A product is a gate when exactly one of its two factors is a Sigmoid/Hardsigmoid output
    (through reshapes and expands); those may feed nothing but gates, since no relevance
    reaches them."""
    def is_gate(i: int) -> bool:
        n = nodes[i]
        while n.kind in (RESHAPE, EXPAND) and n.parents:
            n = nodes[n.parents[0]]
        return n.kind == GATE_ACTIVATION

    for n in nodes:
        if n.kind != PRODUCT:
            continue
        gates = [is_gate(p) for p in n.parents]
        divides = n.target in (operator.truediv, torch.div, "div")
        factor = _factor(n) if len(n.parents) == 1 else None
        numerator_is_tensor = isinstance(n.args[0], Ref)
        constants = [constant[p] for p in n.parents]
        if _is_number(factor, minimum=-math.inf) and factor != 0 and (numerator_is_tensor or not divides):
            n.kind = SCALE   # x * c, c * x, x / c
        elif len(constants) == 2 and sum(constants) == 1 and not (divides and constants[0]):
            # x * gamma, gamma * x, x / gamma with gamma a model tensor (ConvNeXt's layer scale) or
            # a constant computed from model tensors (:func:`_constants`):
            # read at every forward like any parameter; the signal is the only parent left
            n.kind = SCALE
            _mark_constant(nodes, n.parents[constants.index(True)], constant)
        elif len(gates) == 2 and sum(gates) == 1 and not divides:
            n.kind, n.gate = GATE, gates.index(True)
        else:
            n.kind, n.why = None, ("only a signal times a Sigmoid/Hardsigmoid gate (squeeze-excitation) or a "
                                   "tensor times or over a constant number is supported, or times or over a "
                                   "parameter or buffer of the model (a layer scale)")
    feeds_gates = [False] * len(nodes)
    consumers: list[list[tuple[Node, int]]] = [[] for _ in nodes]
    for n in nodes:
        for k, p in enumerate(n.parents):
            consumers[p].append((n, k))
    for n in reversed(nodes):
        feeds_gates[n.index] = bool(consumers[n.index]) and all(
            (c.kind == GATE and k == c.gate) or (c.kind in (RESHAPE, EXPAND) and feeds_gates[c.index])
            for c, k in consumers[n.index])
        if n.kind in (GATE_ACTIVATION, EXPAND) and not feeds_gates[n.index]:
            n.kind, n.why = None, "supported only as the gate of a product (squeeze-excitation)"


SUBTRACT_WHY = ("a subtraction has a rule only as x - c, with c a parameter, a buffer or a number "
                "(a bias, like x + c); x - y of two signals, and c - x, have none")


def _number_operand(n: Node) -> bool:
    """The other operand of a one-tensor add or subtract is a plain number (an offset)."""
    others = [a for a in n.args if not isinstance(a, Ref)]
    return len(others) == 1 and isinstance(others[0], (int, float)) and not isinstance(others[0], bool) \
        and not n.kwargs


def _mark_constant(nodes: list[Node], i: int, constant: list[bool]) -> None:
    """A constant (:func:`_constants`) that a signal takes, and the constants it is computed
    from: helpers, which relevance never enters."""
    n = nodes[i]
    n.kind, n.parents = HELPER, ()
    for r in _refs(n):
        if constant[r] and nodes[r].kind != HELPER:
            _mark_constant(nodes, r, constant)


def _factor(n: Node):
    """The constant operand of a product or quotient with one tensor operand."""
    others = [a for a in (n.args + tuple(n.kwargs.values())) if not isinstance(a, Ref)]
    return others[0] if len(others) == 1 else None


def _upsample_mode(n: Node):
    return n.param("mode", 3, "nearest")


def _negative_slope(n: Node):
    return n.param("negative_slope", 1, 0.01)


def _is_number(v, minimum: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, (bool, Ref)) and v >= minimum


def _explicit_padding(conv: nn.Conv2d) -> tuple[nn.Conv2d, str]:
    """``(conv, "")``, with a string padding written out as integers: ``"valid"`` is 0 and
    ``"same"`` is ``dilation * (kernel - 1) / 2`` per side.  That conv is a shallow twin of the
    user's (the same Parameter objects; the user's module is never changed).  A ``"same"``
    whose total ``dilation * (kernel - 1)`` is odd pads one side more than the other and has
    no symmetric integer padding: ``(conv, reason)``."""
    if not isinstance(conv.padding, str):
        return conv, ""
    if conv.padding == "valid":
        pad = (0, 0)
    else:
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            return conv, (f"padding='same' with kernel {tuple(conv.kernel_size)} and dilation "
                          f"{tuple(conv.dilation)} pads unevenly; use an odd kernel or explicit padding")
        pad = tuple(t // 2 for t in totals)
    twin = copy.copy(conv)
    twin.padding = pad
    return twin, ""


def _mark_signs_and_first_layers(nodes: list[Node]) -> None:
    helpers = {n.index for n in nodes if n.kind == HELPER}
    for n in nodes:
        n.parents = tuple(p for p in n.parents if p not in helpers)
        if n.kind == RELU:
            n.nonneg = True
        elif n.kind == GATE:  # the gate factor is >= 0: the signal decides
            n.nonneg = nodes[n.parents[1 - n.gate]].nonneg
        elif n.kind == SCALE:   # a layer scale's sign is unknown at capture (never read from parameters)
            factor = _factor(n)
            n.nonneg = _is_number(factor, minimum=0) and factor > 0 and nodes[n.parents[0]].nonneg
        elif n.kind in SIGN_PRESERVING and n.parents:
            n.nonneg = all(nodes[p].nonneg for p in n.parents)
        elif n.kind == PAD:   # padding with a number >= 0 (default 0)
            value = n.param("value", 3, None)
            n.nonneg = nodes[n.parents[0]].nonneg and (value is None or value >= 0)
    for n in nodes:
        if n.kind in (CONV, LINEAR):
            p = nodes[n.parents[0]]
            while p.kind in (PASS, RESHAPE) and p.parents:
                p = nodes[p.parents[0]]
            n.first_layer = p.kind == INPUT
