"""User images with PASCAL VOC or COCO annotations, resized to a model's input for evaluation.

* :func:`voc_records` / :func:`coco_records` list the annotated images (read with
  :func:`~relprop.benchmark.annotations.read_voc` / ``read_coco``) and check, before any
  image is decoded, that every image file exists and every object's class is known.
* :func:`class_items` splits an image into one item per ground-truth class it shows (the
  pointing-game protocol of TorchRay: one entry per image and class).
* :func:`load_item` loads the image with Pillow, converts it to RGB and resizes it to
  ``size x size`` (bilinear, the aspect ratio is not kept, so no object is cropped away),
  normalises it with ``mean``/``std``, and returns the class's object mask and box mask at
  that size: both are rasterised at the original resolution (boxes inclusive-exclusive,
  COCO segmentations where present, else the box) and resized by nearest neighbour, so
  an output pixel is inside iff the source pixel nearest to its centre is.

VOC layout: ``ROOT/Annotations/*.xml`` with the images in ``ROOT/JPEGImages`` (or a folder
of ``.xml`` files; ``images_dir`` overrides where the images are).  A record is
``dict(path, objects)`` with ``objects`` as the readers return them plus ``label``, the
class index.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from .annotations import objects_to_masks, read_coco, read_voc

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _label(records: list, classes, source: str) -> list:
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted({o["name"] for r in records for o in r["objects"] if o["name"] not in lookup})
    if unknown:
        raise ValueError(f"{source}: object classes not among the model's classes: {', '.join(unknown)} "
                         f"(classes: {', '.join(classes)})")
    missing = [r["path"] for r in records if not os.path.isfile(r["path"])]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{source}: image file(s) not found: {', '.join(missing[:3])}{more}")
    for r in records:
        for o in r["objects"]:
            o["label"] = lookup[o["name"]]
    return records


def voc_records(root, images_dir=None, classes=VOC_CLASSES) -> list[dict]:
    """The annotated images of a VOC folder, sorted by annotation file name."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"VOC folder {root!r} does not exist or is not a folder")
    ann_dir = os.path.join(root, "Annotations") if os.path.isdir(os.path.join(root, "Annotations")) else root
    xmls = sorted(f for f in os.listdir(ann_dir) if f.lower().endswith(".xml"))
    if not xmls:
        raise ValueError(f"VOC folder {root!r}: no .xml annotation files in {ann_dir!r}")
    if images_dir is None:
        images_dir = os.path.join(root, "JPEGImages") if os.path.isdir(os.path.join(root, "JPEGImages")) else ann_dir
    records = []
    for name in xmls:
        ann = read_voc(os.path.join(ann_dir, name))
        filename = ann["filename"] or os.path.splitext(name)[0] + ".jpg"
        records.append({"path": os.path.join(images_dir, filename), "objects": ann["objects"]})
    return _label(records, classes, f"VOC folder {root!r}")


def coco_classes(json_path) -> tuple[str, ...]:
    """The category names of a COCO file in order of category id (the usual output order)."""
    with open(os.fspath(json_path), encoding="utf-8") as fh:
        cats = json.load(fh).get("categories", [])
    return tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))


def coco_records(json_path, images_dir, classes=None) -> list[dict]:
    """The annotated images of a COCO instances file, sorted by image id; ``classes``
    defaults to :func:`coco_classes`.  Images without annotations are left out."""
    images = read_coco(json_path)
    if not os.path.isdir(os.fspath(images_dir)):
        raise FileNotFoundError(f"images folder {os.fspath(images_dir)!r} does not exist or is not a folder")
    classes = coco_classes(json_path) if classes is None else classes
    records = [{"path": os.path.join(images_dir, im["file_name"]), "objects": im["objects"]}
               for _, im in sorted(images.items()) if im["objects"]]
    if not records:
        raise ValueError(f"COCO file {os.fspath(json_path)!r} has no annotated images")
    return _label(records, classes, f"COCO file {os.fspath(json_path)!r}")


def class_items(records: list) -> list[tuple[int, int]]:
    """``(record index, class)`` for every distinct class of every record."""
    return [(i, c) for i, r in enumerate(records) for c in sorted({o["label"] for o in r["objects"]})]


def _resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(masks[None].float(), size=(size, size), mode="nearest-exact")[0] > 0.5


def load_item(record: dict, label: int, size: int, mean, std) -> dict:
    """One (image, class) item: ``x`` (3, size, size) normalised, ``mask`` and ``box``
    (size, size) bool: the union of the class's object masks / boxes, resized.  ValueError
    for an unreadable image or a mask whose size is not the image's."""
    from PIL import Image

    try:
        with Image.open(record["path"]) as im:
            im = im.convert("RGB")
            W, H = im.size
            im = im.resize((size, size), Image.BILINEAR)
    except OSError as e:
        raise ValueError(f"cannot read image {record['path']!r}: {e}") from None
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    objects = [o for o in record["objects"] if o["label"] == label]
    mask = objects_to_masks(objects, H, W, use_masks=True).any(0)
    box = objects_to_masks(objects, H, W, use_masks=False).any(0)
    mask, box = _resize_masks(torch.stack([mask, box]), size)
    return {"x": x, "mask": mask, "box": box}
