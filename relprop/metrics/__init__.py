"""Evaluation metrics of the RAP / RSP / AE / CLRP papers, batched and pure torch.

Not imported by ``import relprop``; import it explicitly::

    from relprop import metrics
    hits = metrics.pointing_game(heatmaps, masks)

Conventions shared by every function:

* heat maps are signed ``(B, H, W)`` tensors or NumPy arrays from any attribution method
  (``Explainer.heatmap``, Captum, Zennit, ...); relevance inputs ``(B, C, H, W)`` are not
  accepted (sum over channels first, or take :func:`max_abs_channels`, TorchRay's reduction
  for gradient maps); :func:`pointing_game` upsamples a map smaller than its ground truth;
* a metric that must explain again (``cascading_randomization``) takes a callable
  ``explain(model, x, targets) -> (B, H, W)``; ``relprop.evaluate.explain_function(method,
  **params)`` binds a relprop method; metrics never import the explainer;
* targets follow :mod:`relprop.targets` (class indices or callables on the model output);
* ground truth is a ``(B, H, W)`` bool mask, or boxes: a ``(B, 4)`` tensor with one box
  per image, or a length-B list whose items are ``(4,)`` / ``(n_i, 4)`` tensors or lists
  (several boxes per image: their union).  Boxes are ``(x0, y0, x1, y1)`` in pixel
  indices, ``x`` = column, ``y`` = row, inclusive-exclusive: pixel ``(row, col)`` is
  inside iff ``y0 <= row < y1`` and ``x0 <= col < x1`` (PASCAL VOC's 1-based inclusive
  ``(xmin, ymin, xmax, ymax)`` is ``(xmin - 1, ymin - 1, xmax, ymax)``);
  :func:`boxes_to_masks` does the conversion;
* results are tensors on the device of the inputs (per image: shape ``(B,)``), except
  the dataset-level summaries (``pointing_game_accuracy``), which also give floats.
"""
from .localisation import (binarize, boxes_to_masks, max_abs_channels, outside_inside_ratio, pointing_game,
                           pointing_game_accuracy, relevance_mass_accuracy, segmentation_scores, torchray_tolerance)
from .bootstrap import bootstrap_interval
from .perturbation import region_perturbation
from .sensitivity import cascading_randomization, spearman, ssim

__all__ = ["boxes_to_masks", "pointing_game", "pointing_game_accuracy", "torchray_tolerance", "max_abs_channels",
           "outside_inside_ratio",
           "relevance_mass_accuracy", "binarize", "segmentation_scores", "region_perturbation",
           "cascading_randomization", "spearman", "ssim", "bootstrap_interval"]
