"""The public entry point: ``Explainer(model, method, **params)`` captured once, called
per batch."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from . import graph as g
from . import methods
from .ops.dispatch import check_backend, operations, resolve_backend
from .engine import Context, compute_dtype, forward
from .targets import resolve as resolve_targets


class Attribution(NamedTuple):
    """Result of :meth:`Explainer.attribute`."""

    relevance: torch.Tensor               # shaped like the input
    logits: torch.Tensor                  # the model output: (B, classes), or (B, C, H, W) for a dense output
    target: torch.Tensor                  # (B,) explained class per sample (with initial_relevance: the
                                          # class carrying most of the seed's weight)
    layer_sums: dict | None = None        # node name -> (B,) relevance sum at that node's input(s)
    error: torch.Tensor | None = None     # (B,) estimated relative error from the ill-conditioned steps (README, Numerics)


class HooksNotRunWarning(UserWarning):
    """The model has hooks, which relprop never runs (:class:`Explainer`)."""


class Explainer:
    """Relevance propagation for one model and one method.

    >>> explainer = relprop.Explainer(model, method="rap")
    >>> relevance = explainer(images)               # (B, 3, H, W), predicted classes
    >>> heat = explainer.heatmap(images, target=7)  # (B, H, W) channel sum

    The model is captured once (torch.fx) and never modified: no parameter, buffer,
    hook or training flag changes, and its forward is not called.  Explanations use
    inference semantics (BatchNorm running statistics, no dropout) whatever mode the
    model is in.  ``method`` is one of :func:`relprop.available_methods`; ``params`` are
    that method's options (e.g. ``ratio=2`` for ``"ae"``).

    ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile`` wrappers are
    explained as the module they wrap (read, not changed; layer names such as
    ``init_layer`` may carry the wrapper's ``module.`` / ``_orig_mod.`` prefix or not); a
    TorchScript module is refused (pass the eager module).

    Hooks are never run: the captured graph computes every layer from its parameters
    without calling the model or its modules, so a forward or forward pre-hook (on any
    module, or module-global) is not part of the explained function, and neither is a
    module backward hook for the methods that differentiate the captured graph (gradient,
    gradient-x-input, Grad-CAM and the Grad-CAM starts of RSP and AE; the other methods take
    no gradients).  Whether a hook changes what the model computes cannot be known without
    running it, so every such hook present when the explainer is built is named in one
    :class:`HooksNotRunWarning` (a hook that only records activations included: it records
    nothing), and one registered later in another at the next call.  Remove the hooks that
    change outputs, or filter the warning if none does.

    Parameters and buffers are read at every call, so an explainer reused after they change
    (``load_state_dict``, an optimiser step) explains the changed model; a submodule replaced,
    added or removed since (``model.fc = nn.Linear(...)``), or a module setting changed (a
    stride, a negative slope, a GELU's approximation), makes the next call capture the model
    again, and a model that cannot be captured then is refused at every call until it can.
    What fx traced of the model's own Python (a branch on an attribute, say) is not followed:
    build a new explainer after changing that.

    A model returning a dict of tensors (torchvision's segmentation models) is explained at
    its ``"out"`` entry, or at ``output_key``; a dense ``(B, C, H, W)`` output takes region
    targets (:class:`relprop.SegmentationTarget`, README "Dense outputs").
    """

    def __init__(self, model: nn.Module, method: str = "rap", backend: str = "auto", output_key: str | None = None,
                 **params):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if output_key is not None and not isinstance(output_key, str):
            raise TypeError(f"output_key must be a str (a key of the model's dict output) or None, "
                            f"got {type(output_key).__name__} {output_key!r}")
        self.model = model
        self.method = methods.create(method, **params)
        check_backend(backend)
        self.backend = backend
        self.output_key = output_key
        self._hooks: list = []       # the hooks already warned about
        self._capture("")

    def _capture(self, since: str) -> None:
        """Capture the model's graph and resolve the method's layers on it; only once both
        succeed is the capture the explainer's, with the key it was made at
        (:class:`relprop.graph.ModelWatch`), so a model that cannot be captured is refused at
        every call until it can.  Then the hooks not run are named (:meth:`_warn_hooks`)."""
        key = g.ModelWatch(self.model)
        graph = g.capture(self.model, self.output_key)
        try:
            differentiates = self.method.grad_node(graph) is not None   # resolves init_layer now
        except KeyError as e:
            raise ValueError(f"method {self.method.name!r}: {e.args[0]}") from None
        _check_zb_bounds(self.method, graph)
        self.graph, self._differentiates, self._key = graph, differentiates, key
        self._warn_hooks(since)

    def _warn_hooks(self, since: str) -> None:
        """Warn about the hooks not run that were not warned about before (all of them at
        build; at a call, those registered since), each hook by its handle's id."""
        hooks = g.hooks_not_run(self.model, backward=self._differentiates)
        known = {key for _, key in self._hooks}
        new = [line for line, key in hooks if key not in known]
        self._hooks = hooks
        self._handles = RemovableHandle.next_id
        if new:
            warnings.warn(f"relprop never runs the hooks of {type(self.model).__name__}{since}: it computes each layer "
                          "from its parameters and never calls the model or its modules, so what these hooks do "
                          "(change an input or output, record activations or gradients) is not part of the "
                          "explanation:\n  " + "\n  ".join(new), HooksNotRunWarning, stacklevel=_stacklevel())

    def _follow_model(self) -> None:
        """Before each call: a module of the model replaced, added or removed since the capture
        (``model.fc = nn.Linear(...)``), or a module setting changed (a stride, a negative
        slope, a GELU's approximation), makes the model captured again, so the map is never
        that of the old modules; hooks registered since are warned about.  Parameters and
        buffers are read at each call (nothing derived from them is kept), so changing them
        needs nothing here."""
        since = " registered since the explainer was built"
        if self._key.changed():
            self._capture(since)
        elif RemovableHandle.next_id != self._handles:   # a hook registered anywhere since the last look
            self._warn_hooks(since)

    def __repr__(self) -> str:
        return f"Explainer({type(self.model).__name__}, {self.method!r}, backend={self.backend!r})"

    def __call__(self, x: torch.Tensor, target=None, initial_relevance: torch.Tensor | None = None) -> torch.Tensor:
        return self.attribute(x, target, initial_relevance).relevance

    def heatmap(self, x: torch.Tensor, target=None, initial_relevance: torch.Tensor | None = None) -> torch.Tensor:
        """Relevance summed over channels: (B, H, W)."""
        return self(x, target, initial_relevance).sum(dim=1)

    def attribute(self, x: torch.Tensor, target=None, initial_relevance: torch.Tensor | None = None,
                  layer_sums: bool = False) -> Attribution:
        """Explain ``x`` for ``target``: None (predicted class), an int, a per-sample list /
        tensor / array of class indices, or a callable on the model output (pytorch-grad-cam's
        ``ClassifierOutputTarget`` style) or a list of per-sample ones; :mod:`relprop.targets`
        defines exactly what is accepted and how a callable becomes the output's seed.  For a
        dense ``(B, C, H, W)`` output the target selects a class over a region
        (:class:`relprop.SegmentationTarget`, ``(category, mask)``, a class over the whole
        map, a mask of the output's shape, or a callable); ``None`` is refused there.

        ``initial_relevance`` (shaped like the output) seeds the output directly instead of the one-hot
        target (contrastive, multi-label or regression explanations); it may also be a
        callable on the (detached) logits returning that tensor (Zennit's ``attr_output``).
        For the relevance-propagating methods (the LRP family, RAP) it is the relevance of
        the output, as in Zennit: ``target=t`` equals ``initial_relevance=logits * onehot(t)``
        and the map sums to the seed's sum where the rules conserve.  For the methods that
        start from a gradient (gradient, gradient-x-input, Grad-CAM, RSP, AE) it weights the
        output's gradient, as the one-hot vector of a target does (there ``target=t`` is
        ``initial_relevance=onehot(t)``).
        ``layer_sums=True`` also returns the per-sample relevance sum at every layer's
        input (conservation diagnostics).
        """
        if target is not None and initial_relevance is not None:
            # the seed replaces the target's one-hot: a target would be reported but not explained
            raise ValueError("pass target= or initial_relevance=, not both: initial_relevance seeds the output "
                             "itself, so the target would be ignored")
        self._follow_model()
        self._check_input(x)
        if initial_relevance is not None and not self.method.accepts_initial_relevance:
            raise ValueError(f"method {self.method.name!r} builds its own target and dual seeds; "
                             "use target= instead of initial_relevance=")
        # Under torch.inference_mode() autograd cannot record (the Grad-CAM starts and the
        # gradient baselines need it): leave it for this call, as no_grad is left below for
        # the nodes that need gradients.  An inference-mode input is cloned into a normal one.
        with torch.inference_mode(False):
            if x.is_inference():
                x = x.clone()
            return self._attribute(x, target, initial_relevance, layer_sums)

    def _attribute(self, x, target, initial_relevance, layer_sums) -> Attribution:
        decisions = None
        try:
            with torch.no_grad():
                values, decisions = forward(self.graph, x, self.method.grad_node(self.graph), self.method.walks)
                logits = values[-1]
                if callable(initial_relevance):        # a function of the output (Zennit's attr_output)
                    initial_relevance = initial_relevance(logits.detach().clone())
                if target is None and initial_relevance is not None:
                    # the caller's seed says what is explained: the reported class is the one
                    # carrying most of its weight (summed over the positions of a dense output)
                    weights = _seed(initial_relevance, None, logits)
                    per_class = weights.abs().flatten(2).sum(2) if logits.ndim > 2 else weights.abs()
                    targets, one_hot = per_class.argmax(dim=1), True
                else:
                    targets, weights, one_hot = resolve_targets(target, logits)
                if not one_hot and not self.method.accepts_initial_relevance:
                    duals = f"method {self.method.name!r} builds its contrastive duals from one class per sample: "
                    if logits.ndim > 2:
                        raise ValueError(duals + "a dense target must put its weights on one class channel per sample")
                    raise ValueError(duals + "a callable target must select one class (its gradient with respect to "
                                     "the output must be one-hot)")
                seed = _seed(initial_relevance, weights, logits)
                ctx = Context(self.graph, values, targets, seed, user_seed=initial_relevance is not None,
                              layer_sums={} if layer_sums else None, decisions=decisions,
                              ops=operations(resolve_backend(self.backend, x.device,
                                                                 compute_dtype(logits.dtype))))
                relevance = self.method.run(ctx).detach()
        finally:   # its hooks would keep this call alive (GradientDecisions.close)
            if decisions is not None:
                decisions.close()
                self._handles = RemovableHandle.next_id   # (its own tensor hooks are no model's)
        _warn_if_not_finite(relevance, self.method.name)
        # a sample whose output is not finite (a float16 logit past 65504) has an infinite error
        output_not_finite = ~torch.isfinite(logits.detach().flatten(1)).all(dim=1)
        error = ctx.error.masked_fill(output_not_finite.to(ctx.error.device), float("inf"))
        _warn_if_untrustworthy(error, ctx.forward_dtype, self.method.name, output_not_finite)
        return Attribution(relevance, logits.detach(), targets, ctx.layer_sums, error)

    def _check_input(self, x) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"empty batch: input has shape {tuple(x.shape)}")
        self.graph.check_input(x)
        bad = ~torch.isfinite(x)
        if bad.any():
            samples = bad.flatten(1).any(1).nonzero()[:, 0].tolist()
            raise ValueError(f"input contains NaN or Inf ({int(bad.sum())} of {x.numel()} values, in sample(s) "
                             f"{samples[:10]}{' ...' if len(samples) > 10 else ''})")


def _warn_if_not_finite(relevance: torch.Tensor, method: str) -> None:
    """A rule's division can overflow (a denominator near 0, e.g. a residual add of two
    branches that nearly cancel); say so instead of returning NaN silently."""
    bad = ~torch.isfinite(relevance.flatten(1)).all(1)
    if bad.any():
        warnings.warn(f"method {method!r} gave NaN or Inf relevance for sample(s) {bad.nonzero()[:, 0].tolist()}: "
                      f"a division in its rules overflowed {relevance.dtype}; try float64 (model.double()) or a "
                      "method with stabilised denominators (lrp-epsilon-plus, rsp, ae)", RuntimeWarning,
                      stacklevel=_stacklevel())


# A map whose estimated relative error exceeds this is reported (it may differ visibly from
# the float64 map of the same model and input).  A half-precision forward carries errors of
# ~1e-3 into every map (README, Numerics), so there the bar is 30 rounding units.
TRUSTED_ERROR = 1e-3


def trusted_error(forward_dtype: torch.dtype) -> float:
    """The estimated relative error above which a map of a ``forward_dtype`` model is reported."""
    return max(TRUSTED_ERROR, 30 * torch.finfo(forward_dtype).eps)


@contextlib.contextmanager
def reported_maps_quiet():
    """Silence the per-call warning about numerically untrustworthy maps, for callers that
    report ``Attribution.error`` their own way (an index column, a report column)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"method '.*': the map\(s\) of sample\(s\)", RuntimeWarning)
        yield


def _warn_if_untrustworthy(error: torch.Tensor, forward_dtype: torch.dtype, method: str,
                           output_not_finite: torch.Tensor | None = None) -> None:
    """Say which maps may be numerically wrong: the per-sample error estimate the rules
    accumulated (ill-conditioned residual splits, contrastive differences) above
    :func:`trusted_error`, and apart from them the samples whose model output is not finite
    (``output_not_finite``, (B,) bool; their error is inf).  One host sync per call."""
    bad = error > trusted_error(forward_dtype)
    if not bad.any():
        return
    dtype = str(forward_dtype).removeprefix("torch.")
    if output_not_finite is not None and output_not_finite.any():
        output_not_finite = output_not_finite.to(bad.device)
        samples = output_not_finite.nonzero()[:, 0].tolist()
        warnings.warn(f"method {method!r}: the model's output for sample(s) {samples} is not finite (inf or NaN) in "
                      f"{dtype}: its predicted class and its map mean nothing there (Attribution.error is inf); run "
                      "the model in a wider dtype (model.float() or model.double())",
                      RuntimeWarning, stacklevel=_stacklevel())
        bad &= ~output_not_finite
        if not bad.any():
            return
    worst = error[bad].max().item()
    warnings.warn(f"method {method!r}: the map(s) of sample(s) {bad.nonzero()[:, 0].tolist()} of this "
                  f"{dtype} model may be off by up to ~{worst:.0e} (relative "
                  "L2): an ill-conditioned step (a residual add whose branches nearly cancel, a contrastive "
                  "difference of nearly equal maps, an epsilon-rule division by a value near epsilon, a max-pool "
                  "window with two near-equal largest entries, an input within rounding of 0 where the rule "
                  "or a ReLU's gradient treats 0 apart, or subnormal attention weights) amplifies rounding "
                  "errors of the forward pass; the float64 model (model.double()) reduces them, but at a "
                  "near-tie, a value near 0 or a division near epsilon the map itself is unstable in any "
                  "precision (README, Numerics)",
                  RuntimeWarning, stacklevel=_stacklevel())


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the function calling this: the first frame
    outside relprop, so the warning names the caller's line whichever entry it came through
    (``explainer(x)``, ``.heatmap``, ``.attribute``, :func:`explain`, relprop's adapters)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)
                                 or frame.f_globals.get("__name__", "").startswith(_CALLERS_OF_ADAPTERS)):
        frame, level = frame.f_back, level + 1
    return level


# Libraries that call relprop's adapters from inside their own method (Captum's ``attribute``
# wraps the adapter's in its logging decorator): the warning names their caller's line.
_CALLERS_OF_ADAPTERS = ("captum.",)


def _check_zb_bounds(method, graph: g.Graph) -> None:
    """Per-channel ``zb_bounds`` must have one value per input channel (or one): checked when
    the explainer is built wherever the input goes straight into convolutions, whose
    ``in_channels`` say how many (elsewhere the call checks it against the input)."""
    bounds = getattr(method, "zb_bounds", None)
    if bounds is None or isinstance(bounds, str):
        return
    firsts = [n for n in graph.nodes if 0 in n.parents and n.kind == g.CONV]
    channels = {n.module.in_channels for n in firsts if hasattr(n.module, "in_channels")}
    if len(channels) != 1:
        return
    (c,) = channels
    for b in map(torch.as_tensor, bounds):
        if b.ndim == 1 and b.numel() not in (1, c):
            raise ValueError(f"method {method.name!r}: zb_bounds has {b.numel()} per-channel values, but the model's "
                             f"first layer takes {c} channels")


def _seed(initial_relevance, weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if initial_relevance is None:
        return weights
    r = torch.as_tensor(initial_relevance, dtype=logits.dtype, device=logits.device)
    if r.ndim == 1 and logits.ndim == 2 and r.shape[0] == logits.shape[1]:
        r = r.expand_as(logits)
    if r.shape != logits.shape:
        also = f" (or ({logits.shape[1]},))" if logits.ndim == 2 else ""
        raise ValueError(f"initial_relevance must have shape {tuple(logits.shape)}{also}, got {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("initial_relevance contains NaN or Inf")
    return r


def explain(model: nn.Module, x: torch.Tensor, target=None, method: str = "rap",
            initial_relevance: torch.Tensor | None = None, **params) -> torch.Tensor:
    """One-call form of :class:`Explainer`: relevance shaped like ``x``; ``params`` are the
    Explainer's (``backend``, ``output_key``) and the method's."""
    return Explainer(model, method, **params)(x, target, initial_relevance)


def available_methods() -> dict[str, str]:
    """Method name -> one-line description."""
    return {name: cls.summary for name, cls in sorted(methods.METHODS.items())}


__all__: Sequence[str] = ["Explainer", "Attribution", "HooksNotRunWarning", "explain", "available_methods"]
