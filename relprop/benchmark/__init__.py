"""Built-in localisation benchmark data for evaluating attribution methods offline.

Not imported by ``import relprop``; import it explicitly::

    from relprop.benchmark import ShapesDataset, collate
    data = ShapesDataset(1000, size=64, seed=0, split="test")
    batch = data.make_batch(range(32))      # images (32, 3, 64, 64), labels, masks, boxes

* :mod:`relprop.benchmark.shapes` -- a procedural "shapes in clutter" data set with exact
  per-object masks and boxes (single-object for classification, two-object for the
  contrastive case);
* :mod:`relprop.benchmark.annotations` -- readers for user annotations (PASCAL VOC XML,
  COCO JSON) converted to the box / mask conventions of :mod:`relprop.metrics`;
* :mod:`relprop.benchmark.userdata` -- annotated user images resized to a model's input,
  with their masks and boxes (``relprop evaluate --voc / --coco``);
* :mod:`relprop.benchmark.models` -- the built-in classifiers with their trained weights.

Only torch, numpy and Pillow are used.
"""
from . import models
from .annotations import objects_to_masks, read_coco, read_voc
from .shapes import CLASSES, MEAN, STD, ShapesDataset, collate, normalise, render_shape

__all__ = ["CLASSES", "MEAN", "STD", "ShapesDataset", "collate", "normalise", "render_shape",
           "read_voc", "read_coco", "objects_to_masks", "models"]
