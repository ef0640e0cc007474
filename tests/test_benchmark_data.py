"""relprop.benchmark: the procedural shapes data set and the VOC / COCO annotation readers."""
import ast
import json
import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from relprop.benchmark import (CLASSES, MEAN, STD, ShapesDataset, collate, normalise, objects_to_masks, read_coco,
                               read_voc, render_shape)

BENCH = pathlib.Path(__file__).resolve().parents[1] / "relprop" / "benchmark"


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert len(a[key]) == len(b[key]), key
            for x, y in zip(a[key], b[key]):
                assert torch.equal(x, y), key


def tight_box(mask):
    rows, cols = mask.nonzero(as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_data_different_seed_or_split_differs():
    a = ShapesDataset(16, seed=3).make_batch(range(16))
    b = ShapesDataset(16, seed=3).make_batch(range(16))
    assert_batches_equal(a, b)
    for other in (ShapesDataset(16, seed=4), ShapesDataset(16, seed=3, split="test")):
        c = other.make_batch(range(16))
        assert not torch.equal(a["images"], c["images"])
        assert not torch.equal(a["masks"], c["masks"])


def test_item_independent_of_access_order_and_batching():
    for multi in (False, True):
        data = ShapesDataset(24, seed=1, multi_object=multi)
        full = data.make_batch(range(24))
        reversed_items = [data[i] for i in reversed(range(24))][::-1]
        assert_batches_equal(collate(reversed_items), full)
        part = data.make_batch([21, 7, 2])
        for j, i in enumerate([21, 7, 2]):
            assert torch.equal(part["images"][j], full["images"][i])
            assert torch.equal(part["object_masks"][j], full["object_masks"][i])
            assert torch.equal(part["boxes"][j], full["boxes"][i])
        assert data[-1]["label"] == data[23]["label"]
        assert torch.equal(data[-1]["image"], full["images"][23])


def test_single_and_multi_object_streams_are_independent():
    single = ShapesDataset(8, seed=0, num_distractors=0).make_batch(range(8))
    multi = ShapesDataset(8, seed=0, multi_object=True, num_distractors=0).make_batch(range(8))
    background = ~(single["masks"] | torch.stack([m.any(0) for m in multi["object_masks"]]))
    diff = (single["images"] - multi["images"]).abs().mean(1)[background].mean()
    assert diff > 0.1                  # different backgrounds, not just different pixel noise


# --------------------------------------------------------------------------- ground truth
@pytest.mark.parametrize("multi", [False, True])
def test_masks_inside_boxes_and_boxes_tight(multi):
    data = ShapesDataset(60, size=64, seed=2, multi_object=multi)
    batch = data.make_batch(range(60))
    for masks, boxes in zip(batch["object_masks"], batch["boxes"]):
        assert boxes.dtype == torch.long and boxes.shape == (len(masks), 4)
        for mask, box in zip(masks, boxes):
            assert mask.sum() > 20
            x0, y0, x1, y1 = box.tolist()
            assert mask[y0:y1, x0:x1].sum() == mask.sum()          # the mask lies within its box
            assert box.tolist() == tight_box(mask)                    # and the box is the mask's bbox
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_every_class_generated_with_plausible_area():
    batch = ShapesDataset(200, size=64, seed=0).make_batch(range(200))
    labels, masks = batch["labels"], batch["masks"]
    assert set(labels.tolist()) == set(range(len(CLASSES)))
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    for c in range(len(CLASSES)):
        area = masks[labels == c].float().mean((1, 2)).mean().item()
        assert 0.04 < area < 0.3, (CLASSES[c], area)
    # the mask is where the object is painted: its pixels differ from the background colour
    assert torch.equal(batch["masks"], torch.stack([m[0] for m in batch["object_masks"]]))


def test_classes_have_distinct_shapes():
    _, sq = render_shape("square", 96, radius=36)
    _, disc = render_shape("disc", 96, radius=36)
    assert ((sq & disc).sum() / (sq | disc).sum()) < 0.95
    # every pair differs in shape: IoU < 0.95 at the same centre, whatever the rotation and scale of the second
    masks = {c: render_shape(c, 96, radius=36)[1].flatten() for c in CLASSES}
    variants = {c: torch.stack([render_shape(c, 96, radius=36 * s, angle=math.radians(t))[1].flatten()
                                for t in range(0, 360, 15) for s in (0.85, 0.92, 1.0, 1.08, 1.15)]) for c in CLASSES}
    for a in CLASSES:
        for b in CLASSES:
            if a != b:
                inter = (masks[a] & variants[b]).sum(1)
                union = (masks[a] | variants[b]).sum(1)
                best = (inter / union).max().item()
                assert best < 0.95, (a, b, best)
    cov, mask = render_shape("star", 64)
    assert torch.equal(mask, cov >= 0.5) and ((cov > 0) & (cov < 1)).any()     # anti-aliased edge
    with pytest.raises(ValueError, match="unknown shape"):
        render_shape("pentagon")


def test_distractors_never_touch_objects():
    for multi in (False, True):
        data = ShapesDataset(80, seed=5, multi_object=multi, num_distractors=3)
        batch = data.make_batch(range(80))
        counts = [len(d) for d in batch["distractor_masks"]]
        assert max(counts) == 3 and sum(counts) > 150                 # almost always placed
        for objects, distractors in zip(batch["object_masks"], batch["distractor_masks"]):
            union = objects.any(0)
            for d in distractors:
                assert d.any()
                assert (d & union).sum() == 0                          # documented overlap fraction: 0
    none = ShapesDataset(10, num_distractors=0).make_batch(range(10))
    assert all(len(d) == 0 for d in none["distractor_masks"])


def test_masks_mark_the_painted_pixels():
    """Mask-edge pixels are at least half object (coverage >= 0.5); pixels just outside are mostly background."""
    data = ShapesDataset(40, seed=4, num_distractors=0)
    batch = data.make_batch(range(40))
    grow = lambda m: torch.nn.functional.max_pool2d(m.float()[:, None], 3, 1, 1)[:, 0] > 0  # noqa: E731
    masks = batch["masks"]
    interior = ~grow(~masks) & ~grow(grow(~masks))                 # eroded twice
    edge = masks & grow(~masks)
    outside = grow(masks) & ~masks
    ring = grow(grow(grow(masks))) & ~grow(grow(masks))             # 2-3 px outside
    closer_in, closer_out = [], []
    for x, i_, e, o, r in zip(batch["images"], interior, edge, outside, ring):
        obj = x[:, i_].median(1).values[:, None]
        bg = x[:, r].median(1).values[:, None]
        d = lambda px: ((px - obj).norm(dim=0) < (px - bg).norm(dim=0)).float().mean()  # noqa: E731
        closer_in.append(d(x[:, e]))
        closer_out.append(1 - d(x[:, o]))
    assert torch.stack(closer_in).mean() > 0.7
    assert torch.stack(closer_out).mean() > 0.7


def test_multi_object_images():
    data = ShapesDataset(50, seed=0, multi_object=True)
    for i in range(0, 50, 7):
        item = data[i]
        assert len(item["labels"]) == 2 and item["labels"][0] != item["labels"][1]
        assert item["label"] == item["labels"][0] == i % len(CLASSES)
        assert item["masks"].shape == (2, 64, 64) and item["boxes"].shape == (2, 4)
        assert not (item["masks"][0] & item["masks"][1]).any()
    batch = data.make_batch(range(50))
    assert all(len(set(l.tolist())) == 2 for l in batch["object_labels"])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_images_shapes_and_range(size):
    data = ShapesDataset(8, size=size, seed=0)
    item = data[3]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["masks"].shape == (1, size, size) and item["masks"].dtype == torch.bool
    assert isinstance(item["label"], int) and item["labels"] == [item["label"]]
    batch = data.make_batch(range(8))
    x = batch["images"]
    assert x.shape == (8, 3, size, size) and batch["labels"].shape == (8,) and batch["masks"].shape == (8, size, size)
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.05


def test_normalise_and_dataloader():
    data = ShapesDataset(8, seed=0)
    x = data.make_batch(range(8))["images"]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(normalise(x), (x - mean) / std)
    assert torch.allclose(normalise(x[0]), (x[0] - mean) / std)
    big = normalise(ShapesDataset(256, seed=0).make_batch(range(256))["images"])
    assert (big.mean((0, 2, 3)).abs() < 0.25).all() and ((big.std((0, 2, 3)) - 1).abs() < 0.1).all()
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate)
    first = next(iter(loader))
    assert torch.equal(first["images"], x[:4]) and len(first["boxes"]) == 4


def test_invalid_arguments():
    with pytest.raises(ValueError, match=re.escape("split must be one of ('train', 'test'), got 'val'")):
        ShapesDataset(4, split="val")
    with pytest.raises(ValueError, match=re.escape("size must be an int >= 16, got 8")):
        ShapesDataset(4, size=8)
    with pytest.raises(ValueError, match="num_distractors"):
        ShapesDataset(4, num_distractors=(3, 1))
    data = ShapesDataset(4)
    with pytest.raises(IndexError, match=re.escape("index out of range for a data set of 4 images")):
        data[4]
    with pytest.raises(IndexError, match=re.escape("index out of range for a data set of 4 images")):
        data.make_batch([0, 5])
    with pytest.raises(ValueError, match="collate"):
        collate([])


def test_benchmark_is_opt_in_and_light():
    code = "import sys, relprop; assert 'relprop.benchmark' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
    allowed = {"__future__", "hashlib", "math", "typing", "json", "os", "xml", "numpy", "torch", "PIL"}
    for path in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            assert {n.split(".")[0] for n in names} <= allowed, (path.name, names)


# --------------------------------------------------------------------------- VOC
VOC = """<annotation>
  <filename>cat.jpg</filename>
  <size><width>100</width><height>80</height><depth>3</depth></size>
  <object><name>cat</name><difficult>0</difficult>
    <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>40</xmax><ymax>60</ymax></bndbox></object>
  <object><name>dog</name><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>80</ymax></bndbox></object>
  <object><name>bird</name>
    <bndbox><xmin>90</xmin><ymin>-5</ymin><xmax>120</xmax><ymax>10.6</ymax></bndbox></object>
</annotation>"""


def test_read_voc(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(VOC)
    ann = read_voc(path)
    assert ann["filename"] == "cat.jpg" and ann["size"] == (100, 80)
    cat, dog, bird = ann["objects"]
    assert cat == {"name": "cat", "box": (10, 20, 40, 60), "difficult": False}   # 1-based inclusive -> 0-based excl.
    assert dog["box"] == (0, 0, 100, 80) and dog["difficult"] is True           # the whole image
    assert bird["box"] == (89, 0, 100, 11) and bird["difficult"] is False       # clipped; 10.6 rounds to 11
    masks = objects_to_masks(ann["objects"], 80, 100)
    assert masks.shape == (3, 80, 100)
    assert masks[0].sum() == 30 * 40 and masks[0, 20, 10] and not masks[0, 19, 10] and not masks[0, 20, 40]
    assert masks[1].all()


def test_read_voc_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_voc(tmp_path / "missing.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><object>")
    with pytest.raises(ValueError, match="malformed VOC XML"):
        read_voc(bad)
    bad.write_text("<root/>")
    with pytest.raises(ValueError, match="not a VOC annotation"):
        read_voc(bad)
    bad.write_text(VOC.replace("<xmax>40</xmax>", "<xmax>oops</xmax>"))
    with pytest.raises(ValueError, match="not a number"):
        read_voc(bad)
    bad.write_text(VOC.replace("<xmin>90</xmin>", "<xmin>150</xmin>").replace("<xmax>120</xmax>", "<xmax>160</xmax>"))
    with pytest.raises(ValueError, match="outside"):
        read_voc(bad)


# --------------------------------------------------------------------------- COCO
def coco_data():
    return {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 12, "height": 10},
                   {"id": 8, "file_name": "b.jpg", "width": 5, "height": 5}],
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1.4, 2.6, 3.2, 1.0], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [2.0, 3.0, 5.0, 5.0], "iscrowd": 0,
             "segmentation": [[2, 3, 7, 3, 7, 8, 2, 8]]},
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [10.0, 0.0, 5.0, 2.0], "iscrowd": 1,
             "segmentation": {"counts": [1, 2, 117], "size": [10, 12]}},
        ]}


def test_read_coco(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco_data()))
    images = read_coco(path)
    assert set(images) == {7, 8} and images[8]["objects"] == []
    im = images[7]
    assert im["file_name"] == "a.jpg" and im["size"] == (12, 10)
    plain, poly, crowd = im["objects"]
    # pixel-centre rule: x0 = ceil(1.4 - .5) = 1, x1 = ceil(4.6 - .5) = 5; y0 = ceil(2.1) = 3, y1 = ceil(3.1) = 4
    assert plain["name"] == "box" and plain["box"] == (1, 3, 5, 4) and plain["mask"] is None
    assert plain["iscrowd"] is False
    assert poly["name"] == "thing" and poly["box"] == (2, 3, 7, 8)
    # Pillow fills the rectangle polygon including its outline: columns 2..7, rows 3..8 -> 6 x 6
    assert poly["mask"].shape == (10, 12) and poly["mask"].sum() == 36
    assert poly["mask"][3:9, 2:8].all()
    assert crowd["iscrowd"] is True and crowd["box"] == (10, 0, 12, 2)             # clipped to the width
    # column-major RLE: pixel 0 off, pixels 1 and 2 on = (row 1, col 0) and (row 2, col 0)
    assert crowd["mask"].sum() == 2 and crowd["mask"][1, 0] and crowd["mask"][2, 0]
    masks = objects_to_masks(im["objects"], 10, 12)
    assert masks[0].sum() == 4 * 1 and masks[1].sum() == 36
    assert objects_to_masks(im["objects"], 10, 12, use_masks=False)[1].sum() == 25


def test_read_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_coco(tmp_path / "missing.json")
    path = tmp_path / "bad.json"
    path.write_text("{\"images\": [")
    with pytest.raises(ValueError, match="malformed COCO JSON"):
        read_coco(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        read_coco(path)
    data = coco_data()
    data["annotations"][0]["image_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown image_id"):
        read_coco(path)
    data = coco_data()
    data["annotations"][0]["bbox"] = [20, 20, 5, 5]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="outside"):
        read_coco(path)
    with pytest.raises(ValueError, match="mask shape"):
        objects_to_masks([{"name": "x", "box": (0, 0, 1, 1), "mask": torch.zeros(3, 3, dtype=torch.bool)}], 4, 4)


# --------------------------------------------------------------------------- hard mode
def test_hard_mode_is_deterministic_and_its_own_stream():
    """Same arguments, same hard images, whatever the batching or access order; the hard
    stream differs from the single-object one, and the normal streams are those of the
    single / multi kinds (hard=False changes nothing)."""
    data = ShapesDataset(8, seed=7, split="test", hard=True)
    full = data.make_batch(range(8))
    assert_batches_equal(full, ShapesDataset(8, seed=7, split="test", hard=True).make_batch(range(8)))
    assert_batches_equal(collate([data[i] for i in range(8)]), full)
    part = data.make_batch([5, 2])
    for j, i in enumerate([5, 2]):
        assert torch.equal(part["images"][j], full["images"][i])
        assert torch.equal(part["object_masks"][j], full["object_masks"][i])
        assert torch.equal(part["object_labels"][j], full["object_labels"][i])
    single = ShapesDataset(8, seed=7, split="test").make_batch(range(8))
    assert not torch.equal(single["images"], full["images"])
    assert_batches_equal(ShapesDataset(8, seed=7, split="test", hard=False).make_batch(range(8)), single)
    other = ShapesDataset(8, seed=8, split="test", hard=True).make_batch(range(8))
    assert not torch.equal(other["images"], full["images"])


def test_hard_mode_target_present_and_other_objects_of_other_classes():
    """Object 0 is the target, class index % 10, present (a non-empty mask); every image holds
    3-4 objects (HARD_OBJECTS) of pairwise distinct classes, all smaller than single objects,
    with exact tight boxes, non-overlapping masks and 4-8 drawn distractors that touch no
    object; labels / masks of the batch are the target's."""
    from relprop.benchmark import shapes

    n = 60
    batch = ShapesDataset(n, size=64, seed=0, split="test", hard=True).make_batch(range(n))
    counts = [len(lab) for lab in batch["object_labels"]]
    assert set(counts) == {3, 4} and shapes.HARD_OBJECTS == (3, 4)
    assert batch["labels"].tolist() == [i % len(CLASSES) for i in range(n)]
    single_area = ShapesDataset(n, size=64, seed=0, split="test").make_batch(range(n))["masks"].sum((1, 2))
    for i in range(n):
        labels, masks, boxes = batch["object_labels"][i], batch["object_masks"][i], batch["boxes"][i]
        assert labels[0] == i % len(CLASSES) and torch.equal(batch["masks"][i], masks[0])
        assert len(set(labels.tolist())) == len(labels)                  # others: other classes, distinct
        assert masks.shape == (len(labels), 64, 64) and boxes.shape == (len(labels), 4)
        assert (masks.sum(0) <= 1).all()                                  # no two objects share a pixel
        for mask, box in zip(masks, boxes):
            assert mask.sum() > 10                                        # present
            assert box.tolist() == tight_box(mask)
        for d in batch["distractor_masks"][i]:
            assert d.any() and not (d & masks.any(0)).any()
    target_area = batch["masks"].sum((1, 2)).float()
    assert target_area.mean() < 0.5 * single_area.float().mean()          # smaller objects
    assert sum(len(d) for d in batch["distractor_masks"]) > 4 * n          # more clutter than 0-3


def test_hard_mode_masks_are_exactly_the_rendered_shapes():
    """Each object's mask is exactly render_shape's mask (distance <= 0) for the object's
    drawn parameters, and its pixels carry the object's colour (up to noise): masks are
    exact, not estimated."""
    data = ShapesDataset(6, size=64, seed=3, split="test", hard=True)
    batch = data.make_batch(range(6))
    for i in range(6):
        objects = data._params(i)["objects"]
        assert [o["cls"] for o in objects] == batch["object_labels"][i].tolist()
        for o, mask in zip(objects, batch["object_masks"][i]):
            cov, want = render_shape(CLASSES[o["cls"]], 64, cx=o["cx"], cy=o["cy"], radius=o["r"], angle=o["angle"])
            assert torch.equal(mask, want)
            inner = cov[None] >= 1                                       # fully covered pixels
            colour = torch.tensor(o["colour"], dtype=torch.float32).view(3, 1, 1)
            err = (batch["images"][i] - colour).abs()[inner.expand(3, -1, -1)]
            assert err.mean() < 0.1                                      # only the (clamped) pixel noise


def test_hard_mode_invalid_arguments():
    with pytest.raises(ValueError, match=re.escape("hard=True already draws several objects per image; "
                                                   "multi_object must be False")):
        ShapesDataset(4, hard=True, multi_object=True)
    assert ShapesDataset(4, hard=True).num_distractors == (4, 8)
    assert ShapesDataset(4, hard=True, num_distractors=0).num_distractors == (0, 0)
    assert ShapesDataset(4).num_distractors == (0, 3)
