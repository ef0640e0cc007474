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
"""
from __future__ import annotations

import torch

__all__ = ["as_targets", "is_callable_target", "resolve", "scores"]

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
    if isinstance(target, (list, tuple)) and len(target) != logits.shape[0]:
        raise ValueError(f"got {len(target)} target callables for a batch of {logits.shape[0]}")
    with torch.enable_grad():
        z = logits.detach().clone().requires_grad_(True)
        s = scores(target, z)
        if not s.requires_grad:
            raise ValueError("a callable target's scores must depend on the model output (they carry no gradient)")
        (w,) = torch.autograd.grad(s.sum(), z, allow_unused=True)
    if w is None:
        raise ValueError("a callable target's scores must depend on the model output (they carry no gradient)")
    if not torch.isfinite(w).all():
        raise ValueError("a callable target's gradient with respect to the model output contains NaN or Inf")
    zero = (w == 0).all(dim=1)
    if zero.any():
        raise ValueError(f"a callable target's scores do not depend on the output of sample(s) "
                         f"{zero.nonzero()[:, 0].tolist()[:10]} (zero gradient)")
    return w.detach()


def resolve(target, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(classes (B,), weights (B, classes), one_hot)``: the explained class per sample and
    the output weights that replace its one-hot vector (module docstring)."""
    _check_logits(logits)
    if is_callable_target(target):
        w = _callable_weights(target, logits).to(logits.dtype)
        classes = w.argmax(dim=1)
        one_hot = bool(((w == 0) | (w == 1)).all() and ((w == 1).sum(dim=1) == 1).all())
        return classes, w, one_hot
    t = class_targets(target, logits)
    return t, torch.nn.functional.one_hot(t, logits.shape[1]).to(logits.dtype), True
