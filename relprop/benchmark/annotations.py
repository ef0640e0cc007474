"""Readers for user annotations: PASCAL VOC XML and COCO JSON, in relprop's conventions.

Boxes come out as ``(x0, y0, x1, y1)`` ints, ``x`` = column, **inclusive-exclusive**
(pixel ``(row, col)`` is inside iff ``y0 <= row < y1`` and ``x0 <= col < x1``), as in
:mod:`relprop.metrics`:

* VOC stores 1-based inclusive pixel indices ``(xmin, ymin, xmax, ymax)``; they become
  ``(xmin - 1, ymin - 1, xmax, ymax)`` (fractional values are rounded to the nearest int
  first);
* COCO stores continuous ``[x, y, w, h]`` (pixel ``col`` spans ``[col, col + 1)``); a pixel
  is in the box iff its centre is: ``x0 = ceil(x - 0.5)``, ``x1 = ceil(x + w - 0.5)``
  (same for y), widened to one pixel when that leaves it empty but ``w > 0``.

Clipping rule (both formats): a box reaching outside the image is clipped to
``0 <= x0, x1 <= W`` and ``0 <= y0, y1 <= H``; a box left empty by the clipping (wholly
outside the image), or with ``xmax < xmin`` / negative size, raises ``ValueError``
naming the file and object.  When the image size is unknown (VOC without ``<size>`` or
with a zero size) boxes are not clipped and ``size`` is ``None``.

COCO segmentation polygons are rasterised with Pillow (``ImageDraw.polygon``), which
treats the vertices as pixel indices (rounded) and fills the polygon *including its
outline*: a rectangle polygon with corners (2, 3) and (7, 8) covers columns 2..7 and rows
3..8, 36 pixels (its box is (2, 3, 7, 8), 25 pixels).  Uncompressed RLE masks
(``{"counts": [..], "size": [H, W]}``) are decoded; compressed (string) RLE gives
``mask=None``.
"""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image, ImageDraw


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    return path


def _clip_box(box, size, where: str) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{where}: box {tuple(box)} has x1 < x0 or y1 < y0")
    if size is not None:
        W, H = size
        x0, x1 = min(max(x0, 0), W), min(max(x1, 0), W)
        y0, y1 = min(max(y0, 0), H), min(max(y1, 0), H)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{where}: box {tuple(box)} lies outside the {W}x{H} image")
    return int(x0), int(y0), int(x1), int(y1)


# --------------------------------------------------------------------------- VOC
def read_voc(xml_path) -> dict:
    """A PASCAL VOC annotation file -> ``dict(filename, size=(W, H) or None, objects=[...])``.

    Each object is ``dict(name, box=(x0, y0, x1, y1), difficult=bool)`` with the box
    converted and clipped as described in the module docstring.
    """
    path = _check_file(xml_path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: malformed VOC XML: {e}") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: not a VOC annotation (root element <{root.tag}>, expected <annotation>)")

    def number(elem, tag, where):
        text = elem.findtext(tag)
        if text is None or not text.strip():
            raise ValueError(f"{where}: missing <{tag}>")
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where}: <{tag}> is not a number: {text.strip()!r}") from None

    size = None
    size_el = root.find("size")
    if size_el is not None:
        W, H = (int(number(size_el, t, f"{path} <size>")) for t in ("width", "height"))
        if W > 0 and H > 0:
            size = (W, H)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"{path} object {k} ({name or 'unnamed'})"
        if not name:
            raise ValueError(f"{where}: missing <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (round(number(bb, t, where)) for t in ("xmin", "ymin", "xmax", "ymax"))
        box = _clip_box((xmin - 1, ymin - 1, xmax, ymax), size, where)
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
        objects.append({"name": name, "box": box, "difficult": difficult})
    return {"filename": (root.findtext("filename") or "").strip(), "size": size, "objects": objects}


# --------------------------------------------------------------------------- COCO
def _coco_box(bbox, size, where):
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise ValueError(f"{where}: bbox {bbox!r} has a negative width or height")
    x0, y0 = math.ceil(x - 0.5), math.ceil(y - 0.5)
    x1, y1 = math.ceil(x + w - 0.5), math.ceil(y + h - 0.5)
    if w > 0 and x1 <= x0:
        x1 = x0 + 1
    if h > 0 and y1 <= y0:
        y1 = y0 + 1
    return _clip_box((x0, y0, x1, y1), size, where)


def _polygon_mask(polygons, H: int, W: int, where: str) -> torch.Tensor:
    img = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
            raise ValueError(f"{where}: a segmentation polygon must be a flat list [x1, y1, x2, y2, ...] "
                             f"of at least 3 points")
        draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1, outline=1)
    return torch.from_numpy(np.array(img, dtype=np.uint8) > 0)


def _rle_mask(rle, H: int, W: int, where: str):
    counts = rle.get("counts")
    if not isinstance(counts, list):
        return None                         # compressed RLE: not decoded
    flat = np.zeros(H * W, dtype=bool)
    pos, value = 0, False
    for c in counts:
        if value:
            flat[pos:pos + int(c)] = True
        pos += int(c)
        value = not value
    if pos != H * W:
        raise ValueError(f"{where}: RLE counts sum to {pos}, expected {H}*{W}")
    return torch.from_numpy(flat.reshape(W, H).T.copy())       # COCO RLE is column-major


def read_coco(json_path) -> dict:
    """A COCO instances file -> ``{image_id: dict(file_name, size=(W, H), objects=[...])}``.

    Each object is ``dict(name, category_id, box=(x0, y0, x1, y1), mask, iscrowd=bool)``:
    ``name`` is the category name, ``box`` converted and clipped as in the module
    docstring, ``mask`` an ``(H, W)`` bool tensor from the segmentation (polygons or
    uncompressed RLE) or ``None`` when the annotation has none.  Images without
    annotations are included with an empty object list.
    """
    path = _check_file(json_path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed COCO JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    try:
        categories = {c["id"]: c["name"] for c in data.get("categories", [])}
        images = {im["id"]: {"file_name": im.get("file_name", ""), "size": (int(im["width"]), int(im["height"])),
                             "objects": []} for im in data["images"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed 'images' or 'categories' entry: {e!r}") from None
    for k, ann in enumerate(data["annotations"]):
        where = f"{path} annotation {ann.get('id', k) if isinstance(ann, dict) else k}"
        if not isinstance(ann, dict) or "image_id" not in ann or "bbox" not in ann:
            raise ValueError(f"{where}: needs 'image_id' and 'bbox'")
        if ann["image_id"] not in images:
            raise ValueError(f"{where}: unknown image_id {ann['image_id']!r}")
        image = images[ann["image_id"]]
        W, H = image["size"]
        cat = ann.get("category_id")
        if cat not in categories:
            raise ValueError(f"{where}: unknown category_id {cat!r}")
        seg = ann.get("segmentation")
        if isinstance(seg, list) and seg:
            mask = _polygon_mask(seg, H, W, where)
        elif isinstance(seg, dict):
            mask = _rle_mask(seg, H, W, where)
        else:
            mask = None
        image["objects"].append({"name": categories[cat], "category_id": cat,
                                 "box": _coco_box(ann["bbox"], (W, H), where), "mask": mask,
                                 "iscrowd": bool(ann.get("iscrowd", 0))})
    return images


# --------------------------------------------------------------------------- masks
def objects_to_masks(objects, H: int, W: int, use_masks: bool = True) -> torch.Tensor:
    """Objects from :func:`read_voc` / :func:`read_coco` -> ``(n_obj, H, W)`` bool masks.

    An object's mask is its ``mask`` entry when present (and ``use_masks``), else its box
    filled (inclusive-exclusive, clipped to the image).  A mask of another shape than
    ``(H, W)`` raises ``ValueError``.
    """
    out = torch.zeros(len(objects), H, W, dtype=torch.bool)
    for k, obj in enumerate(objects):
        mask = obj.get("mask") if use_masks else None
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != (H, W):
                raise ValueError(f"object {k} ({obj.get('name')}): mask shape {tuple(mask.shape)} != ({H}, {W})")
            out[k] = mask
        else:
            x0, y0, x1, y1 = (int(v) for v in obj["box"])
            out[k, max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return out
