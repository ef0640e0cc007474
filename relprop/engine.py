"""The relevance pass: one forward over the captured graph, then rules applied backwards.

``propagate`` walks the graph from a start node to the input.  Each node's rule maps the
relevance at its output to relevance at each of its tensor inputs; relevance reaching a
node from several consumers (a residual fan-out) is summed.  A method is a
:class:`RuleTable` (node kind -> rule, plus overrides for the input layer and the output
layer) and an initial relevance; methods never touch the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import graph as g
from .ops import reference as reference_ops
from .ops import LinearMap, PerPosition, channels_first, channels_last


@dataclass(eq=False)
class Layer:
    """What a rule sees of one node: its inputs, output, and linear map (conv/linear)."""

    node: g.Node
    xs: list[torch.Tensor]
    y: torch.Tensor
    args: tuple
    kwargs: dict
    lin: LinearMap | None = None
    z: torch.Tensor | None = None      # pre-activation incl. a folded BatchNorm (conv/linear)
    x_nonneg: bool = False             # the first input is provably >= 0 (comes from a ReLU)
    ops: Any = reference_ops           # the backend's fused primitives (relprop.ops.dispatch)

    @property
    def x(self) -> torch.Tensor:
        return self.xs[0]

    def recompute(self, t: torch.Tensor) -> torch.Tensor:
        """The node's own operation applied to ``t`` instead of its input (for pooling vjps)."""
        return g.evaluate(self.node, (t,) + tuple(self.args[1:]), self.kwargs)


Rule = Callable[[Layer, torch.Tensor], list]


@dataclass
class RuleTable:
    """Rules by node kind; ``first`` for the conv/linear reading the input, ``head`` for the
    conv/linear producing the output; ``fold_bn`` merges a BatchNorm into the conv before it."""

    by_kind: dict[str, Rule]
    first: Rule | None = None
    head: Rule | None = None
    fold_bn: bool = False
    name: str = ""

    def rule(self, node: g.Node, head: g.Node | None, per_position: bool = False) -> Rule:
        """The rule of ``node``; a Linear over channels-last positions (``per_position``) takes
        the conv rule, as the 1x1 conv it is."""
        if node.kind in (g.CONV, g.LINEAR):
            if node.first_layer and self.first is not None:
                return self.first
            if node is head and self.head is not None:
                return self.head
        rule = self.by_kind.get(g.CONV if per_position else node.kind)
        if rule is None:
            raise NotImplementedError(f"method {self.name!r} has no rule for {node.describe()}")
        return rule


# The relative error of the forward values entering an ill-conditioned step, in rounding
# units of the forward's dtype.  With it, the estimate below bounded every float32 map of the
# built-in ResNet whose error against float64 exceeded 1e-3 (the estimate is pessimistic:
# its median is ~10x the measured error; tests/test_numerics.py holds it to that).
FORWARD_ERROR = 1.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype relevance is computed in: float32 for half-precision models, else the model's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def split_amplification(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """How much a two-way split ``R -> (R0, R1)`` in proportion to its (signed) inputs
    amplifies their relative errors, per sample.

    At an entry whose inputs nearly cancel (``x0 + x1`` small against ``|x0| + |x1|``), the
    shares ``R_k = x_k R / (x0 + x1)`` are large, of opposite signs, and a relative error
    ``u`` of the inputs becomes an absolute error ``~ u |R| k^2`` in them, with
    ``k = (|R0| + |R1|) / |R0 + R1|`` read off the shares.  The amplification is that error's
    L2 norm over the L2 norm of ``R``: ``||R k^2|| / ||R||``; 1 where both shares have one sign
    (inputs >= 0, as RSP/AE make them), infinite where shares appear from nothing.
    """
    s = (r0 + r1).abs().flatten(1)
    k = amplification(r0.abs().flatten(1) + r1.abs().flatten(1), s)
    return amplification((s * k * k).norm(dim=1), s.norm(dim=1))


def amplification(size: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``size / value`` for a ``value`` computed from terms of total magnitude ``size``
    (``value <= size``): 1 where both are 0, infinite where only ``value`` is 0."""
    return torch.where(value > 0, size / torch.where(value > 0, value, 1), torch.where(size > 0, float("inf"), 1.0))


@dataclass(eq=False)
class Context:
    """One attribution call: the graph, every node's value, the logits and the targets."""

    graph: g.Graph
    values: list[Any]
    targets: torch.Tensor
    seed: torch.Tensor               # (B, classes): onehot(target), or the caller's initial relevance
    user_seed: bool = False          # seed is the caller's ``initial_relevance``
    maps: dict = field(default_factory=dict)
    layer_sums: dict | None = None   # filled by propagate when not None
    ops: Any = reference_ops         # the backend's fused primitives (relprop.ops.dispatch)

    def __post_init__(self):
        # Relevance is computed in float32 for float16/bfloat16 models (the forward stays in
        # the model's dtype): ``values`` are the forward's values in the compute dtype and
        # ``_forward`` the originals, which autograd (Grad-CAM starts) differentiates.
        self.forward_dtype = self.values[0].dtype
        self.dtype = compute_dtype(self.forward_dtype)
        self._forward = self.values
        if self.dtype != self.forward_dtype:
            self.values = [v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                           for v in self.values]
            self.seed = self.seed.to(self.dtype)
        # Per-sample estimate of the relative error of the map (first order, in units of
        # the map's own size): what ill-conditioned steps of the rules can make of the
        # rounding errors of the forward values (see ``add_error``).
        self.error = torch.zeros(self.values[0].shape[0], dtype=self.dtype, device=self.values[0].device)

    @property
    def logits(self) -> torch.Tensor:
        return self.values[-1]

    @property
    def x(self) -> torch.Tensor:
        return self.values[0]

    def head(self) -> g.Node | None:
        """The conv/linear node whose output is the model output (through reshapes)."""
        n = self.graph.nodes[self.graph.output.parents[0]]
        while n.kind in (g.PASS, g.RESHAPE):
            n = self.graph.nodes[n.parents[0]]
        return n if n.kind in (g.CONV, g.LINEAR) else None

    def grad(self, node: g.Node, seed: torch.Tensor) -> torch.Tensor:
        """Gradient of ``<logits, seed>`` w.r.t. the value of ``node`` (forward must have been
        run with ``grad_from=node``)."""
        (gr,) = torch.autograd.grad(self._forward[-1], self._forward[node.index], seed.to(self.forward_dtype))
        return gr.to(self.dtype)

    def detach(self) -> None:
        self.values = [v.detach() if torch.is_tensor(v) else v for v in self.values]
        self._forward = [v.detach() if torch.is_tensor(v) else v for v in self._forward]

    def add_error(self, amplification: torch.Tensor) -> None:
        """Record a step that turns the forward values' rounding errors into a relative error
        of ``unit * amplification`` (B,) in the map; first-order errors of steps add up."""
        self.error += self.unit * amplification.to(self.error.dtype)

    @property
    def unit(self) -> float:
        """Relative error of the forward values (``FORWARD_ERROR`` rounding units)."""
        return FORWARD_ERROR * torch.finfo(self.forward_dtype).eps

    def per_position(self, node: g.Node) -> bool:
        """``node`` is a Linear over the last dim of a ``(B, H, W, C)`` tensor (ConvNeXt's MLP
        after a permute): a 1x1 conv per position, explained as one (channels first)."""
        return node.kind == g.LINEAR and self.values[node.parents[0]].ndim == 4

    def linear_map(self, node: g.Node, fold_bn: bool) -> tuple[LinearMap, torch.Tensor]:
        """The node's map (with the following BatchNorm folded in if asked and possible) and
        its pre-activation value.  Maps live in ``self.maps``, i.e. for this call only."""
        bn = self._folded_bn(node) if fold_bn else None
        key = (node.index, bn is not None)
        lin = self.maps.get(key)
        if lin is None:
            dtype = self.x.dtype
            if self.per_position(node):
                lin = LinearMap(PerPosition(node.module), dtype=dtype)
            elif bn is None:
                lin = LinearMap(node.module, dtype=dtype)
            else:
                lin = LinearMap.folded(node.module, bn.module, dtype)
            self.maps[key] = lin
        return lin, self.values[(bn or node).index]

    def _folded_bn(self, node: g.Node) -> g.Node | None:
        consumers = self.graph.consumers[node.index]
        if node.kind == g.CONV and len(consumers) == 1:
            nxt = self.graph.nodes[consumers[0]]
            if nxt.kind == g.BN:
                return nxt
        return None

    def layer(self, node: g.Node, fold_bn: bool) -> Layer:
        xs = [self.values[p] for p in node.parents]
        args = g.substitute(node.args, self.values)
        kwargs = g.substitute(node.kwargs, self.values)
        lay = Layer(node, xs, self.values[node.index], args, kwargs,
                    x_nonneg=bool(node.parents) and self.graph.nodes[node.parents[0]].nonneg, ops=self.ops)
        if node.kind in (g.CONV, g.LINEAR):
            lay.lin, lay.z = self.linear_map(node, fold_bn)
            if self.per_position(node):   # the 1x1 conv's view: channels first
                lay.xs, lay.y, lay.z = [channels_first(lay.x)], channels_first(lay.y), channels_first(lay.z)
        return lay

    def apply(self, table: RuleTable, node: g.Node, head: g.Node | None, r: torch.Tensor) -> list:
        """Relevance at each input of ``node`` for relevance ``r`` at its output, by the table's rule."""
        layer = self.layer(node, table.fold_bn)
        if not self.per_position(node):
            return table.rule(node, head)(layer, r)
        outs = table.rule(node, head, per_position=True)(layer, channels_first(r))
        return [None if o is None else channels_last(o) for o in outs]

    def propagate(self, table: RuleTable, r0: torch.Tensor, start: g.Node | None = None) -> torch.Tensor:
        """Relevance at the input for relevance ``r0`` at the output of ``start`` (default: the
        model output)."""
        nodes = self.graph.nodes
        start = start or self.graph.output
        head = self.head()
        relevance: dict[int, torch.Tensor] = {start.index: r0}
        result = torch.zeros_like(self.x)
        for node in reversed(nodes[:start.index + 1]):
            r = relevance.pop(node.index, None)
            if r is None:
                continue
            if node.kind == g.INPUT:
                result = r
                break
            if node.kind == g.OUTPUT:
                outs = [r]
            else:
                outs = self.apply(table, node, head, r)
            outs = [(p, ri) for p, ri in zip(node.parents, outs) if ri is not None]  # None: no relevance
            if node.kind == g.ADD and len(outs) == 2 and outs[0][1].shape == outs[1][1].shape == r.shape:
                self.add_error(split_amplification(outs[0][1], outs[1][1]))
            for p, ri in outs:
                relevance[p] = relevance[p] + ri if p in relevance else ri
            if self.layer_sums is not None and node.kind not in (g.OUTPUT, g.HELPER):
                self.layer_sums[node.name] = sum(ri.flatten(1).sum(1) for _, ri in outs)
        return result
