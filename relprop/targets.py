"""What is explained: target parsing shared by the explainer and the metrics.

A *target* selects, per sample, the output score to explain.  Accepted forms:

* ``None``: the predicted class (arg-max of the logits);
* an ``int`` class index, or a sequence / tensor / NumPy array of ``B`` of them (one per
  sample; a single one is broadcast);
* a **callable on the model output** (pytorch-grad-cam's ``ClassifierOutputTarget``
  style): ``target(logits) -> (B,)`` scores, called with the ``(B, classes)`` logits,
  sample ``b``'s score computed from row ``b`` only;
* a **sequence of B callables** (pytorch-grad-cam's ``targets=[...]``): item ``b`` is
  called with sample ``b``'s ``(classes,)`` logits and returns a scalar.

A callable target is linearised at the logits: its per-sample gradient ``w_b = d score_b
/ d logits_b`` replaces the one-hot vector of a class index everywhere (the gradient
methods back-propagate ``w_b``; the LRP family starts from ``w_b * logits_b``), so
``ClassifierOutputTarget(c)`` gives exactly the maps of ``target=c``, and a weighted sum of
logits explains that sum.  The reported class (``Attribution.target``) is the arg-max of
``w_b``.  Methods that build their own contrastive duals from a class (CLRP, SGLRP) need
a one-hot ``w_b``.  Every bad target raises a ``TypeError`` / ``ValueError`` before any
relevance is computed.

**Dense outputs.**  For a model whose output is a map ``(B, C, H, W)`` of class scores (a
segmentation model) a target selects *class c over a region*: it becomes output weights
``W`` of the output's shape, and the LRP family starts from ``W * output`` (for a classifier
``W`` is the one-hot vector).  Accepted forms:

* :class:`SegmentationTarget` ``(category, mask)``, or the tuple ``(category, mask)``:
  ``W[b, c] = mask[b]`` for ``c = category[b]``, 0 on the other classes; ``mask`` is ``(H, W)``
  or ``(B, H, W)``, boolean or float (weights), or None for the whole map;
* an ``int`` class (or one per sample): that class over the whole map;
* a boolean or float tensor / array of the output's shape ``(B, C, H, W)``: ``W`` itself;
* a callable on the output, ``target(output) -> (B,)``, or a list of per-sample callables
  each called with ``(C, H, W)`` (pytorch-grad-cam's ``SemanticSegmentationTarget``):
  linearised as for classifiers, ``W`` is its gradient.

``target=None`` (the predicted class) is refused: a dense output has no single predicted
class (:class:`DenseOutputError`).  A target selecting nothing (an empty mask) is refused.
Methods that build contrastive duals (CLRP, SGLRP) need ``W`` on one class channel per
sample.
"""
from __future__ import annotations

import torch

__all__ = ["as_targets", "is_callable_target", "resolve", "scores", "SegmentationTarget", "DenseOutputError"]

_KINDS = ("target must be None, an int class index, a sequence or tensor of them, or a callable on the model "
          "output (or a sequence of per-sample callables)")


def is_callable_target(target) -> bool:
    """True for a callable target or a non-empty sequence of per-sample callables."""
    if callable(target) and not torch.is_tensor(target):
        return True
    return (isinstance(target, (list, tuple)) and len(target) > 0 and all(callable(t) for t in target))


def as_targets(target, batch: int, device) -> torch.Tensor:
    """``target`` (int, sequence, tensor or array of class indices) as a (batch,) long tensor."""
    try:
        if isinstance(target, (str, bytes)):
            raise TypeError
        t = torch.as_tensor(target, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{_KINDS}; got {type(target).__name__} {target!r}") from None
    if t.numel() == 0:   # an empty list becomes a float tensor: say what is wrong with it
        raise ValueError(f"got 0 targets for a batch of {batch}")
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"target must hold integer class indices, got {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} targets for a batch of {batch}")
    return t


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"the model must output (B, classes) scores, got shape {tuple(logits.shape)}")


def class_targets(target, logits: torch.Tensor) -> torch.Tensor:
    """A non-callable ``target`` as (B,) class indices checked against the logits' classes."""
    _check_logits(logits)
    b, classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = as_targets(target, b, logits.device)
    out = (t < 0) | (t >= classes)
    if out.any():
        raise ValueError(f"target {t[out][0].item()} out of range for a model with {classes} classes")
    return t.clone()


def scores(target, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The (N,) target scores of ``logits`` (N, classes).  ``rows`` (N,) gives the sample
    index of each row (several rows may belong to one sample, e.g. perturbed copies);
    None: row ``i`` is sample ``i``.  Class-index targets must already be a (B,) tensor."""
    _check_logits(logits)
    n = logits.shape[0]
    idx = torch.arange(n, device=logits.device) if rows is None else rows
    if isinstance(target, (list, tuple)) and is_callable_target(target):
        s = torch.stack([torch.as_tensor(target[int(i)](logits[j])).reshape(()) for j, i in enumerate(idx.tolist())])
    elif is_callable_target(target):
        s = target(logits)
    else:
        return logits.gather(1, target.to(logits.device)[idx][:, None]).squeeze(1)
    if not torch.is_tensor(s):
        raise TypeError(f"a callable target must return a tensor of scores, got {type(s).__name__}")
    s = s.reshape(-1) if s.numel() == n else s
    if tuple(s.shape) != (n,):
        raise ValueError(f"a callable target must return one score per sample, shape ({n},); got "
                         f"{tuple(s.shape)}")
    return s


def _callable_weights(target, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of a callable target's scores with respect to the logits."""
    return _linearise(target, logits, lambda z: scores(target, z))


def _linearise(target, logits: torch.Tensor, score) -> torch.Tensor:
    """The gradient of the (B,) scores ``score(z)`` at ``z = logits`` (any output shape), with
    clear errors where the scores do not depend on the output."""
    if isinstance(target, (list, tuple)) and len(target) != logits.shape[0]:
        raise ValueError(f"got {len(target)} target callables for a batch of {logits.shape[0]}")
    with torch.enable_grad():
        z = logits.detach().clone().requires_grad_(True)
        s = score(z)
        if not s.requires_grad:
            raise ValueError("a callable target's scores must depend on the model output (they carry no gradient)")
        (w,) = torch.autograd.grad(s.sum(), z, allow_unused=True)
    if w is None:
        raise ValueError("a callable target's scores must depend on the model output (they carry no gradient)")
    if not torch.isfinite(w).all():
        raise ValueError("a callable target's gradient with respect to the model output contains NaN or Inf")
    zero = (w == 0).flatten(1).all(dim=1)
    if zero.any():
        raise ValueError(f"a callable target's scores do not depend on the output of sample(s) "
                         f"{zero.nonzero()[:, 0].tolist()[:10]} (zero gradient)")
    return w.detach()


def is_one_hot(w: torch.Tensor) -> bool:
    """Each row of ``(B, classes)`` weights is 0 but for a single 1: one class per sample."""
    return bool(((w == 0) | (w == 1)).all() and ((w == 1).sum(dim=1) == 1).all())


def resolve(target, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(classes (B,), weights (B, classes), one_hot)``: the explained class per sample and
    the output weights that replace its one-hot vector (module docstring).  For a dense
    output ``(B, C, H, W)`` see :func:`resolve_dense`: ``weights`` then has the output's
    shape and ``one_hot`` says that each sample's weights lie on one class channel."""
    if logits.ndim > 2:
        return resolve_dense(target, logits)
    _check_logits(logits)
    if is_callable_target(target):
        w = _callable_weights(target, logits).to(logits.dtype)
        classes = w.argmax(dim=1)
        one_hot = is_one_hot(w)
        return classes, w, one_hot
    t = class_targets(target, logits)
    return t, torch.nn.functional.one_hot(t, logits.shape[1]).to(logits.dtype), True


# ----------------------------------------------------------------------------- dense outputs
_DENSE_KINDS = ("give relprop.SegmentationTarget(category, mask), a tuple (category, mask), a class index "
                "(that class over the whole map), a (B, C, H, W) boolean or float mask of the output, or a "
                "callable on the output")


class DenseOutputError(ValueError):
    """A target defined for ``(B, classes)`` outputs only (``None``: the predicted class) met a
    dense output."""


def _tensor(value, what: str, device=None) -> torch.Tensor:
    if torch.is_tensor(value):
        return value if device is None else value.to(device)
    try:
        import numpy as np
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value).to(device)
    except ImportError:   # pragma: no cover - numpy ships with torch's wheels
        pass
    raise TypeError(f"{what} must be a torch.Tensor or NumPy array, got {type(value).__name__}")


def _is_mask(value) -> bool:
    """A tensor or array of at least 2 dims (a region), as opposed to class indices."""
    return (torch.is_tensor(value) or type(value).__module__ == "numpy") and getattr(value, "ndim", 0) >= 2


class SegmentationTarget:
    """Class ``category`` over the region ``mask`` of a dense ``(B, C, H, W)`` output.

    ``category``: an int class index, or one per sample (sequence / tensor of B).  ``mask``:
    ``(H, W)`` (the same region for every sample) or ``(B, H, W)``, boolean (the region) or
    float (per-pixel weights, e.g. a soft region), a tensor or a NumPy array; an integer mask
    (a 0/255 PNG read as uint8) is the region of its non-zero pixels, as relprop.metrics
    reads one; None: the whole map.  The explained score of sample ``b`` is ``sum_hw output[b, category[b]] *
    mask[b]``, the output weights are ``mask`` on the target class and 0 elsewhere, and the
    LRP family starts from ``output * weights`` (as ``logits * onehot`` for a classifier).

    It is also a callable on the output, in pytorch-grad-cam's ``SemanticSegmentationTarget``
    style: called with one sample's ``(C, H, W)`` output it returns that sample's score, with
    ``(B, C, H, W)`` the ``(B,)`` scores.  The shapes are checked against the output when the
    target is used (a clear ``ValueError`` before any relevance is computed).
    """

    def __init__(self, category, mask=None):
        if isinstance(category, bool):
            raise TypeError(f"SegmentationTarget: category must be an int class index (or one per sample), got "
                            f"{category!r}")
        if isinstance(category, int):
            self.category = torch.tensor([category])
        else:
            try:
                c = torch.as_tensor(category)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"SegmentationTarget: category must be an int class index (or one per sample), "
                                f"got {type(category).__name__} {category!r}") from None
            if c.is_floating_point() or c.dtype == torch.bool or c.is_complex() or c.ndim > 1:
                raise TypeError(f"SegmentationTarget: category must be an int class index (or one per sample), "
                                f"got {category!r}")
            self.category = c.long().reshape(-1)
        if mask is not None:
            m = _tensor(mask, "SegmentationTarget: mask")
            if m.ndim not in (2, 3):
                raise ValueError(f"SegmentationTarget: mask must have shape (H, W) or (B, H, W), got "
                                 f"{tuple(m.shape)}")
            if m.is_complex():
                raise TypeError(f"SegmentationTarget: mask must be boolean or real, got {m.dtype}")
            if m.is_floating_point() and not torch.isfinite(m).all():
                raise ValueError("SegmentationTarget: mask contains NaN or Inf")
            if not (m.is_floating_point() or m.dtype == torch.bool):
                m = m != 0     # not weights of 255
            mask = m
        self.mask = mask

    def __repr__(self) -> str:
        mask = "None" if self.mask is None else f"<mask {tuple(self.mask.shape)}>"
        c = self.category.tolist()
        return f"SegmentationTarget({c[0] if len(c) == 1 else c}, {mask})"

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        """The ``(B, C, H, W)`` output weights for ``output`` (B, C, H, W); ValueError on a
        class out of range or a mask that does not fit the output."""
        if output.ndim != 4:
            raise ValueError(f"SegmentationTarget needs a (B, C, H, W) output, got shape {tuple(output.shape)}")
        b, classes, h, w = output.shape
        c = self.category.to(output.device)
        if c.numel() == 1:
            c = c.expand(b)
        if c.numel() != b:
            raise ValueError(f"got {c.numel()} target classes for a batch of {b}")
        out = (c < 0) | (c >= classes)
        if out.any():
            raise ValueError(f"target class {c[out][0].item()} out of range for an output with {classes} classes")
        if self.mask is None:
            region = output.new_ones(b, 1, h, w)
        else:
            m = self.mask.to(device=output.device, dtype=output.dtype)
            if tuple(m.shape[-2:]) != (h, w) or (m.ndim == 3 and m.shape[0] not in (1, b)):
                raise ValueError(f"target mask of shape {tuple(self.mask.shape)} does not fit the output of shape "
                                 f"{tuple(output.shape)}: give (H, W) = ({h}, {w}) or (B, H, W) = ({b}, {h}, {w})")
            region = m.reshape(-1, 1, h, w).expand(b, 1, h, w)
        onehot = torch.nn.functional.one_hot(c, classes).to(output.dtype)[:, :, None, None]
        return onehot * region

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.ndim == 3:            # one sample, pytorch-grad-cam style
            return (output * self.weights(output[None])[0]).sum()
        return (output * self.weights(output)).flatten(1).sum(1)


def _dense_weights(target, output: torch.Tensor) -> torch.Tensor:
    """The output weights ``W`` (output's shape) of a non-callable dense target."""
    b, classes = output.shape[:2]
    if target is None:
        raise DenseOutputError(f"the model's output has shape {tuple(output.shape)}, a dense (per-position) map, "
                               f"not (B, classes) scores: target=None (the predicted class) is defined for "
                               f"classifiers only; {_DENSE_KINDS}")
    if isinstance(target, SegmentationTarget):
        return target.weights(output)
    if (isinstance(target, tuple) and len(target) == 2 and (_is_mask(target[1]) or target[1] is None)
            and not _is_mask(target[0])):   # (category, mask), mask None: the whole map
        return SegmentationTarget(*target).weights(output)
    if _is_mask(target):
        m = _tensor(target, "target")
        if m.is_complex() or not (m.is_floating_point() or m.dtype == torch.bool):
            raise TypeError(f"a mask target must be boolean or float, got {m.dtype} (integer tensors are class "
                            "indices)")
        if m.ndim != output.ndim or m.shape[1:] != output.shape[1:] or m.shape[0] not in (1, b):
            raise ValueError(f"a mask target must have the output's shape {tuple(output.shape)} (or a batch of 1), "
                             f"got {tuple(m.shape)}; for a region of one class give (category, mask) with an "
                             f"(H, W) or (B, H, W) mask")
        m = m.to(device=output.device, dtype=output.dtype).expand_as(output)
        if not torch.isfinite(m).all():
            raise ValueError("a mask target contains NaN or Inf")
        return m
    t = as_targets(target, b, output.device)   # class indices: each over the whole map
    out = (t < 0) | (t >= classes)
    if out.any():
        raise ValueError(f"target class {t[out][0].item()} out of range for an output with {classes} classes")
    return SegmentationTarget(t).weights(output)


def _dense_scores(target, output: torch.Tensor) -> torch.Tensor:
    """A callable dense target's (B,) scores: called with the output, or item ``b`` with
    sample ``b``'s ``(C, H, W)`` output."""
    n = output.shape[0]
    if isinstance(target, (list, tuple)):
        s = torch.stack([torch.as_tensor(t(output[j])).reshape(()) for j, t in enumerate(target)])
    else:
        s = target(output)
    if not torch.is_tensor(s):
        raise TypeError(f"a callable target must return a tensor of scores, got {type(s).__name__}")
    s = s.reshape(-1) if s.numel() == n else s
    if tuple(s.shape) != (n,):
        raise ValueError(f"a callable target must return one score per sample, shape ({n},); got {tuple(s.shape)}")
    return s


def resolve_dense(target, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(classes (B,), weights (output's shape), one_class)`` for a dense output ``(B, C,
    ...)``: the output weights of the target (module docstring), the class carrying most of
    each sample's weight, and whether every sample's weights lie on that one class."""
    if output.ndim < 3 or output.shape[1] == 0:
        raise ValueError(f"a dense output must be (B, C, H, W), got shape {tuple(output.shape)}")
    if is_callable_target(target) and not isinstance(target, SegmentationTarget):
        w = _linearise(target, output, lambda z: _dense_scores(target, z)).to(output.dtype)
    else:
        w = _dense_weights(target, output)
    per_class = w.abs().flatten(2).sum(2)                       # (B, C)
    empty = (per_class == 0).all(dim=1)
    if empty.any():
        raise ValueError(f"the target selects nothing in sample(s) {empty.nonzero()[:, 0].tolist()[:10]} "
                         "(an empty mask or all-zero weights)")
    one_class = bool(((per_class != 0).sum(dim=1) == 1).all())
    return per_class.argmax(dim=1), w, one_class
