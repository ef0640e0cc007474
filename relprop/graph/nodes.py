"""The captured graph's data model and its evaluation: :class:`Node`, :class:`Graph` and
:func:`evaluate`, which computes one node with inference semantics (BatchNorm on running
statistics, dropout off, no in-place ops).

The captured :class:`Graph` is a topologically ordered list of :class:`Node`; each tensor
node knows its kind (``conv``, ``linear``, ``relu``, ... see :mod:`.kinds`), its tensor
parents and the module or call that computes it.  :meth:`Graph.forward` runs the graph
itself and returns every node's value, which is all the relevance pass needs: the model is
never called again.  A node's arguments refer to other nodes by :class:`Ref` (their index);
:func:`substitute` replaces those by values.
"""
from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .kinds import (ADAPTIVE_AVGPOOL, ADD, AVGPOOL, BN, CONV, INPUT, LAYERNORM, LEAKY_RELU, LINEAR, MAXPOOL, MEANS, OFFSET,
                    OUTPUT, PASS, RELU, RESHAPE, RESPONSE_NORM, RMS_NORM, SOFTMAX, UPSAMPLE)


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
    stack: bool = False             # a piece of ``unbind`` (stacked back, not concatenated)
    why: str = ""                   # for an unsupported node (kind None): what relprop lacks, if known
    held: Any = None                # a get_attr of a constant the trace made (not the model's): its tensor

    @property
    def module(self) -> nn.Module | None:
        return self.target if isinstance(self.target, nn.Module) else None

    def param(self, name: str, position: int, default):
        """A setting of the node: its module's attribute ``name``, else the call's argument at
        ``position`` or keyword ``name``, else ``default``."""
        if self.module is not None:
            return getattr(self.module, name)
        return self.args[position] if len(self.args) > position else self.kwargs.get(name, default)

    def describe(self) -> str:
        why = f": {self.why}" if self.why else ""
        if self.module is not None:
            return f"{self.name} ({type(self.module).__name__}){why}"
        t = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", repr(self.target))
        return f"{self.name} ({self.op} {t}){why}"


class InProjection(nn.Module):
    """The packed in-projection of a ``nn.MultiheadAttention`` seen as a Linear: ``weight`` and
    ``bias`` read the module's ``in_proj_weight`` / ``in_proj_bias`` at every access (never
    copied or kept), so the Linear rules and :class:`~relprop.ops.LinearMap` apply to it."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        object.__setattr__(self, "attention", attention)   # not registered: a view, not a submodule
        self.in_features, self.out_features = attention.embed_dim, 3 * attention.embed_dim

    @property
    def weight(self) -> torch.Tensor:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.attention.in_proj_bias


@dataclass(eq=False)
class Graph:
    """A model captured once; run :meth:`forward`, then walk :attr:`nodes` backwards."""

    model: nn.Module
    nodes: list[Node]
    module_outputs: dict[str, int] = field(default_factory=dict)
    prefix: str = ""                # the names' prefix in the user's wrapper ("module." of a DataParallel)

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def node(self, name: str) -> Node:
        """The node computing the output of module (or fx node) ``name``, named within the
        captured module or, for a wrapped model, within the wrapper (``module.features.3``)."""
        if self.prefix and name.startswith(self.prefix) and name not in self.module_outputs:
            name = name[len(self.prefix):]
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

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse an input the captured model cannot take, before any work: the first
        conv's expected (B, C, H, W) layout and channel count, and the first layer's
        device and dtype.  (Type, emptiness and NaN checks are the caller's.)"""
        first = next((n for n in self.nodes if n.kind in (CONV, LINEAR)), None)
        if first is None:
            return
        if first.kind == CONV:
            m = first.module
            if x.ndim != 4:
                raise ValueError(f"input must have shape (B, C, H, W) for {type(self.model).__name__}; "
                                 f"got {x.ndim} dims, shape {tuple(x.shape)}")
            if first.first_layer and x.shape[1] != m.in_channels:
                raise ValueError(f"input has {x.shape[1]} channels but the first layer {first.name!r} "
                                 f"expects {m.in_channels}")
        w = first.module.weight
        if w.device != x.device or w.dtype != x.dtype:
            raise ValueError(f"input is {x.dtype} on {x.device} but the model is {w.dtype} on {w.device}")

    @functools.cached_property
    def last_use(self) -> list[int]:
        """Index of the last node whose arguments refer to each node's value (any reference,
        sizes included); the node's own index when nothing reads it."""
        out = [n.index for n in self.nodes]
        for n in self.nodes:
            for ref in flatten(list(n.args) + list(n.kwargs.values())):
                if isinstance(ref, Ref):
                    out[ref] = max(out[ref], n.index)
        return out

    def forward(self, x: torch.Tensor, grad_from: Node | None = None, drop: frozenset = frozenset(),
                observe: Callable[[Node, tuple, dict, Any], None] | None = None) -> list[Any]:
        """Values of all nodes for input ``x`` (inference semantics).

        With ``grad_from`` the value of that node is made a leaf requiring grad and every
        later node is computed with autograd on, so gradients w.r.t. it can be taken.  The
        values of the nodes in ``drop`` are released (left ``None``) once the forward has
        used them for the last time: the caller recomputes them or does not need them.
        ``observe(node, args, kwargs, value)`` is called on each computed node, its
        arguments' values and its own, before anything is released.
        """
        values: list[Any] = [None] * len(self.nodes)
        release: dict[int, list[int]] = {}
        for i in drop:
            release.setdefault(self.last_use[i], []).append(i)
        for n in self.nodes:
            if n.kind == INPUT:
                v = x
            elif n.op == "placeholder":   # a forward parameter fixed at its default (capture)
                v = n.args[0] if n.args else None
            elif n.op == "get_attr":   # a parameter or buffer, read now; or a constant of the trace
                v = n.held if n.held is not None else functools.reduce(getattr, n.target.split("."), self.model)
            else:
                args = substitute(n.args, values)
                kwargs = substitute(n.kwargs, values)
                with torch.set_grad_enabled(grad_from is not None and n.index > grad_from.index):
                    try:
                        v = evaluate(n, args, kwargs)
                    except torch.OutOfMemoryError:
                        raise
                    except RuntimeError as e:   # an input the model cannot take: say which and where
                        raise ValueError(f"the model cannot take an input of shape {tuple(x.shape)}: "
                                         f"{n.describe()} failed: {str(e).splitlines()[0]}") from e
                    except AssertionError as e:   # the model's own check (timm's image-size assert)
                        # its message was formatted at capture, with tracing proxies for the sizes
                        text = re.sub(r"Proxy\(([^)]*)\)", r"<\1>", str(e).splitlines()[0] if str(e) else "")
                        raise ValueError(f"the model cannot take an input of shape {tuple(x.shape)}: its check "
                                         f"{n.describe()} failed{': ' + text if text else ''}") from e
                if observe is not None:
                    observe(n, args, kwargs, v)
            if grad_from is not None and n.index == grad_from.index:
                v = v.detach().requires_grad_(True)
            values[n.index] = v
            for i in release.get(n.index, ()):
                values[i] = None
        return values



def rms_norm_scale(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The factor ``a`` of an RMS norm ``y = a * x``: ``weight / sqrt(mean(x^2) + eps)`` for
    nn.RMSNorm and timm's RmsNorm (over the last dims) and RmsNorm2d (over the channels),
    ``weight / sqrt(var(x) + eps)`` (unbiased, not centred) for timm's SimpleNorm /
    SimpleNorm2d; in ``x``'s dtype, timm's ``*Fp32`` variants computing it in float32 as they do."""
    name = type(m).__name__
    x32 = x.float() if name.endswith("Fp32") else x
    if "Norm2d" in name:
        dims, shape = (1,), (1, -1) + (1,) * (x.ndim - 2)
    else:
        dims, shape = tuple(range(x.ndim - len(m.normalized_shape), x.ndim)), tuple(m.normalized_shape)
    eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps     # nn.RMSNorm's default
    stat = x32.var(dims, keepdim=True) if name.startswith("SimpleNorm") else x32.pow(2).mean(dims, keepdim=True)
    a = (stat + eps).rsqrt()
    if m.weight is not None:
        a = a * m.weight.to(x32.dtype).reshape(shape)
    return a.to(x.dtype)


def response_norm_scale(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The response ``n(x)`` of a GlobalResponseNorm (ConvNeXt V2): each channel's L2 norm over
    space divided by the mean of those norms over channels (+ eps)."""
    g = x.norm(p=2, dim=m.spatial_dim, keepdim=True)
    return g / (g.mean(dim=m.channel_dim, keepdim=True) + m.eps)


def mean_dims(n: Node):
    """The dims a ``mean`` node averages over, as a tuple of ints (else as given)."""
    dim = n.param("dim", 1, None)
    if isinstance(dim, int):
        return (dim,)
    if isinstance(dim, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, Ref) for d in dim):
        return tuple(dim)
    return dim


def maxpool_params(n: Node, args: tuple, kwargs: dict) -> tuple:
    """``(kernel_size, stride, padding, dilation, ceil_mode)`` of a max-pool node (module or
    functional call) called on ``args`` and ``kwargs``."""
    m = n.module
    if m is not None:
        return (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    given = dict(zip(names, args[1:]), **kwargs)
    defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    return tuple(given.get(k, defaults.get(k)) for k in names)


def negative_slope(n: Node, args: tuple, kwargs: dict) -> float:
    """The slope below 0 of a ReLU-kind (0) or leaky-ReLU node (module or functional call)."""
    if n.kind != LEAKY_RELU:
        return 0.0
    if n.module is not None:
        return float(n.module.negative_slope)
    return float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))


# Where the derivative of an elementwise activation jumps and by how much (the same at each
# point): autograd takes one side at such a point, so an input within rounding of it may take
# the other in another precision (engine.GradientDecisions).  GELU, SiLU, sigmoid: smooth.
_DERIVATIVE_JUMPS = {F.relu: ((0.0,), 1.0), F.relu6: ((0.0, 6.0), 1.0), F.hardswish: ((-3.0, 3.0), 0.5),
                     F.hardsigmoid: ((-3.0, 3.0), 1 / 6)}


def derivative_jumps(n: Node, args: tuple, kwargs: dict) -> tuple[tuple[float, ...], float]:
    """``(points, jump)``: the inputs at which the derivative of node ``n``'s elementwise
    activation jumps, and the size of the jump ``|f'(p+) - f'(p-)|`` there: ReLU ``(0,)``, 1;
    ReLU6 ``(0, 6)``, 1; leaky ReLU ``(0,)``, ``|1 - slope|``; Hardswish ``(-3, 3)``, 1/2;
    Hardsigmoid ``(-3, 3)``, 1/6; ``()`` for a smooth activation or any other node."""
    if n.kind == LEAKY_RELU:
        return (0.0,), abs(1.0 - negative_slope(n, args, kwargs))
    return _DERIVATIVE_JUMPS.get(n.act, ((), 0.0)) if n.act is not None else ((), 0.0)


def evaluate(n: Node, args: tuple, kwargs: dict) -> Any:
    """Compute node ``n`` on its argument values (``substitute(n.args, values)``) with inference
    semantics, never in place.  :meth:`Graph.forward` runs every node through it; the engine
    recomputes pooling nodes on other inputs with it (their vjps)."""
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
        if n.kind == LAYERNORM:
            return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        if n.kind == RMS_NORM:        # nn.RMSNorm / timm's RmsNorm*, without calling the module
            return x * rms_norm_scale(m, x)
        if n.kind == RESPONSE_NORM:   # timm's GlobalResponseNorm.forward, without calling the module
            return x + torch.addcmul(m.bias.view(m.wb_shape), m.weight.view(m.wb_shape), x * response_norm_scale(m, x))
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
        if n.kind == SOFTMAX:
            return F.softmax(x, m.dim)
        raise AssertionError(n.kind)
    if n.act is not None:
        return n.act(args[0])
    if n.kind == PASS and n.op == "call_function":  # F.dropout, stochastic depth: off at inference
        return args[0]
    if n.target in MEANS and any(d % args[0].ndim == 0 for d in mean_dims(n)):
        raise UnsupportedModelError(f"{n.name}: mean over dims {mean_dims(n)} of a {args[0].ndim}-d "
                                    "tensor averages across the batch (dim 0)")
    if n.op == "call_method":
        name = n.target.rstrip("_") if n.kind in (RELU, ADD, OFFSET) else n.target
        return getattr(args[0], name)(*args[1:], **kwargs)
    if n.kind in (ADD, OFFSET):   # never in place (operator.iadd)
        return (torch.sub if n.target in (operator.sub, torch.sub) else torch.add)(*args, **kwargs)
    return n.target(*args, **kwargs)


def substitute(obj, table):
    """Replace node references (fx nodes or :class:`Ref`) inside nested args by ``table`` entries."""
    if isinstance(obj, fx.Node):
        return Ref(table[obj])
    if isinstance(obj, Ref):
        return table[obj]
    if isinstance(obj, tuple):
        return tuple(substitute(o, table) for o in obj)
    if isinstance(obj, list):
        return [substitute(o, table) for o in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, table) for k, v in obj.items()}
    if isinstance(obj, slice):   # x[:, :h] with h a size computed in the forward
        return slice(substitute(obj.start, table), substitute(obj.stop, table), substitute(obj.step, table))
    return obj


def flatten(obj):
    """The leaves of nested tuples, lists, dicts (their values) and slices (start, stop, step)."""
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from flatten(o)
    elif isinstance(obj, dict):
        yield from flatten(list(obj.values()))
    elif isinstance(obj, slice):
        yield from flatten((obj.start, obj.stop, obj.step))
    else:
        yield obj
