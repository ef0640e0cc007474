"""Region perturbation and AOPC (Samek et al., IEEE TNNLS 2017, "Evaluating the visualization
of what a deep neural network has learned"), batched: all perturbed images of all steps are
scored in a few large model calls."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import targets as T
from .arrays import as_tensor, check_finite

__all__ = ["region_perturbation"]

_ORDERS = ("morf", "lerf", "random")
_REPLACE = ("random", "mean", "blur")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (kernel radius ceil(3 sigma), replicate padding), per channel."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def region_perturbation(model: torch.nn.Module, x: torch.Tensor, heatmaps: torch.Tensor, target=None,
                        patch: int = 8, steps: int = 20, order: str = "morf", replace: str = "random",
                        generator: torch.Generator | None = None, batch_size: int | None = None,
                        blur_sigma: float | None = None) -> dict:
    """Region perturbation curve and AOPC (Samek et al., IEEE TNNLS 2017; used by RAP).

    Regions are the non-overlapping ``patch x patch`` cells of a regular grid anchored at
    the top-left pixel (``ceil(H/patch) x ceil(W/patch)`` cells; cells at the bottom/right
    border are cut off by the image edge).  A cell's relevance is the sum of the heat map
    over its pixels.  ``order``: ``"morf"`` most relevant first, ``"lerf"`` least relevant
    first (both stable: equal sums keep row-major cell order), ``"random"`` a uniform random
    permutation per image.  The image after step ``k`` (``k = 0..steps``) has its first
    ``k`` cells of that order replaced (cumulatively; ``x^0 = x``) by the same pixels of a
    per-image replacement image drawn once:

    * ``"random"``: i.i.d. uniform noise in ``[min x_b, max x_b]``, the image's own value
      range over all channels and pixels (Samek et al.);
    * ``"mean"``: the image's per-channel mean;
    * ``"blur"``: the image convolved with a Gaussian (std ``blur_sigma``, default
      ``patch / 2``; kernel radius ``ceil(3 sigma)``; replicate padding).

    Scores are the target logits ``f(x^k)[target]`` (``target``: int, ``(B,)`` indices, or
    None = the class predicted for ``x``, one extra model call), or for a callable target
    (:mod:`relprop.targets`) its scores of ``f(x^k)``: a single callable is applied to
    batches of perturbed images of several samples (it must score every row alike, as
    ``ClassifierOutputTarget``), a list of per-sample callables to each sample's images.
    ``heatmaps`` may be a tensor or a NumPy array.  Returns a dict with
    ``scores`` ``(B, steps + 1)`` (column 0 = unperturbed), ``drop`` = ``f(x^0) - f(x^k)``
    ``(B, steps + 1)``, ``aopc`` = ``1/(steps+1) sum_{k=0}^{steps} drop_k`` ``(B,)``
    (Samek et al.'s AOPC for one image; average over images for the data-set value; for
    MoRF higher is better) and ``ranking`` ``(B, cells)``, cell indices (row-major) in
    perturbation order.

    All ``B * (steps + 1)`` images are built and scored in ``ceil(B * (steps + 1) /
    batch_size)`` model calls (one call when ``batch_size`` is None).  The model is run in
    eval mode under ``torch.no_grad()``; the training flags of its modules are restored
    afterwards.  Random choices come from ``generator`` (on ``x``'s device; None: torch's
    default generator), so a seeded generator makes the result deterministic.
    """
    if not torch.is_tensor(x) or x.ndim != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {tuple(x.shape) if torch.is_tensor(x) else x!r}")
    b, c, h, w = x.shape
    heatmaps = as_tensor(heatmaps)
    if not torch.is_tensor(heatmaps) or tuple(heatmaps.shape) != (b, h, w):
        raise ValueError(f"heat maps must have shape {(b, h, w)}, got "
                         f"{tuple(heatmaps.shape) if torch.is_tensor(heatmaps) else heatmaps!r}")
    check_finite(heatmaps)
    if order not in _ORDERS:
        raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
    if replace not in _REPLACE:
        raise ValueError(f"replace must be one of {_REPLACE}, got {replace!r}")
    patch = int(patch)
    if patch < 1:
        raise ValueError(f"patch must be >= 1, got {patch}")
    nh, nw = -(-h // patch), -(-w // patch)
    cells = nh * nw
    if not 0 <= int(steps) <= cells:
        raise ValueError(f"steps must lie in [0, {cells}] (the number of {patch}x{patch} cells), got {steps}")
    steps = int(steps)
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = x.device

    # ranking of the cells
    hm = heatmaps.to(dev, torch.float64 if heatmaps.dtype == torch.float64 else torch.float32)
    hm = F.pad(hm, (0, nw * patch - w, 0, nh * patch - h))
    cell_rel = hm.reshape(b, nh, patch, nw, patch).sum(dim=(2, 4)).reshape(b, cells)
    if order == "random":
        ranking = torch.rand(b, cells, generator=generator, device=dev).argsort(dim=1)
    else:
        ranking = cell_rel.sort(dim=1, descending=order == "morf", stable=True).indices
    rank = torch.empty_like(ranking).scatter_(1, ranking, torch.arange(cells, device=dev).expand(b, cells))

    # replacement image
    if replace == "random":
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        r = lo + (hi - lo) * torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype)
    elif replace == "mean":
        r = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        r = _gaussian_blur(x, float(blur_sigma) if blur_sigma is not None else patch / 2)

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if target is None:
                t = model(x).argmax(dim=1)
            elif T.is_callable_target(target):
                if isinstance(target, (list, tuple)) and len(target) != b:
                    raise ValueError(f"got {len(target)} target callables for a batch of {b}")
                t = target
            else:
                t = T.as_targets(target, b, dev)
            total = b * (steps + 1)
            chunk = total if batch_size is None else int(batch_size)
            scores = []
            for start in range(0, total, chunk):
                j = torch.arange(start, min(start + chunk, total), device=dev)
                img, k = j // (steps + 1), j % (steps + 1)
                m = rank[img] < k[:, None]                                   # (n, cells)
                m = m.reshape(-1, nh, nw).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
                m = m[:, None, :h, :w]
                out = model(torch.where(m, r[img], x[img]))
                if out.ndim != 2:
                    raise ValueError(f"the model must output (B, classes) scores, got shape {tuple(out.shape)}")
                scores.append(T.scores(t, out, img))
    finally:
        for mod, flag in flags:
            mod.training = flag
    scores = torch.cat(scores).reshape(b, steps + 1)
    drop = scores[:, :1] - scores
    return {"scores": scores, "drop": drop, "aopc": drop.mean(dim=1), "ranking": ranking}
