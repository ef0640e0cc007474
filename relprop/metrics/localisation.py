"""Localisation metrics: pointing game, outside-inside relevance ratio, relevance mass
accuracy and segmentation scores (IoU, pixel accuracy, average precision).

Every function takes signed heat maps ``(B, H, W)`` at image resolution (tensors or NumPy
arrays, from any attribution method) and ground truth as ``(B, H, W)`` bool masks or as
boxes (see :func:`boxes_to_masks`), and returns one value per image as a tensor on the
heat maps' device (no per-image Python loop).
"""
from __future__ import annotations

import math
import numbers

import torch

from .arrays import as_tensor, check_finite

__all__ = ["boxes_to_masks", "pointing_game", "pointing_game_accuracy", "torchray_tolerance", "max_abs_channels",
           "outside_inside_ratio", "relevance_mass_accuracy", "binarize", "segmentation_scores"]


# --------------------------------------------------------------------------- ground truth

def boxes_to_masks(boxes, H: int, W: int, device=None) -> torch.Tensor:
    """Boxes -> ``(B, H, W)`` bool masks (the union of each image's boxes).

    ``boxes`` is a ``(B, 4)`` tensor (one box per image) or a length-B list/tuple whose
    item ``i`` is a ``(4,)`` or ``(n_i, 4)`` tensor / nested list (``n_i`` may be 0: empty
    mask).  A box is ``(x0, y0, x1, y1)`` with ``x`` = column and ``y`` = row,
    **inclusive-exclusive**: pixel ``(row, col)`` belongs to the box iff
    ``y0 <= row < y1`` and ``x0 <= col < x1``; coordinates outside the image are clipped
    implicitly, fractional coordinates compare as such.  PASCAL VOC's 1-based inclusive
    ``(xmin, ymin, xmax, ymax)`` is ``(xmin - 1, ymin - 1, xmax, ymax)`` here.
    ``device`` defaults to the boxes' device (CPU for lists of plain numbers).
    """
    if torch.is_tensor(boxes):
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
        b = boxes.shape[0]
        dev = boxes.device if device is None else torch.device(device)
        flat = boxes.to(dev)
        image = torch.arange(b, device=dev)
    elif isinstance(boxes, (list, tuple)):
        b = len(boxes)
        items = [torch.as_tensor(bx) for bx in boxes]
        dev = (next((t.device for t in items), torch.device("cpu")) if device is None
               else torch.device(device))
        items = [t.to(dev, torch.float64).reshape(-1, 4) if t.numel() else
                 torch.zeros(0, 4, dtype=torch.float64, device=dev) for t in items]
        flat = torch.cat(items) if items else torch.zeros(0, 4, dtype=torch.float64, device=dev)
        image = torch.repeat_interleave(torch.arange(b, device=dev),
                                        torch.tensor([len(t) for t in items], device=dev, dtype=torch.long))
    else:
        raise TypeError(f"boxes must be a (B, 4) tensor or a per-image list, got {type(boxes).__name__}")
    rows = torch.arange(H, device=dev)
    cols = torch.arange(W, device=dev)
    x0, y0, x1, y1 = (flat[:, i, None] for i in range(4))
    in_rows = (rows >= y0) & (rows < y1)                    # (N, H)
    in_cols = (cols >= x0) & (cols < x1)                    # (N, W)
    inside = (in_rows[:, :, None] & in_cols[:, None, :]).reshape(len(flat), -1)
    union = torch.zeros(b, H * W, dtype=torch.int32, device=dev)
    union.index_add_(0, image, inside.to(torch.int32))
    return (union > 0).reshape(b, H, W)


def _masks(gt, heatmaps: torch.Tensor) -> torch.Tensor:
    """Ground truth (bool/integer masks or boxes) -> (B, H, W) bool on the maps' device."""
    b, h, w = heatmaps.shape
    gt = as_tensor(gt)
    if torch.is_tensor(gt) and gt.ndim == 3:
        if gt.is_floating_point() or gt.is_complex():
            raise TypeError(f"masks must be bool (or integer 0/1), got {gt.dtype}")
        if tuple(gt.shape) != (b, h, w):
            raise ValueError(f"masks have shape {tuple(gt.shape)}, heat maps {(b, h, w)}")
        return gt.to(heatmaps.device) != 0
    masks = boxes_to_masks(gt, h, w, device=heatmaps.device)
    if masks.shape[0] != b:
        raise ValueError(f"got boxes for {masks.shape[0]} images, heat maps for {b}")
    return masks


def _check_maps(heatmaps: torch.Tensor) -> torch.Tensor:
    heatmaps = as_tensor(heatmaps)
    if not torch.is_tensor(heatmaps) or heatmaps.ndim != 3:
        raise ValueError("heat maps must be a (B, H, W) tensor (sum relevance over channels first), got "
                         f"{tuple(heatmaps.shape) if torch.is_tensor(heatmaps) else type(heatmaps).__name__}")
    if heatmaps.shape[0] == 0:
        raise ValueError(f"empty batch: heat maps have shape {tuple(heatmaps.shape)}")
    if not heatmaps.is_floating_point():
        heatmaps = heatmaps.float()
    return check_finite(heatmaps)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- pointing game

#: TorchRay's pointing-game tolerance (``PointingGame(tolerance=15)``) and the input size
#: (shorter side) of its VOC / COCO models; :func:`torchray_tolerance` scales one by the other.
TORCHRAY_TOLERANCE, TORCHRAY_SIZE = 15, 224


def torchray_tolerance(height: int, width: int | None = None) -> float:
    """TorchRay's 15 px at 224 px, scaled to an image of ``height`` x ``width`` (default
    square): ``15 * min(height, width) / 224`` pixels (the shorter side, which TorchRay's
    transform resizes to 224).  4.29 px for the built-in 64 x 64 images."""
    width = height if width is None else width
    if min(height, width) < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    return TORCHRAY_TOLERANCE * min(height, width) / TORCHRAY_SIZE


def max_abs_channels(relevance) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H, W)``: the largest absolute value over the channels.

    TorchRay's saliency of the gradient baselines (``gradient_to_saliency``:
    ``max_c |dx_c|``), used by its pointing game for ``gradient`` (and here for
    ``gradient-x-input``); relevance methods use the signed channel sum instead.
    """
    relevance = as_tensor(relevance)
    if not torch.is_tensor(relevance) or relevance.ndim != 4:
        raise ValueError("max_abs_channels takes a (B, C, H, W) tensor, got "
                         f"{tuple(relevance.shape) if torch.is_tensor(relevance) else type(relevance).__name__}")
    return relevance.abs().amax(dim=1)


def pointing_game(heatmaps: torch.Tensor, masks, tolerance: float = TORCHRAY_TOLERANCE,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    """Pointing game (Zhang et al., ECCV 2016, "Top-down neural attention by excitation
    backprop"; protocol of TorchRay ``torchray/benchmark/pointing_game.py`` and
    ``examples/attribution_benchmark.py``): ``(B,)`` bool.

    1. **Upsampling before the arg-max**: a map whose size differs from the ground truth's
       (``masks`` ``(B, H, W)``, or ``size=(H, W)`` for boxes; default: the map's size) is
       first resized to it bilinearly with ``align_corners=False`` (TorchRay's
       ``resize_saliency``).
    2. The point of an image is the arg-max pixel ``(r*, c*)`` of its map; **ties go to
       the first maximum in row-major order** (``torch.argmax``, as TorchRay's
       ``_saliency_to_point``).
    3. It is a *hit* iff some ground-truth pixel ``(r, c)`` satisfies ``(r - r*)**2 +
       (c - c*)**2 < tolerance**2`` (TorchRay's strict inequality: 14 px away is a hit,
       15 px a miss for the default 15), or the point itself is in the mask (which only
       matters for ``tolerance=0``, where TorchRay's acceptance disc is empty).  This is
       the mask dilated by an open disc of radius ``tolerance``, tested at the point: one
       batched distance check instead of a dilation.  An empty mask is a miss.

    ``tolerance`` is in pixels of the ground truth; TorchRay's 15 px at 224 scaled to
    another image size is :func:`torchray_tolerance`.  Per-class accuracy and its mean
    over classes: :func:`pointing_game_accuracy`.  Channel reduction (signed sum, or
    :func:`max_abs_channels` for the gradient baselines) is the caller's.
    """
    heatmaps = _check_maps(heatmaps)
    number = isinstance(tolerance, numbers.Real) or (torch.is_tensor(tolerance) and tolerance.numel() == 1)
    if isinstance(tolerance, bool) or not number or not 0 <= float(tolerance) < math.inf:
        raise ValueError(f"tolerance must be a number of pixels >= 0, got {tolerance!r}")
    gt = as_tensor(masks)
    if size is not None and not (torch.is_tensor(gt) and gt.ndim == 3):
        h, w = (int(v) for v in size)
    elif torch.is_tensor(gt) and gt.ndim == 3:
        h, w = gt.shape[-2:]
        if size is not None and tuple(int(v) for v in size) != (h, w):
            raise ValueError(f"size={tuple(size)} disagrees with the masks' {(h, w)}")
    else:
        h, w = heatmaps.shape[-2:]
    if (h, w) != tuple(heatmaps.shape[-2:]):
        if h < 1 or w < 1:
            raise ValueError(f"size must be positive, got {(h, w)}")
        work = heatmaps if heatmaps.dtype in (torch.float32, torch.float64) else heatmaps.float()
        heatmaps = torch.nn.functional.interpolate(work[:, None], size=(h, w), mode="bilinear",
                                                   align_corners=False)[:, 0]
    masks = _masks(gt, heatmaps)
    b = heatmaps.shape[0]
    flat = heatmaps.reshape(b, -1).argmax(dim=1)
    r, c = (flat // w)[:, None, None], (flat % w)[:, None, None]
    rows = torch.arange(h, device=heatmaps.device)[None, :, None]
    cols = torch.arange(w, device=heatmaps.device)[None, None, :]
    d2 = (rows - r) ** 2 + (cols - c) ** 2                       # (B, H, W) integer
    accept = (d2.to(torch.float64) < float(tolerance) ** 2) | (d2 == 0)
    return (masks & accept).reshape(b, -1).any(dim=1)


def pointing_game_accuracy(hits: torch.Tensor, classes: torch.Tensor, num_classes: int) -> dict:
    """Pointing-game accuracies from per-(image, class) ``hits`` and their ``classes``.

    ``hits`` and ``classes`` are ``(N,)`` (one entry per image and ground-truth class, as
    in TorchRay; concatenate batches first).  Returns ``per_class`` = hits / (hits +
    misses) per class, a ``(num_classes,)`` tensor with NaN for classes that never occur;
    ``mean`` = the mean of ``per_class`` over the classes that occur (the number reported
    by Zhang et al. and TorchRay: per-class hit rate first, then the mean over classes, so
    a frequent class does not dominate; TorchRay's ``accuracy`` averages over all
    ``num_classes``, an absent class counting 0, which is the same when every class occurs,
    as on VOC / COCO and the built-in splits); ``overall`` = hits / N over all entries (floats; NaN when
    N = 0).
    """
    hits = torch.as_tensor(hits).reshape(-1)
    if hits.dtype != torch.bool and hits.numel() and not bool(((hits == 0) | (hits == 1)).all()):
        raise ValueError("hits must be bool (or 0/1): one per image and class, hit or miss")
    classes = torch.as_tensor(classes, device=hits.device).reshape(-1).long()
    if hits.shape != classes.shape:
        raise ValueError(f"{hits.numel()} hits but {classes.numel()} classes")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes})")
    dt = torch.float64
    total = torch.zeros(num_classes, dtype=dt, device=hits.device).index_add_(
        0, classes, torch.ones_like(classes, dtype=dt))
    hit = torch.zeros(num_classes, dtype=dt, device=hits.device).index_add_(0, classes, hits.to(dt))
    per_class = torch.where(total > 0, hit / total.clamp(min=1), torch.full_like(total, math.nan))
    present = total > 0
    mean = per_class[present].mean().item() if bool(present.any()) else math.nan
    overall = hits.to(dt).mean().item() if hits.numel() else math.nan
    return {"per_class": per_class, "mean": mean, "overall": overall}


# --------------------------------------------------------------------------- relevance in the mask

def outside_inside_ratio(heatmaps: torch.Tensor, masks) -> torch.Tensor:
    """Outside-inside relevance ratio (Lapuschkin et al., CVPR 2016, "Analyzing classifiers:
    Fisher vectors and deep neural networks"; used by RAP): ``(B,)``, lower is better.

    ``mu = mean_{p outside} R+(p) / mean_{p inside} R+(p)`` with ``R+ = max(R, 0)`` (only
    positive relevance, as RAP maps are signed) and the means taken over *all* pixels of
    the region (non-positive pixels count as 0).  Edge cases: inside mean 0 (no positive
    relevance on the object, including an all-non-positive map) -> ``+inf``; a mask with no
    inside or no outside pixel -> NaN (undefined).
    """
    heatmaps = _check_maps(heatmaps)
    masks = _masks(masks, heatmaps)
    p = heatmaps.to(_work_dtype(heatmaps)).clamp(min=0).flatten(1)
    m = masks.flatten(1)
    n_in = m.sum(dim=1)
    n_out = m.shape[1] - n_in
    mean_in = torch.where(m, p, 0).sum(dim=1) / n_in
    mean_out = torch.where(m, 0, p).sum(dim=1) / n_out
    ratio = torch.where(mean_in == 0, math.inf, mean_out / mean_in)
    return torch.where((n_in == 0) | (n_out == 0), math.nan, ratio)


def relevance_mass_accuracy(heatmaps: torch.Tensor, masks) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al., Information Fusion 2022, "CLEVR-XAI: a
    benchmark dataset for the ground truth evaluation of neural network explanations"):
    ``(B,)`` in [0, 1], higher is better.

    ``RMA = sum_{p inside} R+(p) / sum_p R+(p)`` with ``R+ = max(R, 0)`` (positive relevance
    only, as in the paper).  A map without positive relevance puts no mass on the object:
    0.
    """
    heatmaps = _check_maps(heatmaps)
    masks = _masks(masks, heatmaps)
    p = heatmaps.to(_work_dtype(heatmaps)).clamp(min=0).flatten(1)
    inside = torch.where(masks.flatten(1), p, 0).sum(dim=1)
    total = p.sum(dim=1)
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1), 0)


# --------------------------------------------------------------------------- segmentation

def _quantile_rows(v: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-quantile with linear interpolation (= ``torch.quantile``'s default),
    by sorting (no size limit)."""
    s = v.sort(dim=1).values
    pos = q * (s.shape[1] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.shape[1] - 1)
    frac = pos - lo
    return s[:, lo] + frac * (s[:, hi] - s[:, lo])


def binarize(heatmaps: torch.Tensor, threshold: float = 0.0, quantile: float | None = None) -> torch.Tensor:
    """Foreground prediction ``(B, H, W)`` bool: pixels whose relevance is **strictly
    above** the threshold.

    The threshold is ``threshold`` (default 0: positive relevance is foreground, the
    default ``--thr`` of the RAP co-author's segmentation script), or, when ``quantile=q``
    is given (it overrides ``threshold``), each image's own ``q``-quantile of its map
    (linear interpolation as ``torch.quantile``), so about a fraction ``1 - q`` of the
    pixels is foreground (fewer with ties at the quantile).
    """
    heatmaps = _check_maps(heatmaps)
    if quantile is None:
        return heatmaps > threshold
    if not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    flat = heatmaps.flatten(1)
    thr = _quantile_rows(flat.to(_work_dtype(heatmaps)), float(quantile))
    return (flat > thr[:, None].to(flat.dtype)).reshape(heatmaps.shape)


def _average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row step-wise AP of ``labels`` (B, N) bool ranked by ``scores`` (B, N); tied
    scores form one group whose members all get the precision at the group's end."""
    b, n = scores.shape
    s, order = scores.sort(dim=1, descending=True)
    lab = labels.gather(1, order).to(_work_dtype(scores))
    tp = lab.cumsum(dim=1)
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    pos = torch.arange(n, device=s.device).expand(b, n)
    end = torch.where(is_end, pos, n).flip(1).cummin(dim=1).values.flip(1)
    precision = tp.gather(1, end) / (end + 1).to(tp.dtype)
    npos = lab.sum(dim=1)
    return torch.where(npos > 0, (lab * precision).sum(dim=1) / npos.clamp(min=1), math.nan)


def segmentation_scores(heatmaps: torch.Tensor, masks, threshold: float = 0.0,
                        quantile: float | None = None) -> dict:
    """Segmentation scores of heat maps against ground-truth masks (RAP, RSP; protocol of
    the RAP co-author's ImageNet-segmentation script, AGFVisualization
    ``imagenet_seg_eval.py``): a dict of ``(B,)`` tensors.

    * ``iou`` = |P & G| / |P | G| for the foreground prediction ``P = binarize(heatmaps,
      threshold, quantile)`` and the mask ``G`` (1 when both are empty);
      ``iou_background`` the same for ``~P`` and ``~G``; the script's mIoU is the mean of
      the two classes (there accumulated over the data set before dividing);
    * ``pixel_accuracy`` = fraction of pixels with ``P == G``;
    * ``average_precision`` from the *continuous* map (no threshold): pixels ranked by
      relevance, ``AP = (1/|G|) sum_{positives p} precision@rank(p)``; **tied scores are
      one group**: each positive of a group gets the precision at the end of the group
      (= scikit-learn's ``average_precision_score``).  NaN for an empty mask.  The
      script scores ``clamp(R, min=thr) / max R``, i.e. all pixels below ``thr`` tied:
      pass ``heatmaps.clamp(min=thr)`` to reproduce it.
    """
    heatmaps = _check_maps(heatmaps)
    masks = _masks(masks, heatmaps)
    dt = _work_dtype(heatmaps)
    pred = binarize(heatmaps, threshold, quantile).flatten(1)
    gt = masks.flatten(1)

    def iou(p, g):
        inter = (p & g).sum(dim=1).to(dt)
        union = (p | g).sum(dim=1).to(dt)
        return torch.where(union > 0, inter / union.clamp(min=1), 1.0)

    return {
        "iou": iou(pred, gt),
        "iou_background": iou(~pred, ~gt),
        "pixel_accuracy": (pred == gt).to(dt).mean(dim=1),
        "average_precision": _average_precision(heatmaps.flatten(1).to(dt), gt),
    }
