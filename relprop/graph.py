"""Capture a model once as a graph of relevance-relevant operations.

Why torch.fx: ``fx.Tracer`` records a graph whose nodes keep the *module* boundaries
(``features.28``, ``layer4.0.conv3``) that users, the authors' code and the golden files
name layers by, it traces every torchvision classifier without running it, and it never
touches the model: leaf modules are recorded, not executed, so no hook fires and no buffer
moves.  ``torch.export`` would decompose modules into aten ops (losing those names and
the conv/BN/pool structure the rules are defined on) and needs example inputs of a fixed
size; relprop has to work at any input size.

The captured :class:`Graph` is a topologically ordered list of :class:`Node`; each tensor
node knows its kind (``conv``, ``linear``, ``relu``, ...), its tensor parents and the
module or call that computes it.  :meth:`Graph.forward` runs the graph itself with
inference semantics (BatchNorm on running statistics, dropout off, no in-place ops) and
returns every node's value, which is all the relevance pass needs: the model is never
called again.
"""
from __future__ import annotations

import copy
import functools
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- kinds
# Relevance kinds.  "relu", "leaky_relu", "activation" and "pass" nodes hand relevance
# through unchanged (elementwise identities for relevance: ReLU, Dropout, Identity, BatchNorm
# in every published method; the other activations by the same rule, as Zennit does).
# "relu" outputs are >= 0 (ReLU, ReLU6), "leaky_relu" keeps the sign, "activation" (SiLU,
# Hardswish, GELU) need not, and "pass" is the identity in the forward pass too.  A "gate"
# multiplies a signal by a "gate_activation" (Sigmoid, Hardsigmoid: squeeze-excitation),
# possibly reshaped or expanded on the way; the signal takes all the relevance.  A "scale"
# multiplies or divides by a constant number, which relevance passes unchanged.
CONV, LINEAR = "conv", "linear"
RELU, LEAKY_RELU, ACTIVATION, BN, PASS = "relu", "leaky_relu", "activation", "bn", "pass"
GATE, GATE_ACTIVATION, EXPAND, SCALE = "gate", "gate_activation", "expand", "scale"
PRODUCT = "product"   # at capture only: a product or quotient, resolved to a gate or a scale (or refused)
MAXPOOL, AVGPOOL, ADAPTIVE_AVGPOOL, UPSAMPLE = "maxpool", "avgpool", "adaptive_avgpool", "upsample"
RESHAPE, ADD, CAT = "reshape", "add", "cat"
INDEX, SPLIT, PIECE, PERMUTE = "index", "split", "piece", "permute"   # x[...], split/chunk, its pieces, transpose
GETITEM = "getitem"   # at capture only: resolved to an index, a piece of a split, or a helper
INPUT, OUTPUT, HELPER = "input", "output", "helper"
SIZE_OP = "size_op"   # a comparison, assertion or integer arithmetic: fine on sizes (a helper), not on tensors

_MODULE_KINDS = {
    nn.Conv2d: CONV, nn.Linear: LINEAR, nn.BatchNorm2d: BN,
    nn.ReLU: RELU, nn.ReLU6: RELU, nn.LeakyReLU: LEAKY_RELU, nn.SiLU: ACTIVATION, nn.Hardswish: ACTIVATION,
    nn.GELU: ACTIVATION, nn.Sigmoid: GATE_ACTIVATION, nn.Hardsigmoid: GATE_ACTIVATION,
    nn.Dropout: PASS, nn.Identity: PASS, nn.MaxPool2d: MAXPOOL, nn.AvgPool2d: AVGPOOL,
    nn.AdaptiveAvgPool2d: ADAPTIVE_AVGPOOL, nn.Flatten: RESHAPE, nn.Upsample: UPSAMPLE,
    nn.UpsamplingNearest2d: UPSAMPLE, nn.UpsamplingBilinear2d: UPSAMPLE,
}
_FUNCTION_KINDS = {
    F.relu: RELU, torch.relu: RELU, torch.relu_: RELU, F.relu6: RELU, F.leaky_relu: LEAKY_RELU,
    F.leaky_relu_: LEAKY_RELU, F.silu: ACTIVATION, F.hardswish: ACTIVATION, F.gelu: ACTIVATION,
    torch.sigmoid: GATE_ACTIVATION, F.hardsigmoid: GATE_ACTIVATION, operator.mul: PRODUCT, torch.mul: PRODUCT,
    operator.truediv: PRODUCT, torch.div: PRODUCT,
    F.dropout: PASS, F.max_pool2d: MAXPOOL, torch.max_pool2d: MAXPOOL, F.avg_pool2d: AVGPOOL,
    torch._C._nn.avg_pool2d: AVGPOOL, F.adaptive_avg_pool2d: ADAPTIVE_AVGPOOL, torch.mean: ADAPTIVE_AVGPOOL,
    F.interpolate: UPSAMPLE,
    torch.flatten: RESHAPE, torch.reshape: RESHAPE, operator.add: ADD, operator.iadd: ADD,
    torch.add: ADD, torch.cat: CAT, torch.concat: CAT, getattr: HELPER, operator.getitem: GETITEM,
    torch.split: SPLIT, torch.chunk: SPLIT, torch.transpose: PERMUTE, torch.permute: PERMUTE, torch._assert: SIZE_OP,
    operator.eq: SIZE_OP, operator.ne: SIZE_OP, operator.lt: SIZE_OP, operator.le: SIZE_OP, operator.gt: SIZE_OP,
    operator.ge: SIZE_OP, operator.floordiv: SIZE_OP, operator.sub: SIZE_OP, operator.mod: SIZE_OP,
    F.batch_norm: BN, torch.batch_norm: BN, F.linear: LINEAR,
}
_METHOD_KINDS = {
    "relu": RELU, "relu_": RELU, "sigmoid": GATE_ACTIVATION, "mul": PRODUCT, "div": PRODUCT, "expand": EXPAND, "expand_as": EXPAND,
    "mean": ADAPTIVE_AVGPOOL, "view": RESHAPE, "reshape": RESHAPE, "flatten": RESHAPE, "contiguous": PASS,
    "split": SPLIT, "chunk": SPLIT, "transpose": PERMUTE, "permute": PERMUTE,
    "add": ADD, "add_": ADD, "size": HELPER, "dim": HELPER,
}
# Kinds whose output is >= 0 whenever all their tensor inputs are.
_SIGN_PRESERVING = {LEAKY_RELU, PASS, MAXPOOL, AVGPOOL, ADAPTIVE_AVGPOOL, UPSAMPLE, RESHAPE, ADD, CAT, INDEX, SPLIT, PIECE,
                    PERMUTE}
# The elementwise activations, as out-of-place functions of the input.
_ACTIVATIONS = {
    nn.ReLU: F.relu, F.relu: F.relu, torch.relu: F.relu, torch.relu_: F.relu, "relu": F.relu, "relu_": F.relu,
    nn.ReLU6: F.relu6, F.relu6: F.relu6, nn.SiLU: F.silu, F.silu: F.silu, nn.Hardswish: F.hardswish,
    F.hardswish: F.hardswish, nn.Sigmoid: torch.sigmoid, torch.sigmoid: torch.sigmoid, "sigmoid": torch.sigmoid,
    nn.Hardsigmoid: F.hardsigmoid, F.hardsigmoid: F.hardsigmoid,
}


def _function_kind(fn) -> str | None:
    """Kind of a called function; torchvision's stochastic depth is off at inference, like dropout."""
    if getattr(fn, "__module__", None) == "torchvision.ops.stochastic_depth":
        return PASS
    return _FUNCTION_KINDS.get(fn)


class Ref(int):
    """Index of a node used as an argument of another node."""


class UnsupportedModelError(TypeError):
    """The model contains operations relprop has no relevance rule for."""


@dataclass(eq=False)
class Node:
    """One operation of the captured graph."""

    index: int
    name: str                       # qualified module name, or fx node name for calls
    kind: str
    op: str                         # fx opcode: placeholder / call_module / call_function / ...
    target: Any                     # module, function or method name
    args: tuple                     # fx args with parent nodes replaced by their indices
    kwargs: dict
    parents: tuple[int, ...] = ()   # indices of tensor-valued inputs, in argument order
    nonneg: bool = False            # output provably >= 0 (after a ReLU or ReLU6)
    act: Any = None                 # activation kinds: the elementwise function, out of place
    gate: int = -1                  # a gate: the position of the gate factor among the parents
    dim: int = 0                    # a split: the dimension its pieces are cut along
    first_layer: bool = False       # conv/linear reading the network input directly
    why: str = ""                   # for an unsupported node (kind None): what relprop lacks, if known

    @property
    def module(self) -> nn.Module | None:
        return self.target if isinstance(self.target, nn.Module) else None

    def describe(self) -> str:
        why = f": {self.why}" if self.why else ""
        if self.module is not None:
            return f"{self.name} ({type(self.module).__name__}){why}"
        t = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", repr(self.target))
        return f"{self.name} ({self.op} {t}){why}"


class _Tracer(fx.Tracer):
    """fx tracer that also records the output node of every (container) module."""

    def __init__(self):
        super().__init__()
        self.module_outputs: dict[str, fx.Node] = {}

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_outputs[self.path_of_module(m)] = out.node
        return out


@dataclass(eq=False)
class Graph:
    """A model captured once; run :meth:`forward`, then walk :attr:`nodes` backwards."""

    model: nn.Module
    nodes: list[Node]
    module_outputs: dict[str, int] = field(default_factory=dict)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def node(self, name: str) -> Node:
        """The node computing the output of module (or fx node) ``name``."""
        if name in self.module_outputs:
            return self.nodes[self.module_outputs[name]]
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(list(self.module_outputs)[:12])
        raise KeyError(f"no layer named {name!r} in the model (module names look like: {known}, ...)")

    @functools.cached_property
    def consumers(self) -> list[list[int]]:
        """Indices of the nodes reading each node's value."""
        out: list[list[int]] = [[] for _ in self.nodes]
        for n in self.nodes:
            for p in n.parents:
                out[p].append(n.index)
        return out

    @functools.cached_property
    def last_use(self) -> list[int]:
        """Index of the last node whose arguments refer to each node's value (any reference,
        sizes included); the node's own index when nothing reads it."""
        out = [n.index for n in self.nodes]
        for n in self.nodes:
            for ref in _flatten(list(n.args) + list(n.kwargs.values())):
                if isinstance(ref, Ref):
                    out[ref] = max(out[ref], n.index)
        return out

    def forward(self, x: torch.Tensor, grad_from: Node | None = None, drop: frozenset = frozenset()) -> list[Any]:
        """Values of all nodes for input ``x`` (inference semantics).

        With ``grad_from`` the value of that node is made a leaf requiring grad and every
        later node is computed with autograd on, so gradients w.r.t. it can be taken.  The
        values of the nodes in ``drop`` are released (left ``None``) once the forward has
        used them for the last time: the caller recomputes them or does not need them.
        """
        values: list[Any] = [None] * len(self.nodes)
        release: dict[int, list[int]] = {}
        for i in drop:
            release.setdefault(self.last_use[i], []).append(i)
        for n in self.nodes:
            if n.kind == INPUT:
                v = x
            elif n.op == "get_attr":
                v = functools.reduce(getattr, n.target.split("."), self.model)   # a parameter or buffer
            else:
                args = _substitute(n.args, values)
                kwargs = _substitute(n.kwargs, values)
                with torch.set_grad_enabled(grad_from is not None and n.index > grad_from.index):
                    try:
                        v = _evaluate(n, args, kwargs)
                    except torch.OutOfMemoryError:
                        raise
                    except RuntimeError as e:   # an input the model cannot take: say which and where
                        raise ValueError(f"the model cannot take an input of shape {tuple(x.shape)}: "
                                         f"{n.describe()} failed: {str(e).splitlines()[0]}") from e
            if grad_from is not None and n.index == grad_from.index:
                v = v.detach().requires_grad_(True)
            values[n.index] = v
            for i in release.get(n.index, ()):
                values[i] = None
        return values


# ------------------------------------------------------------------------- capture
def capture(model: nn.Module) -> Graph:
    """Trace ``model`` (in inference mode, flags restored afterwards) into a :class:`Graph`."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        tracer = _Tracer()
        try:
            fx_graph = tracer.trace(model)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "cannot capture"
            raise UnsupportedModelError(
                f"relprop could not capture {type(model).__name__} with torch.fx: {type(e).__name__}: {e}. "
                "Its forward must not branch on tensor values.") from e
    finally:
        for m, t in flags.items():
            m.training = t

    index: dict[fx.Node, int] = {}
    nodes: list[Node] = []
    placeholders = [n for n in fx_graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model's forward must take exactly one tensor; it takes {len(placeholders)}")
    seen: dict[str, int] = {}
    for fn in fx_graph.nodes:
        node = _make_node(fn, model, len(nodes), index)
        if node.name in seen:  # a module called more than once (ResNet's shared relu)
            seen[node.name] += 1
            node.name = f"{node.name}#{seen[node.name]}"
        else:
            seen[node.name] = 0
        index[fn] = node.index
        nodes.append(node)
    _resolve_helpers(nodes)
    _resolve_gates(nodes)
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
    return Graph(model, nodes, module_outputs)


def _make_node(fn: fx.Node, model: nn.Module, i: int, index: dict) -> Node:
    args = _substitute(fn.args, index)
    kwargs = _substitute(fn.kwargs, index)
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
        kind = _MODULE_KINDS.get(type(target))
        if kind == CONV:
            target, why = _explicit_padding(target)
            if target.padding_mode != "zeros":
                why = f"padding_mode={target.padding_mode!r} has no transposed map here (only 'zeros')"
            if why:
                kind = None
        if kind == BN and (target.running_mean is None or target.running_var is None):
            kind = None
    elif fn.op == "call_function":
        kind = _function_kind(fn.target)
        if fn.target in _OWNED:
            owner, why = _owning_module(fn, model)
            target, name, kind = (owner, _module_path(model, owner), kind) if owner is not None else (target, name, None)
    elif fn.op == "call_method":
        kind = _METHOD_KINDS.get(fn.target)
    else:  # get_attr: a parameter or buffer used outside a module
        kind = None
    tensor_args = list(args) + list(kwargs.values())
    if kind == CAT:
        tensor_args = list(args[0]) if args else list(kwargs.get("tensors", []))
    parents = tuple(int(a) for a in _flatten(tensor_args) if isinstance(a, Ref))
    node = Node(i, name, kind, fn.op, target, args, kwargs, why=why)
    if kind == HELPER:
        node.parents = ()
    elif kind in (ADD, CAT, PRODUCT, SIZE_OP):
        node.parents = parents
    elif kind not in (INPUT, None):
        node.parents = parents[:1]
    if kind == LEAKY_RELU and not _is_number(slope := _negative_slope(node), minimum=0):
        node.kind, node.why = None, f"negative_slope={slope!r}: only a constant slope >= 0 keeps the sign"
    if node.kind in (RELU, LEAKY_RELU, ACTIVATION, GATE_ACTIVATION):
        node.act = _activation(node)
    if kind == SPLIT:
        node.dim = _param(node, "dim", 2, 0)
    if kind == UPSAMPLE and (mode := _upsample_mode(node)) not in _NONNEG_UPSAMPLING:
        node.kind, node.why = None, f"mode={mode!r}: only {', '.join(_NONNEG_UPSAMPLING)} interpolate with weights >= 0"
    if target in _MEANS and not (isinstance(dims := _mean_dims(node), tuple) and 0 not in dims):
        node.kind, node.why = None, (f"a mean over dim={dims!r} averages across the batch; average over "
                                     "the feature dims only, e.g. x.mean((2, 3))")
    return node


_MEANS = ("mean", torch.mean)


def _mean_dims(n: Node):
    """The dims a ``mean`` node averages over, as a tuple of ints (else as given)."""
    dim = _param(n, "dim", 1, None)
    if isinstance(dim, int):
        return (dim,)
    if isinstance(dim, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, Ref) for d in dim):
        return tuple(dim)
    return dim


def _activation(n: Node):
    """The node's elementwise activation as an out-of-place function of its input."""
    key = type(n.module) if n.module is not None else n.target
    if n.kind == LEAKY_RELU:
        return functools.partial(F.leaky_relu, negative_slope=_negative_slope(n))
    if key in (nn.GELU, F.gelu):
        return functools.partial(F.gelu, approximate=_param(n, "approximate", 1, "none"))
    return _ACTIVATIONS[key]


# Functional calls that a module subclass makes on its own tensors (timm's BatchNormAct2d and
# Linear trace through): the module class, its tensors in argument order, the optional ones.
_BN_OWNED = (nn.BatchNorm2d, ("running_mean", "running_var", "weight", "bias"), ("weight", "bias"))
_OWNED = {F.batch_norm: _BN_OWNED, torch.batch_norm: _BN_OWNED, F.linear: (nn.Linear, ("weight", "bias"), ("bias",))}


def _owning_module(fn: fx.Node, model: nn.Module) -> tuple[nn.Module | None, str]:
    """The module whose own tensors a functional ``batch_norm`` / ``linear`` call reads (a
    BatchNorm2d / Linear subclass that traces through), or None and why not."""
    cls, tensors, optional = _OWNED[fn.target]
    given = dict(zip(("input",) + tensors, fn.args), **{k: v for k, v in fn.kwargs.items() if k in tensors})
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


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _resolve_helpers(nodes: list[Node]) -> None:
    """Helpers compute shapes and sizes, never relevance: parameters and buffers read outside a
    module (``get_attr``) that no relevance-carrying node takes as an input (a functional
    BatchNorm reads them through its module), and sums, products, comparisons, assertions and
    indexing that read only helpers (``c // 2`` of ``x.shape``, timm's ``_assert(x.ndim == 4)``)."""
    inputs = {p for n in nodes for p in n.parents}
    for n in nodes:
        on_sizes = all(nodes[p].kind == HELPER and nodes[p].op != "get_attr" for p in n.parents)
        if n.op == "get_attr" and n.index not in inputs:
            n.kind = HELPER
        elif n.kind in (ADD, PRODUCT, SIZE_OP, GETITEM) and on_sizes:
            n.kind, n.parents = HELPER, ()
        elif n.kind == SIZE_OP:
            n.kind, n.why = None, "compares or computes with tensor values"
        elif n.kind == ADD and len(n.parents) != 2:
            n.kind = None  # adding a constant is not a relevance-preserving op
        elif n.kind == GETITEM:
            n.kind, n.why = _getitem_kind(n, nodes)
            if n.kind == PIECE:
                n.dim = nodes[n.parents[0]].dim


def _getitem_kind(n: Node, nodes: list[Node]) -> tuple[str | None, str]:
    """``a[i]`` on a tensor: a piece of a split, or an index; only basic indexing (ints,
    slices, None, ...) is an index."""
    source = nodes[n.parents[0]].kind if n.parents else None
    index = n.args[1]
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


def _resolve_gates(nodes: list[Node]) -> None:
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
        if _is_number(factor, minimum=-math.inf) and factor != 0 and (numerator_is_tensor or not divides):
            n.kind = SCALE   # x * c, c * x, x / c
        elif len(gates) == 2 and sum(gates) == 1 and not divides:
            n.kind, n.gate = GATE, gates.index(True)
        else:
            n.kind, n.why = None, ("only a signal times a Sigmoid/Hardsigmoid gate (squeeze-excitation) or a "
                                   "tensor times or over a constant number is supported")
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


def _factor(n: Node):
    """The constant operand of a product or quotient with one tensor operand."""
    others = [a for a in (n.args + tuple(n.kwargs.values())) if not isinstance(a, Ref)]
    return others[0] if len(others) == 1 else None


_NONNEG_UPSAMPLING = ("nearest", "nearest-exact", "bilinear", "linear", "area")


def _param(n: Node, name: str, position: int, default):
    """A setting of the node: its module's attribute ``name``, else the call's argument at
    ``position`` or keyword ``name``, else ``default``."""
    if n.module is not None:
        return getattr(n.module, name)
    return n.args[position] if len(n.args) > position else n.kwargs.get(name, default)


def _upsample_mode(n: Node):
    return _param(n, "mode", 3, "nearest")


def _negative_slope(n: Node):
    return _param(n, "negative_slope", 1, 0.01)


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
        elif n.kind == SCALE:
            n.nonneg = _factor(n) > 0 and nodes[n.parents[0]].nonneg
        elif n.kind in _SIGN_PRESERVING and n.parents:
            n.nonneg = all(nodes[p].nonneg for p in n.parents)
    for n in nodes:
        if n.kind in (CONV, LINEAR):
            p = nodes[n.parents[0]]
            while p.kind in (PASS, RESHAPE) and p.parents:
                p = nodes[p.parents[0]]
            n.first_layer = p.kind == INPUT


# ------------------------------------------------------------------------ evaluate
def _evaluate(n: Node, args: tuple, kwargs: dict) -> Any:
    """Compute one node with inference semantics, never in place."""
    m = n.module
    if n.kind == OUTPUT:
        return args[0]
    if m is not None:
        x = args[0]
        if n.kind == CONV:
            return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if n.kind == LINEAR:
            return F.linear(x, m.weight, m.bias)
        if n.kind == BN:
            return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        if n.act is not None:
            return n.act(x)
        if n.kind == PASS:
            return x
        if n.kind == MAXPOOL:
            return F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if n.kind == AVGPOOL:
            return F.avg_pool2d(x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                m.count_include_pad, m.divisor_override)
        if n.kind == UPSAMPLE:
            return F.interpolate(x, m.size, m.scale_factor, m.mode, m.align_corners,
                                 recompute_scale_factor=getattr(m, "recompute_scale_factor", None))
        if n.kind == ADAPTIVE_AVGPOOL:
            return F.adaptive_avg_pool2d(x, m.output_size)
        if n.kind == RESHAPE:
            return x.flatten(m.start_dim, m.end_dim)
        raise AssertionError(n.kind)
    if n.act is not None:
        return n.act(args[0])
    if n.kind == PASS and n.op == "call_function":  # F.dropout, stochastic depth: off at inference
        return args[0]
    if n.target in _MEANS and any(d % args[0].ndim == 0 for d in _mean_dims(n)):
        raise UnsupportedModelError(f"{n.name}: mean over dims {_mean_dims(n)} of a {args[0].ndim}-d "
                                    "tensor averages across the batch (dim 0)")
    if n.op == "call_method":
        name = n.target.rstrip("_") if n.kind in (RELU, ADD) else n.target
        return getattr(args[0], name)(*args[1:], **kwargs)
    if n.kind == ADD:
        return torch.add(*args, **kwargs)
    return n.target(*args, **kwargs)


def _substitute(obj, table):
    """Replace node references (fx nodes or :class:`Ref`) inside nested args by ``table`` entries."""
    if isinstance(obj, fx.Node):
        return Ref(table[obj])
    if isinstance(obj, Ref):
        return table[obj]
    if isinstance(obj, tuple):
        return tuple(_substitute(o, table) for o in obj)
    if isinstance(obj, list):
        return [_substitute(o, table) for o in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, table) for k, v in obj.items()}
    return obj


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    else:
        yield obj
