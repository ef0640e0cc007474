"""The relevance pass: one forward over the captured graph, then rules applied backwards.

``propagate`` walks the graph from a start node to the input.  Each node's rule maps the
relevance at its output to relevance at each of its tensor inputs; relevance reaching a
node from several consumers (a residual fan-out) is summed.  A method is a
:class:`RuleTable` (node kind -> rule, plus overrides for the input layer and the output
layer) and an initial relevance; methods never touch the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import graph as g
from .ops import reference as reference_ops
from .ops import (LinearMap, PerPosition, channels_first, channels_last, masked_square_sums, maxpool_near_ties,
                  entries_near, mean_square_per_channel, near_zero_bound, near_zero_counts, stabilize)


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
    # the first input's pre-activation where that input is the output of an activation whose
    # sign is its input's (ReLU, leaky ReLU, GELU, SiLU, ...; else None): for rules
    # discontinuous at inputs of 0, which report inputs within rounding of it
    pre_activation: Callable[[], torch.Tensor] | None = None
    ops: Any = reference_ops           # the backend's fused primitives (relprop.ops.dispatch)
    unit: float = 0.0                  # relative error of the forward values (Context.unit)
    # adds an error to the map's estimate: absolute error and the norm it is relative to, per
    # leading row (Context.add_relative_error)
    report: Callable[[torch.Tensor, torch.Tensor], None] | None = None

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
    # the walk also carries its rounding errors entrywise along residual streams
    # (Context.propagate_together: RAP's signed residual splits)
    carries_errors: bool = False

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

# An input of a rule that is discontinuous at inputs of 0 (the uniform shift's count of
# non-zero entries; AE's active/inactive masks) within this many rounding units of 0 -- units
# of the largest magnitude in its channel of the sample -- may be 0 in one precision and not in
# another.  One unit: on the built-in ResNet this caught every map that such a crossing took
# more than 1e-3 off float64, and four units reported three times as many maps, almost all
# within 1e-4 of float64.
NEAR_ZERO_UNITS = 1.0

# A max-pool window whose two largest entries lie within this many rounding units of the
# forward's values (relative to the largest) may pick another winner in another precision:
# each entry carries about one unit (:data:`FORWARD_ERROR`), so their difference two; four
# leaves a margin.  (shapes-vgg's CLRP map 3.5e-3 off float64 was such a window: its two
# largest entries 1e-7, 0.8 units, apart.)
NEAR_TIE_UNITS = 4.0


def forward_unit(dtype: torch.dtype) -> float:
    """Relative error of a ``dtype`` forward's values (:data:`FORWARD_ERROR` rounding units)."""
    return FORWARD_ERROR * torch.finfo(dtype).eps


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
    s = (r0 + r1).abs_().flatten(1)
    t = r0.abs().add_(r1.abs()).flatten(1)
    # s k^2 = t^2 / s in place (these are the largest tensors of a ResNet walk): 0/0 (no
    # shares) is 0, t/0 (shares from nothing) stays infinite
    sk2 = t.square_().div_(s).nan_to_num_(nan=0.0, posinf=float("inf"))
    return amplification(sk2.norm(dim=1), s.norm(dim=1))


# The relative error of a value entering a residual add, in rounding units of the forward's
# dtype, for the errors carried along a residual stream (Context.propagate_together): such
# a value sums hundreds of rounded products (a ViT's 768-wide MLP), whose errors grow like
# the square root of their count.  Of the 36 rap maps more than 1e-3 off float64 of
# scripts/vit_stream_study.py, eight units leave 1 unreported (3.0e-3 off, estimated
# 7.8e-4), four 4, the per-step estimate alone 15; on the built-in models every rap map above
# 1e-3 is then reported, the estimate's median 7-15x the measured error.
ADD_INPUT_UNITS = 8.0

# Kinds through which an entry's error stays with the entry (a rule whose relevance out at an
# entry depends on its relevance in there only, or a residual add's entrywise split): along
# them the carried error is kept entrywise, elsewhere as a norm per sample.
ENTRYWISE_KINDS = (g.ADD, g.PASS, g.RELU, g.LEAKY_RELU, g.ACTIVATION)


def split_errors(r: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor, e: torch.Tensor | None,
                 step: torch.Tensor | float, unit: float) -> list[torch.Tensor]:
    """The absolute errors of a two-way add's shares ``R -> (R0, R1)``, entrywise, given the
    error ``e`` of ``R`` (entrywise, or None) and the relative error ``step`` of the add's own
    rule (broadcast against ``R``).  A share ``R_k = R x_k / (x0 + x1)`` inherits ``|R_k / R|``
    of ``e`` and the step's error, and the relative error of its input, :data:`ADD_INPUT_UNITS`
    rounding units ``unit``, and that of the denominator, the same magnified by ``kappa =
    (|R0| + |R1|) / |R|`` (read off the shares: large where the inputs nearly cancel).  In
    one factor: ``|R_k| ((e + c unit (|R| + |R0| + |R1|)) / |R| + step)``.  Shares that
    appear from nothing (``R = 0``, shares not) have an infinite error; no shares none."""
    ra = r.abs()
    f = r0.abs().add_(r1.abs()).add_(ra).mul_(ADD_INPUT_UNITS * unit)
    if e is not None:
        f.add_(e)
    f.div_(ra).add_(step)
    return [rk.abs().mul_(f).nan_to_num_(nan=0.0, posinf=float("inf")) for rk in (r0, r1)]


def sample_norms(t: torch.Tensor, batch: int) -> torch.Tensor:
    """The L2 norm of ``t`` per sample of a batch of ``batch``: over each leading row, or over
    each sample's rows where a layer works on ``batch * n`` rows, sample-major (windows of a
    Swin); a tensor whose rows do not divide among the samples counts whole for every sample."""
    if t.dim() > 0 and t.shape[0] % batch == 0 and t.numel():
        return torch.linalg.vector_norm(t.reshape(batch, -1), dim=1)
    return torch.linalg.vector_norm(t).expand(batch)


def per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample ``v`` (B,) shaped to broadcast against ``like``: over its leading rows, or
    over each sample's rows where ``like`` has ``B * n`` rows (sample-major)."""
    batch = v.shape[0]
    if like.dim() == 0 or like.shape[0] % batch:
        return v.max()
    v = v.repeat_interleave(like.shape[0] // batch) if like.shape[0] != batch else v
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def safe_ratio(err: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``err / norm``, 0 where ``norm`` is 0 (a relevance of 0 carries no relative error on)."""
    return torch.where(norm > 0, err / torch.where(norm > 0, norm, 1), 0.0)


def epsilon_zone_error(layer: Layer, s: torch.Tensor, eps: float,
                       r_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute error, and the norm of ``R_in`` it is relative to, per row of the layer's
    input (a sample, or a window of one: Layer.report gathers them per sample), that rounding
    of the pre-activations ``z`` makes in the ε-rule's ``R_in = x * bwd(s, W)``,
    ``s = R / stabilize(z, eps)``, where some ``|z|`` is near ``eps``.

    Relevance arriving at a conv/linear output is proportional to it (``R = z c``: every rule
    here scales its input), so ``s = c z / (z + eps)``, and an absolute error ``u k`` of ``z``
    (``k = sum_i |x_i w_i| + |b|``, bounded by ``||x patch|| ||w||_2 + |b|``) becomes
    ``|s| u k eps / (|z| |z + eps|)`` in ``s``: nothing where ``eps = 0`` or ``|z| >> eps``,
    of the size of ``s`` itself where ``|z| ~ eps`` and ``k / |z|`` is large.  Such an error
    reaches the inputs through ``x * W^T``, bounded per output by ``||x patch|| ||w||_inf``;
    their root sum of squares over the outputs, relative to the norm of ``R_in``, is the
    estimate (README, Numerics).  The float64 map is as sensitive there (a 1e-7 change of the input
    moves it as much): the map is ill-conditioned, not the arithmetic."""
    z, lin = layer.z, layer.lin
    shape = (1, -1) + (1,) * (z.ndim - 2) if lin.is_conv else (1,) * (z.ndim - 1) + (-1,)
    rows = lin.weight.reshape(lin.weight.shape[0], -1)
    patch = lin.patch_norms(layer.x)
    k = patch * rows.norm(dim=1).view(shape)
    if lin.bias is not None:
        k = k + lin.bias.abs().view(shape)
    ds = (s.abs() * k).mul_(layer.unit * eps).div_(z.abs() * stabilize(z, eps).abs()).nan_to_num_(nan=0.0)
    lo, hi = torch.aminmax(rows, dim=1)   # max |w| per row without a copy of |W| (VGG16's fc6: 392 MiB)
    err = ds.mul_(patch).mul_(torch.maximum(hi, -lo).view(shape)).flatten(1).norm(dim=1)
    return err, r_in.flatten(1).norm(dim=1)


def amplification(size: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``size / value`` for a ``value`` computed from terms of total magnitude ``size``
    (``value <= size``): 1 where both are 0, infinite where only ``value`` is 0."""
    return torch.where(value > 0, size / torch.where(value > 0, value, 1), torch.where(size > 0, float("inf"), 1.0))


# Kinds whose value the relevance walk recomputes from their input when it needs it instead
# of keeping it from the forward: elementwise activations and inference-mode BatchNorms
# cost one read and one write, and keeping only the conv output of each conv -> BN -> ReLU
# triple cuts what the forward holds by up to three (autograd keeps fewer tensors for the
# same reason).  A recomputed value's input is kept, or itself recomputed from a kept one.
RECOMPUTED_KINDS = (g.RELU, g.LEAKY_RELU, g.ACTIVATION, g.BN)


def _elementwise_of_parent(graph: g.Graph, n: g.Node) -> bool:
    if n.kind not in RECOMPUTED_KINDS or len(n.parents) != 1:
        return False
    if (n.module is None) if n.kind == g.BN else (n.act is None):   # functional batch_norm reads parameters
        return False
    refs = [a for a in g.flatten(list(n.args) + list(n.kwargs.values())) if isinstance(a, g.Ref)]
    return refs == [n.parents[0]] and graph.nodes[n.parents[0]].op != "get_attr"


def _identity_of_parent(graph: g.Graph, n: g.Node) -> bool:
    """``n`` is an identity at inference (Dropout, Identity, ``F.dropout``) of its one parent:
    its value is the parent's tensor itself."""
    if n.kind != g.PASS or len(n.parents) != 1 or n.op not in ("call_module", "call_function"):
        return False
    refs = [a for a in g.flatten(list(n.args) + list(n.kwargs.values())) if isinstance(a, g.Ref)]
    return refs == [n.parents[0]]


def _recompute_depth(graph: g.Graph, n: g.Node) -> int:
    """Steps from ``n`` back to the kept value it is recomputed from (0: ``n`` is kept).  An
    identity (a Dropout after a GELU) is recomputed where its parent is, at no step of its own:
    kept, it would hold the tensor its recomputed parent was not to keep (ViT-B's MLP
    activations, 19 MiB a block at batch 8)."""
    if _identity_of_parent(graph, n):
        return _recompute_depth(graph, graph.nodes[n.parents[0]])
    if not _elementwise_of_parent(graph, n):
        return 0
    depth = _recompute_depth(graph, graph.nodes[n.parents[0]]) + 1
    return depth if depth <= 2 else 0


def recomputed(graph: g.Graph, n: g.Node) -> bool:
    """``n``'s value is an elementwise function of one other value, kept or itself recomputed
    from a kept one (at most two steps: BatchNorm then ReLU): recomputed when read, not kept."""
    return _recompute_depth(graph, n) > 0


def forward(graph: g.Graph, x: torch.Tensor, grad_from: g.Node | None,
            walks: bool) -> tuple[list[Any], GradientDecisions | None]:
    """The forward values a method needs: for a relevance walk every node's value except the
    recomputed activations (released once the forward has used them); for a method that only
    takes a gradient (``walks=False``) the input, the gradient's node and the output.  With
    ``grad_from``, also the :class:`GradientDecisions` of the gradient that will be taken (to
    hand to the :class:`Context`)."""
    keep = {0, len(graph.nodes) - 1} | ({grad_from.index} if grad_from is not None else set())
    if walks:
        drop = {n.index for n in graph.nodes if recomputed(graph, n)}
    else:
        drop = set(range(len(graph.nodes)))
    decisions = None if grad_from is None else GradientDecisions(grad_from, forward_unit(x.dtype))
    return graph.forward(x, grad_from=grad_from, drop=frozenset(drop - keep), observe=decisions), decisions


class GradientDecisions:
    """What a gradient's branches make of the forward's rounding, for the map's estimate
    (README, Numerics).  autograd's gradient of a ReLU (leaky ReLU) is ``g`` above 0 and
    ``slope * g`` below, and a max pool's goes to its window's largest entry: an input within
    rounding of 0 (:data:`NEAR_ZERO_UNITS`), or a window whose two largest entries are within
    rounding of each other (:data:`NEAR_TIE_UNITS`), may take the other branch in another
    precision, a change of ``(1 - slope) |g|`` there, or of ``sqrt(2) |g|`` (``g`` moving to
    another entry).  The other kinks of piecewise activations count alike, each with its
    jump of the derivative (:func:`relprop.graph.derivative_jumps`: ReLU6 at 6, Hardswish and
    Hardsigmoid at +-3), within the same rounding of the point.  As the forward's ``observe``
    it hooks the value of each such node after ``grad_from``; when a gradient is taken the
    hook reports the change's norm relative to ``||g||`` there to the :class:`Context`
    (``report``).

    It holds only what autograd saves for the node's own backward (a max pool's input, a
    ReLU's output, the input of the other activations), released in the hook, which runs just before that
    backward: the gradient method's peak stays autograd's, and nothing waits on the device.
    A ReLU's input is gone by then: the forward counts its entries near 0 per channel (a
    ``(B, C)`` count); the positive ones are found again in the output, exactly, and the
    others take their channel's root-mean-square ``|g|`` (exact for a ``(B, F)`` layer, whose
    channels are single features).  Masks are formed over slices of the channels
    (temporaries of an eighth of the node's value).

    A gradient whose caller uses only its per-channel spatial means (``channel_means``:
    Grad-CAM's weights) is unchanged by a move within a window of a max pool reading
    ``grad_from`` itself, which is not reported then.  The gradient is discontinuous at
    those inputs: its map is ill-conditioned there in any precision.

    Its hooks must be removed by :meth:`close` when the call ends: a hook lives on the node's
    ``grad_fn`` (C++), reaches the :class:`Context` through ``report`` and through it every
    forward value with its ``grad_fn``, a cycle Python's garbage collector cannot see; left in
    place it keeps the whole call (its autograd graph and the hooks' tensors) alive for
    good."""

    def __init__(self, grad_from: g.Node, unit: float):
        self.after, self.unit = grad_from.index, unit
        self.report: Callable[[torch.Tensor, torch.Tensor], None] | None = None   # set by the Context
        self.channel_means = False                                                 # set by Context.grad
        self._hooks: list = []

    def close(self) -> None:
        """Remove every hook and forget the report: nothing of the call stays reachable."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.report = None

    def __call__(self, node: g.Node, args: tuple, kwargs: dict, value: Any) -> None:
        if (node.index <= self.after or self.unit == 0 or not torch.is_tensor(value)
                or not value.requires_grad or not torch.is_tensor(args[0]) or value.ndim < 2):
            return
        tol_zero, tol_tie = NEAR_ZERO_UNITS * self.unit, NEAR_TIE_UNITS * self.unit
        points, jump = g.derivative_jumps(node, args, kwargs)
        if node.kind == g.RELU and points == (0.0,):
            z = args[0].detach()
            bound, total = near_zero_bound(z, tol_zero), near_zero_counts(z, tol_zero)
            held = [value.detach()]       # the output: autograd's saved tensor of a ReLU

            def marks(c0: int, c1: int) -> torch.Tensor:   # the positive entries near 0, exactly
                y, b = held[0][:, c0:c1], bound[:, c0:c1] if bound.shape[1] > 1 else bound
                return y.gt(0) & y.lt(b)
            weight = 1.0
        elif points:
            # the input: autograd's saved tensor of a leaky ReLU, a ReLU6 (hardtanh), a Hardswish,
            # a Hardsigmoid; entries within the channel's rounding of a point where f' jumps
            held = [args[0].detach()]
            bound = near_zero_bound(held[0], tol_zero)

            def marks(c0: int, c1: int) -> torch.Tensor:
                z, b = held[0][:, c0:c1], bound[:, c0:c1] if bound.shape[1] > 1 else bound
                near = entries_near(z, b, points[0])
                for p in points[1:]:
                    near.logical_or_(entries_near(z, b, p))
                return near
            weight, total = jump, None
        elif node.kind == g.MAXPOOL and args[0].ndim == 4 and value.ndim == 4:
            held = [args[0].detach()]     # the input: autograd's saved tensor of a max pool
            kernel, stride, padding, dilation, _ = g.maxpool_params(node, args, kwargs)

            def marks(c0: int, c1: int) -> torch.Tensor:
                return maxpool_near_ties(held[0][:, c0:c1], value.shape[2:], kernel, stride, padding, dilation,
                                         tol_tie)
            weight, total = 2 ** 0.5, None
        else:
            return
        keeps_channel_sums = node.kind == g.MAXPOOL and node.parents[0] == self.after

        def reported(grad: torch.Tensor) -> None:
            if self.report is not None and not (keeps_channel_sums and self.channel_means):
                sq, counts = masked_square_sums(grad, marks)
                if total is not None:     # a ReLU's entries near 0 from below, at their channel's RMS |g|
                    sq += (total.to(sq.dtype) - counts).clamp_(min=0) * mean_square_per_channel(grad).to(sq.dtype)
                self.report(sq.sum(1).sqrt_().mul_(weight), torch.linalg.vector_norm(grad.flatten(1), dim=1,
                                                                                     dtype=sq.dtype))
            held.clear()

        self._hooks.append(value.register_hook(reported))


class Values:
    """The forward's node values as the relevance pass reads them: in the compute dtype
    (cast on each read, so a half-precision model's values are not held twice) and
    recomputed where the forward did not keep them (:func:`recomputed`).  ``release(i)``
    frees a value the walk no longer needs."""

    def __init__(self, graph: g.Graph, stored: list[Any], dtype: torch.dtype):
        self.graph, self.stored, self.dtype = graph, stored, dtype
        # Recomputed values (whole batch) kept from their first read to their release, while a
        # walk releases values (``hold_recomputed``): a conv -> BN -> ReLU value is then computed
        # once, not by each of its three or four readers, and lives only between its readers,
        # as a saved tensor of autograd does.  Without releases nothing is held.
        self.hold_recomputed = False
        self._recomputed: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.stored)

    def __getitem__(self, i: int) -> Any:
        return self.get(i)

    def get(self, i: int, rows: slice | None = None) -> Any:
        """Node ``i``'s value, or its samples ``rows`` (a batch-carrying value only)."""
        v = self._forward_value(i, rows)
        if torch.is_tensor(v) and v.is_floating_point() and v.dtype != self.dtype:
            v = v.to(self.dtype)
        return v

    def _forward_value(self, i: int, rows: slice | None) -> Any:
        """The value as the forward computed it, in the model's dtype: a recomputed value is
        evaluated on its parent's forward value (never on a cast copy: the model's modules
        take their own dtype, and the forward's rounding is what the map explains)."""
        v = self.stored[i]
        if v is None and self.graph.nodes[i].kind != g.HELPER:   # a helper may compute None (timm's no-mask)
            held = self._recomputed.get(i)
            if held is not None:
                return held if rows is None else held[rows]
            n = self.graph.nodes[i]
            if not recomputed(self.graph, n):
                raise RuntimeError(f"relprop internal error: the value of {n.describe()} was released "
                                   "before its last use")
            parent = self._forward_value(n.parents[0], rows)   # the only node it reads (see recomputed)
            with torch.no_grad():
                v = g.evaluate(n, g.substitute(n.args, {n.parents[0]: parent}), n.kwargs)
            if self.hold_recomputed and rows is None:
                self._recomputed[i] = v
            return v
        return v if rows is None else v[rows]

    def shape(self, i: int) -> torch.Size:
        """Shape of node ``i``'s value without recomputing it (activations keep their input's)."""
        v = self.stored[i]
        return v.shape if v is not None else self.shape(self.graph.nodes[i].parents[0])

    def release(self, i: int) -> None:
        if 0 < i < len(self.stored) - 1:   # the input and the output stay
            self.stored[i] = None
            self._recomputed.pop(i, None)

    def drop_recomputed(self) -> None:
        self._recomputed.clear()


# A conv/linear whose input or output is larger than this (at the full batch) applies its
# rule to slices of the batch (:meth:`Context._apply`), so the rule's temporaries cost a
# slice each.  On CPU 8 MiB (one or two 224x224 images on VGG/ResNet's widest layers):
# glibc serves blocks under 32 MiB from its heap, where larger slices fragment it (VGG16,
# batch 8: 16 MiB slices raise the peak resident set by 8-14 %, 32 MiB by 25-50 %).  On
# CUDA the caching allocator does not fragment that way, and slices stay large enough to
# fill the device.
CHUNK_BYTES = 8 * 2**20
CUDA_CHUNK_BYTES = 256 * 2**20
SLICED_KINDS = (g.CONV, g.LINEAR, g.MAXPOOL, g.AVGPOOL, g.ADAPTIVE_AVGPOOL, g.ADD, g.UPSAMPLE)


class _Reader:
    """``table[i]`` for :func:`relprop.graph._substitute`, through a function."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, i: int) -> Any:
        return self.fn(i)


@dataclass(eq=False)
class Context:
    """One attribution call: the graph, every node's value, the logits and the targets."""

    graph: g.Graph
    values: Any                      # the forward's values (:func:`forward`), read through :class:`Values`
    targets: torch.Tensor
    seed: torch.Tensor               # shaped like the output, (B, classes) or dense (B, C, H, W): onehot(target)
                                     # (dense: the target's weights), or the caller's initial relevance
    user_seed: bool = False          # seed is the caller's ``initial_relevance``
    layer_sums: dict | None = None   # filled by propagate when not None
    ops: Any = reference_ops         # the backend's fused primitives (relprop.ops.dispatch)
    chunk_bytes: int | None = None   # a conv/linear larger than this runs over slices of the batch
                                     # (None: CHUNK_BYTES)
    decisions: GradientDecisions | None = None   # the gradient's branches (forward), reported to ``error``
    _step = None   # (not a field) while a carrying walk applies a rule: its own errors, [(rows, (n,))]

    def __post_init__(self):
        # Relevance is computed in float32 for float16/bfloat16 models (the forward stays in
        # the model's dtype): ``values`` reads the forward's values in the compute dtype and
        # ``_forward`` holds the originals, which autograd (Grad-CAM starts) differentiates.
        self._forward = self.values
        self.forward_dtype = self._forward[0].dtype
        self.dtype = compute_dtype(self.forward_dtype)
        self.values = Values(self.graph, self._forward, self.dtype)
        self.seed = self.seed.to(self.dtype)
        # Per-sample estimate of the relative error of the map (first order, in units of
        # the map's own size): what ill-conditioned steps of the rules can make of the
        # rounding errors of the forward values (see ``add_error``).
        self.error = torch.zeros(self.values[0].shape[0], dtype=self.dtype, device=self.values[0].device)
        self._entrywise_of: dict[int, bool] = {}
        if self.decisions is not None:
            self.decisions.report = self.add_relative_error

    @property
    def logits(self) -> torch.Tensor:
        return self.values[-1]

    @property
    def x(self) -> torch.Tensor:
        return self.values[0]

    def head(self) -> g.Node | None:
        """The conv/linear node whose output is the model output (through reshapes, and through
        the upsampling that brings a dense output to the input size: a linear map after the
        classifier conv)."""
        n = self.graph.nodes[self.graph.output.parents[0]]
        while n.kind in (g.PASS, g.RESHAPE, g.UPSAMPLE):
            n = self.graph.nodes[n.parents[0]]
        return n if n.kind in (g.CONV, g.LINEAR) else None

    def grad(self, node: g.Node, seed: torch.Tensor, channel_means: bool = False) -> torch.Tensor:
        """Gradient of ``<logits, seed>`` w.r.t. the value of ``node`` (forward must have been
        run with ``grad_from=node``); its branches taken within rounding are reported to
        ``error`` (:class:`GradientDecisions`), as they matter to a caller that uses only the
        per-channel spatial means of the gradient if ``channel_means``."""
        if self.decisions is not None:
            self.decisions.channel_means = channel_means
        (gr,) = torch.autograd.grad(self._forward[-1], self._forward[node.index], seed.to(self.forward_dtype))
        return gr.to(self.dtype)

    def detach(self) -> None:
        self._forward[:] = [v.detach() if torch.is_tensor(v) else v for v in self._forward]

    def add_error(self, amplification: torch.Tensor) -> None:
        """Record a step that turns the forward values' rounding errors into a relative error
        of ``unit * amplification`` (B,) in the map; first-order errors of steps add up."""
        self.error += self.unit * amplification.to(self.error.dtype)

    def add_relative_error(self, err: torch.Tensor, ref: torch.Tensor, rows: slice | None = None) -> None:
        """Add a step's error to the map's estimate (a rule's own, through ``Layer.report``):
        ``err`` (absolute, L2) relative to ``ref`` (the L2 norm of the relevance it is an error
        of), one per leading row of the layer -- per sample of ``rows`` if given, or of the
        batch; a layer over windows of the samples (Swin: ``B * windows`` rows, sample-major)
        adds its windows' squares up per sample, and a layer whose rows do not divide among
        the samples counts its total for every sample."""
        target = self.error if rows is None else self.error[rows]
        n = target.shape[0]
        err, ref = err.to(target.dtype), ref.to(target.dtype)
        if err.shape[0] != n:
            if err.shape[0] % n == 0:
                err, ref = err.view(n, -1).norm(dim=1), ref.view(n, -1).norm(dim=1)
            else:
                err, ref = err.norm().expand(n), ref.norm().expand(n)
        # no error is no error, also on a relevance of 0 (a zero seed), where the quotient is 1
        step = torch.where(err > 0, amplification(err, ref), 0.0)
        target += step
        if self._step is not None:   # a walk carrying its errors: the step's own, passed on
            self._step.append((rows, step))

    @property
    def unit(self) -> float:
        """Relative error of the forward values (:func:`forward_unit`)."""
        return forward_unit(self.forward_dtype)

    def per_position(self, node: g.Node) -> bool:
        """``node`` is a Linear over the last dim of a ``(B, H, W, C)`` tensor (ConvNeXt's MLP
        after a permute): a 1x1 conv per position, explained as one (channels first)."""
        return node.kind == g.LINEAR and len(self.values.shape(node.parents[0])) == 4

    def linear_map(self, node: g.Node, fold_bn: bool) -> LinearMap:
        """The node's map, with the following BatchNorm folded in if asked and possible.  A map
        (and the sign-split weights it builds) lives while its node's rule runs: holding every
        layer's splits at once would cost up to twice the model's weights, and nothing
        derived from a parameter may outlive the call."""
        if self.per_position(node):
            return LinearMap(PerPosition(node.module), dtype=self.dtype)
        bn = self._folded_bn(node) if fold_bn else None
        return LinearMap(node.module, dtype=self.dtype) if bn is None else LinearMap.folded(node.module, bn.module, self.dtype)

    def _folded_bn(self, node: g.Node) -> g.Node | None:
        consumers = self.graph.consumers[node.index]
        if node.kind == g.CONV and len(consumers) == 1:
            nxt = self.graph.nodes[consumers[0]]
            if nxt.kind == g.BN:
                return nxt
        return None

    def layer(self, node: g.Node, fold_bn: bool, rows: slice | None = None,
              lin: LinearMap | None = None) -> Layer:
        """What the node's rule sees; with ``rows``, of those samples only (the node's tensor
        inputs, output and pre-activation are sliced; other arguments are read whole)."""
        read: dict[int, Any] = {}   # each value read (or recomputed) once per layer

        def value(i: int) -> Any:
            if i not in read:
                batch = rows is not None and (i in node.parents or i in (node.index, bn_index, pre_index))
                read[i] = self.values.get(i, rows if batch else None)
            return read[i]

        bn = self._folded_bn(node) if fold_bn and node.kind == g.CONV else None
        bn_index = bn.index if bn is not None else -1
        source = self.graph.nodes[node.parents[0]] if node.parents else None
        pre_index = (source.parents[0] if source is not None and source.parents
                     and source.kind in (g.RELU, g.LEAKY_RELU, g.ACTIVATION) else -1)
        table = _Reader(value)
        lay = Layer(node, [value(p) for p in node.parents], value(node.index), g.substitute(node.args, table),
                    g.substitute(node.kwargs, table),
                    x_nonneg=bool(node.parents) and self.graph.nodes[node.parents[0]].nonneg, ops=self.ops,
                    unit=self.unit, report=lambda err, ref: self.add_relative_error(err, ref, rows),
                    pre_activation=(lambda: value(pre_index)) if pre_index >= 0 else None)
        if node.kind in (g.CONV, g.LINEAR):
            lay.lin = lin or self.linear_map(node, fold_bn)
            lay.z = value(bn.index if bn is not None else node.index)
            if self.per_position(node):   # the 1x1 conv's view: channels first
                lay.xs, lay.y, lay.z = [channels_first(lay.x)], channels_first(lay.y), channels_first(lay.z)
                if pre_index >= 0:
                    lay.pre_activation = lambda: channels_first(value(pre_index))
        return lay

    def apply(self, table: RuleTable, node: g.Node, head: g.Node | None, r: torch.Tensor) -> list:
        """Relevance at each input of ``node`` for relevance ``r`` at its output, by the table's rule."""
        if not self.per_position(node):
            return self._apply(table.rule(node, head), node, table.fold_bn, r)
        outs = self._apply(table.rule(node, head, per_position=True), node, table.fold_bn, channels_first(r))
        return [None if o is None else channels_last(o) for o in outs]

    def propagate(self, table: RuleTable, r0: torch.Tensor, start: g.Node | None = None,
                  last: bool = True) -> torch.Tensor:
        """Relevance at the input for relevance ``r0`` at the output of ``start`` (default: the
        model output).

        With ``last`` (a method's last pass over this forward) each node's value is released
        as soon as the walk is past its last reader, as autograd frees saved tensors during
        backward: the pass then holds at most the forward's values, shrinking, plus one
        layer's temporaries.  ``last=False`` keeps every value for another pass; a method with
        several passes over one forward does better with :meth:`propagate_together`.
        """
        return self.propagate_together([(table, r0)], start, release=last)[0]

    def propagate_together(self, passes: list[tuple[RuleTable, torch.Tensor]], start: g.Node | None = None,
                           release: bool = True) -> list[torch.Tensor]:
        """Several relevance passes (a rule table and an initial relevance each) in one walk:
        each node applies every pass's rule in turn, so values are released after the last
        pass has read them and the memory is that of one pass plus the extra relevances.
        Each pass's result equals its own :meth:`propagate`; ``layer_sums`` are the last pass's.

        Each step's estimated error is added to ``error`` where it is made, relative to the
        relevance there.  A pass whose table ``carries_errors`` (RAP's signed residual splits)
        also carries its errors along with its relevance, as absolute errors: entrywise along a
        residual stream (:meth:`_entrywise`), where an error made where one add's split cancels
        meets the next split at the same entries and lands, magnified, in its small share
        (:func:`split_errors`; shares inherit ``|R_k / R|`` of the error of ``R`` and
        errors add up where relevances meet), and as a norm per sample elsewhere.  What
        reaches the input, relative to the map, includes every step's own error and the
        magnification of the errors made before it: ``error`` becomes the larger of the two
        estimates (README, Numerics).
        """
        nodes = self.graph.nodes
        start = start or self.graph.output
        head = self.head()
        relevances: list[dict[int, torch.Tensor]] = [{start.index: r0} for _, r0 in passes]
        errors: list[dict[int, torch.Tensor]] | None = [{} for _ in passes] if any(
            table.carries_errors for table, _ in passes) else None
        results = [torch.zeros_like(self.x) for _ in passes]
        release_at = self._release_points() if release else {}
        if release:
            for n in nodes[start.index + 1:]:
                self.values.release(n.index)
        self.values.hold_recomputed = release
        for node in reversed(nodes[:start.index + 1]):
            for i in release_at.get(node.index + 1, ()):   # read for the last time by the node before
                self.values.release(i)
            for k, ((table, _), relevance) in enumerate(zip(passes, relevances)):
                r = relevance.pop(node.index, None)
                carry = errors is not None and table.carries_errors
                e = errors[k].pop(node.index, None) if carry else None
                if r is None:
                    continue
                if node.kind == g.INPUT:
                    if carry:   # the carried estimate includes every step's own: the larger of the two
                        torch.maximum(self.error, self._relative(e, r), out=self.error)
                    results[k] = r
                    continue
                # a carrying pass collects the step's own errors while its rule runs (add_relative_error)
                self._step = [] if carry else None
                try:
                    outs = [r] if node.kind == g.OUTPUT else self.apply(table, node, head, r)
                    outs = [(p, ri) for p, ri in zip(node.parents, outs) if ri is not None]  # None: no relevance
                    if (not carry and node.kind == g.ADD and len(outs) == 2
                            and outs[0][1].shape == outs[1][1].shape == r.shape):   # (carried: split_errors)
                        self.add_error(split_amplification(outs[0][1], outs[1][1]))
                finally:
                    parts, self._step = self._step, None
                for p, ri in outs:
                    relevance[p] = relevance[p] + ri if p in relevance else ri
                if carry:
                    step = None   # (no step of its own: known without reading the device)
                    for rows, part in parts or ():
                        step = torch.zeros_like(self.error) if step is None else step
                        (step if rows is None else step[rows]).add_(part)
                    for p, ei in self._pass_on_errors(node, r, e, step, outs):
                        errors[k][p] = errors[k][p] + ei if p in errors[k] else ei
                if self.layer_sums is not None and node.kind not in (g.OUTPUT, g.HELPER):
                    self.layer_sums[node.name] = sum(ri.flatten(1).sum(1) for _, ri in outs)
        self.values.hold_recomputed = False
        self.values.drop_recomputed()
        return results

    def _relative(self, e: torch.Tensor | None, r: torch.Tensor) -> torch.Tensor:
        """The error ``e`` of ``r`` (entrywise, or a norm per sample) relative to ``r``, per sample."""
        if e is None:
            return torch.zeros_like(self.error)
        batch = self.error.shape[0]
        return safe_ratio(e if e.dim() == 1 else sample_norms(e, batch), sample_norms(r, batch))

    def _pass_on_errors(self, node: g.Node, r: torch.Tensor, e: torch.Tensor | None, step: torch.Tensor | None,
                        outs: list) -> list:
        """``(parent, error)`` for each of the node's outputs ``outs`` (``(parent, relevance)``):
        the error ``e`` of ``r`` (entrywise, or a norm per sample) passed on with the relevance
        -- entrywise as ``|R_i / R| e`` through a rule that keeps entries apart, as ``e``'s
        relative error times the share elsewhere -- plus the step's own (``step``, relative,
        None where the rule reported none) times the share.  A two-way add's shares also get
        their own (:func:`split_errors`).  Kept entrywise where the parent is
        :meth:`_entrywise`, as a norm per sample elsewhere."""
        batch = self.error.shape[0]
        entrywise_in = e is not None and e.dim() > 1
        if (node.kind == g.ADD and len(outs) == 2 and len(node.parents) == 2
                and outs[0][1].shape == outs[1][1].shape == r.shape and (e is None or entrywise_in)):
            shares = split_errors(r, outs[0][1], outs[1][1], e, 0.0 if step is None else per_row(step, r), self.unit)
            return [(p, ei if self._entrywise(p) else sample_norms(ei, batch)) for (p, _), ei in zip(outs, shares)]
        moved = entrywise_in and node.kind in ENTRYWISE_KINDS
        rel = None    # e relative to r, plus the step's own: per sample, formed once if needed
        out = []
        for p, ri in outs:
            entrywise = self._entrywise(p)
            if moved and ri.shape == r.shape:
                if ri is r:      # passed on unchanged (a ReLU, an identity): so is its error
                    ei = e if step is None else e.addcmul(ri.abs(), per_row(step, ri))
                else:
                    ei = safe_ratio(ri.abs(), r.abs()).mul_(e)
                    if step is not None:
                        ei.addcmul_(ri.abs(), per_row(step, ri))
            else:
                if rel is None:
                    rel = self._relative(e, r) if step is None else self._relative(e, r) + step
                ei = ri.abs().mul_(per_row(rel, ri)) if entrywise else rel * sample_norms(ri, batch)
            if not entrywise and ei.dim() > 1:
                ei = sample_norms(ei, batch)
            out.append((p, ei))
        return out

    def _entrywise(self, i: int) -> bool:
        """Whether node ``i`` keeps its carried error entrywise: a two-way add, or an identity,
        ReLU or activation reached from one through such nodes (a residual stream).  Elsewhere
        a norm per sample is enough, and costs nothing."""
        flag = self._entrywise_of.get(i)
        if flag is None:
            n = self.graph.nodes[i]
            flag = n.kind == g.ADD or (n.kind in ENTRYWISE_KINDS and any(self._entrywise(p) for p in n.parents))
            self._entrywise_of[i] = flag
        return flag

    def _apply(self, rule: Rule, node: g.Node, fold_bn: bool, r: torch.Tensor) -> list:
        """``rule`` on the node's layer, over slices of the batch where the layer is large.

        Every rule is per sample (methods.md §1.1: sums and shifts never mix samples), so a
        conv/linear, pool or add (:data:`SLICED_KINDS`) whose input or output exceeds
        ``chunk_bytes`` runs on chunks of samples
        written into one output: its temporaries (several layer-sized tensors in the split
        rules) then cost a chunk each instead of the batch, which keeps the pass within the
        gradient's peak on the early, widest layers.  A rule that builds weight-sized tensors
        per sample (RSP's data-dependent kernels) says how many as ``weights_per_sample``.
        """
        if node.kind not in SLICED_KINDS or not node.parents:
            return rule(self.layer(node, fold_bn), r)
        shapes = [self.values.shape(p) for p in node.parents] + [self.values.shape(node.index)]
        batch = r.shape[0]
        if any(len(sh) == 0 or sh[0] != batch for sh in shapes):
            return rule(self.layer(node, fold_bn), r)
        weights = node.module.weight.numel() if node.kind in (g.CONV, g.LINEAR) else 0
        per_sample = (max(sh[1:].numel() for sh in shapes)
                      + getattr(rule, "weights_per_sample", 0) * weights) * torch.finfo(self.dtype).bits // 8
        budget = self.chunk_bytes or (CUDA_CHUNK_BYTES if self.x.is_cuda else CHUNK_BYTES)
        step = max(1, budget // max(per_sample, 1))
        if step >= batch:
            return rule(self.layer(node, fold_bn), r)
        lin = self.linear_map(node, fold_bn) if node.kind in (g.CONV, g.LINEAR) else None
        outs: list = []
        for start in range(0, batch, step):
            s = slice(start, start + step)
            pieces = rule(self.layer(node, fold_bn, rows=s, lin=lin), r[s])
            if not outs:
                outs = [None if p is None else p.new_empty((batch,) + p.shape[1:]) for p in pieces]
            for o, p in zip(outs, pieces):
                if o is not None:
                    o[s] = p
        return outs

    def _release_points(self) -> dict[int, list[int]]:
        """For the backward walk: node index -> the values its processing reads last.  A
        node's value is read by its consumers, by itself, and (a BatchNorm folded into the
        conv before it) by that conv: it is free once the lowest of these has run."""
        out: dict[int, list[int]] = {}
        for n in self.graph.nodes:
            first_reader = n.index
            if n.kind == g.BN and n.parents and self._folded_bn(self.graph.nodes[n.parents[0]]) is n:
                first_reader = n.parents[0]
            out.setdefault(first_reader, []).append(n.index)
        return out
