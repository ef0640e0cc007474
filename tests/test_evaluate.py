"""``relprop evaluate`` end to end, its report, its input checks, and the VOC / COCO adapters."""
import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from relprop import cli, evaluate
from relprop.benchmark import userdata

BOUNDED = ("pointing_game", "relevance_mass", "iou", "ap")          # each in [0, 1]
TINY_NET = '''
import torch.nn as nn

def build(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
'''


def _run(argv):
    return cli.main(["evaluate", *argv])


def _error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _run(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def _strict_json(path):
    def reject(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=reject)


def _check_rows(rows, methods):
    assert [r["method"] for r in rows] == methods
    for r in rows:
        for key in BOUNDED:
            assert 0.0 <= r[key] <= 1.0, (r["method"], key, r[key])
        assert r["outside_inside"] is None or r["outside_inside"] >= 0
        for key in ("sanity_top", "sanity_all"):
            assert r[key] is None or -1.0 <= r[key] <= 1.0
        assert r["ms_per_image"] > 0
        assert math.isfinite(r["aopc_morf"]) and math.isfinite(r["aopc_lerf"])


# --------------------------------------------------------------------------- built-in benchmark
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    assert _run(["--model", "shapes-vgg", "--images", "10", "--methods", "rap,gradient", "--out", str(out),
                 "-q"]) == 0
    return out


def test_report_files(report):
    assert sorted(p.name for p in report.iterdir()) == ["grid-shapes-vgg.png", "metrics.json", "metrics.md"]
    assert not [p for p in report.parent.iterdir() if p.name.startswith(".")]      # no temporary folder left
    data = _strict_json(report / "metrics.json")
    res = data["models"]["shapes-vgg"]
    assert res["items"] == 10 and 0 <= res["accuracy"] <= 1
    assert data["settings"]["split"] == res["split"] == "test"      # the default that ran (was null)
    _check_rows(res["rows"], ["rap", "gradient"])
    table = [line for line in (report / "metrics.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["rap", "gradient"]
    assert len(table[0].split("|")) == len(table[-1].split("|")) == len(evaluate.COLUMNS) + 3


def test_report_numbers_match_an_independent_recomputation(report):
    """Rebuild the items `relprop evaluate --model shapes-vgg --images 10` scored (the first
    10 images of the seed-0 shapes test split, ground-truth targets) and recompute the
    gradient row's localisation metrics with relprop.metrics (the pointing game on TorchRay's
    max-|.| channel reduction)."""
    import relprop
    from relprop.benchmark import CLASSES, ShapesDataset, models, normalise
    from relprop.metrics import (boxes_to_masks, pointing_game, pointing_game_accuracy, relevance_mass_accuracy,
                                 segmentation_scores)

    res = _strict_json(report / "metrics.json")["models"]["shapes-vgg"]
    size = models.INPUT_SIZE
    assert res["data"] == f"ShapesDataset(10, size={size}, seed=0, split='test')"
    batch = ShapesDataset(10, size=size, seed=0, split="test").make_batch(range(10))
    x, target, mask = normalise(batch["images"]), batch["labels"], batch["masks"]
    box = boxes_to_masks([b[0] for b in batch["boxes"]], size, size)
    heat = relprop.Explainer(models.load("shapes-vgg"), "gradient").heatmap(x, target).detach()
    assert heat.shape == (10, size, size)

    # TorchRay's pointing game reduces the gradient's channels by max |.| (the other metrics
    # use the signed channel sum)
    saliency = relprop.Explainer(models.load("shapes-vgg"), "gradient").attribute(x, target).relevance
    saliency = saliency.detach().abs().max(dim=1).values
    hits = pointing_game(saliency, box, tolerance=15 * size / 224)
    expected = {
        "pointing_game": pointing_game_accuracy(hits, target, len(CLASSES))["mean"],
        "relevance_mass": relevance_mass_accuracy(heat, mask).double().mean().item(),
        "iou": segmentation_scores(heat, mask)["iou"].double().mean().item(),
    }
    row, = [r for r in res["rows"] if r["method"] == "gradient"]
    for key, value in expected.items():
        assert math.isfinite(value)
        assert row[key] == pytest.approx(value, abs=1e-6), key


def test_report_confidence_intervals(report):
    """Every per-item metric of every row has a seeded 95% percentile-bootstrap interval
    over the items: the gradient row's relevance-mass interval equals a hand-computed one
    (1000 resamples drawn as documented, plain-Python means, numpy percentiles), and
    metrics.md prints the value ± half the interval's width."""
    import relprop
    from relprop.benchmark import ShapesDataset, models, normalise
    from relprop.metrics import relevance_mass_accuracy

    res = _strict_json(report / "metrics.json")["models"]["shapes-vgg"]
    assert res["resamples"] == evaluate.BOOTSTRAP_RESAMPLES == 1000
    keys = [k for k, _, _ in evaluate.COLUMNS if k not in ("ms_per_image", "untrusted")]
    for row in res["rows"]:
        assert sorted(row["ci"]) == sorted(keys)
        for key in keys:
            low, high = row["ci"][key]["low"], row["ci"][key]["high"]
            assert low <= high, (row["method"], key)
            if key in BOUNDED:
                assert 0 <= low <= high <= 1
    batch = ShapesDataset(10, size=models.INPUT_SIZE, seed=0, split="test").make_batch(range(10))
    heat = relprop.Explainer(models.load("shapes-vgg"), "gradient").heatmap(normalise(batch["images"]),
                                                                              batch["labels"]).detach()
    mass = relevance_mass_accuracy(heat, batch["masks"]).double().tolist()
    idx = torch.randint(10, (1000, 10), generator=torch.Generator().manual_seed(0)).tolist()
    means = [sum(mass[i] for i in row) / 10 for row in idx]
    row, = [r for r in res["rows"] if r["method"] == "gradient"]
    assert row["ci"]["relevance_mass"]["low"] == pytest.approx(np.percentile(means, 2.5), abs=1e-6)
    assert row["ci"]["relevance_mass"]["high"] == pytest.approx(np.percentile(means, 97.5), abs=1e-6)
    half = (np.percentile(means, 97.5) - np.percentile(means, 2.5)) / 2
    line, = [l for l in (report / "metrics.md").read_text().splitlines() if l.startswith("| gradient |")]
    assert f"{row['relevance_mass']:.3f} ± {half:.2f}" in line.split("|")[4]
    assert "percentile-bootstrap interval" in (report / "metrics.md").read_text()


def test_one_image_has_no_confidence_interval_not_a_zero_width_one(tmp_path, capsys):
    out = tmp_path / "one"
    assert _run(["--model", "shapes-vgg", "--images", "1", "--methods", "gradient", "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    row, = _strict_json(out / "metrics.json")["models"]["shapes-vgg"]["rows"]
    keys = [k for k, _, _ in evaluate.COLUMNS if k not in ("ms_per_image", "untrusted")]
    assert row["ci"] == {k: {"low": None, "high": None, "items": 1} for k in keys}
    for text in (printed, (out / "metrics.md").read_text()):
        line, = [l for l in text.splitlines() if l.startswith("| gradient |")]
        cells = line.split("|")[2:-1]
        assert [c.strip().endswith("± n/a") for c in cells] == [True] * len(keys) + [False, False]
        assert "± 0" not in text
        assert "± n/a: fewer than 2 items scored for the metric, so no interval can be estimated" in text
        assert "± inf: a bound is infinite" in text


def test_confidence_intervals_count_the_items_scored():
    from relprop.metrics import bootstrap as B

    one = torch.tensor([0.3, math.nan, math.nan])            # a metric scored on one item of three
    two = torch.tensor([0.3, 0.5, math.nan])
    ci = evaluate.confidence_intervals({"one": (B.nanmean_statistic(one), 3, 1),
                                        "two": (B.nanmean_statistic(two), 3, 2),
                                        "plain": (B.nanmean_statistic(two[:2]), 2)}, 200, 0)
    assert ci["one"] == {"low": None, "high": None, "items": 1}
    assert ci["two"]["items"] == 2 and ci["two"]["low"] == pytest.approx(0.3) and ci["two"]["high"] == pytest.approx(0.5)
    assert ci["plain"] == dict(ci["two"], items=2)
    assert evaluate._plus_minus(ci["one"]) == " ± n/a" and evaluate._plus_minus(ci["two"]) == " ± 0.10"
    assert evaluate._plus_minus({"low": 0.1, "high": 0.3}) == " ± 0.10"       # a report without "items"
    # an infinite bound (an item's infinite outside/inside ratio): "± inf" in metrics.md, null in
    # metrics.json with items >= 2 (null with items < 2 is "no interval"), as the legend says
    infinite = {"low": 0.07, "high": math.inf, "items": 2}
    assert evaluate._plus_minus(infinite) == " ± inf"
    assert evaluate._finite(infinite) == {"low": 0.07, "high": None, "items": 2}


def test_grid_has_a_row_per_image_and_a_column_per_method(report, tmp_path):
    from relprop import viz

    with Image.open(report / "grid-shapes-vgg.png") as im:
        w, h = im.size
    cell = 64 * 3                                     # 64 px images drawn 3x
    assert w == 4 + 3 * (cell + 4)                    # input + 2 methods
    # the same titles over one row give the title band; each further row adds cell + PAD
    image, heat = np.zeros((64, 64, 3), dtype=np.uint8), np.zeros((64, 64))
    _, one_row = viz.save_grid(tmp_path / "one.png", [image], [[heat], [heat]], ["input", "rap", "gradient"],
                               scale=3)
    assert one_row > cell + viz.PAD
    assert h == one_row + 7 * (cell + viz.PAD)        # 8 grid rows (the first 8 of 10 images)


def test_rap_puts_relevance_on_the_object(report):
    rows = {r["method"]: r for r in _strict_json(report / "metrics.json")["models"]["shapes-vgg"]["rows"]}
    # a mask covers about 11 % of the image; RAP's positive relevance concentrates on it
    assert rows["rap"]["relevance_mass"] > 0.25
    assert rows["rap"]["pointing_game"] >= 0.7


def test_rerun_replaces_the_report(report, tmp_path):
    out = tmp_path / "r"
    assert _run(["--model", "shapes-resnet", "--images", "2", "--methods", "gradient", "--out", str(out), "-q"]) == 0
    (out / "stale.txt").write_text("old")
    assert _run(["--model", "shapes-vgg", "--images", "2", "--methods", "gradient", "--out", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid-shapes-vgg.png", "metrics.json", "metrics.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_hard_split_scores_the_target_among_other_objects(tmp_path):
    """`--split hard`: the hard-mode test images (seed 0), each explained for its target
    (object 0); the pointing game against the target's box, recomputed here by hand from
    the gradient's max |.| map, is the report's; a point on another object is a miss."""
    import relprop
    from relprop.benchmark import CLASSES, ShapesDataset, models, normalise

    out = tmp_path / "hard"
    assert _run(["--split", "hard", "--model", "shapes-resnet", "--images", "10", "--methods", "gradient",
                 "--out", str(out), "-q"]) == 0
    data = _strict_json(out / "metrics.json")
    res = data["models"]["shapes-resnet"]
    assert res["data"] == f"ShapesDataset(10, size={models.INPUT_SIZE}, seed=0, split='test', hard=True)"
    assert res["split"] == "hard" and data["settings"]["split"] == "hard"
    batch = ShapesDataset(10, seed=0, split="test", hard=True).make_batch(range(10))
    assert all(len(lab) >= 3 for lab in batch["object_labels"])
    rel = relprop.Explainer(models.load("shapes-resnet"), "gradient").attribute(normalise(batch["images"]),
                                                                               batch["labels"]).relevance
    sal = rel.detach().abs().max(dim=1).values
    tol2 = (15 * 64 / 224) ** 2
    hits, per_class = [], {}
    for i in range(10):
        r, c = divmod(int(sal[i].flatten().argmax()), 64)
        x0, y0, x1, y1 = batch["boxes"][i][0].tolist()
        dr = max(y0 - r, 0, r - (y1 - 1))                 # distance from the point to the target's box
        dc = max(x0 - c, 0, c - (x1 - 1))
        hit = dr * dr + dc * dc < tol2
        hits.append(hit)
        per_class.setdefault(int(batch["labels"][i]), []).append(hit)
    expected = sum(sum(h) / len(h) for h in per_class.values()) / len(per_class)
    assert len(per_class) == len(CLASSES)
    row, = res["rows"]
    assert row["pointing_game"] == pytest.approx(expected, abs=1e-12)


def test_check_methods():
    assert evaluate.check_methods("default") == list(evaluate.DEFAULT_METHODS)
    assert {"gradient", "gradient-x-input", "rap", "rsp", "ae", "clrp"} <= set(evaluate.DEFAULT_METHODS)
    assert "lrp-zplus" in evaluate.check_methods("all")
    assert evaluate.check_methods("rap, gradient,rap") == ["rap", "gradient"]
    # 'default' and 'all' inside a list stand for their methods
    assert evaluate.check_methods("default,rap-split") == list(evaluate.DEFAULT_METHODS) + ["rap-split"]
    assert evaluate.check_methods("gradcam,default") == ["gradcam"] + list(evaluate.DEFAULT_METHODS)
    assert evaluate.check_methods("all,rap") == evaluate.check_methods("all")
    with pytest.raises(ValueError, match="nope"):
        evaluate.check_methods("rap,nope")
    with pytest.raises(ValueError, match=r"unknown method\(s\) ','"):
        evaluate.check_methods(",")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "rap,nope"], "unknown method(s) nope"),
    (["--images", "5", "--full"], "not both"),
    (["--model", "resnet50"], "needs your data"),
    (["--weights", "w.pt"], "--weights is only for your own data"),
    (["--voc", "missing-folder", "--model", "m:f"], "does not exist"),
    (["--coco", "a.json", "--model", "m:f"], "--coco needs --images-dir"),
    (["--voc", "a", "--coco", "b", "--images-dir", "c"], "not both"),
    (["--images", "0"], "must be >= 1"),
    (["--split", "val"], "invalid choice: 'val'"),
    (["--split", "hard", "--voc", "missing-folder", "--model", "m:f"], "--split is only for the built-in benchmark"),
])
def test_bad_input_is_reported_before_any_work(argv, message, capsys, tmp_path):
    out = tmp_path / "never"
    assert message in _error([*argv, "--out", str(out)], capsys)
    assert not out.exists()


def test_out_that_is_not_a_report_is_left_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert "not a relprop report" in _error(["--out", str(tmp_path)], capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- user data
def _image(path, w, h):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _voc(root, objects_per_image):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for k, objects in enumerate(objects_per_image):
        _image(root / "JPEGImages" / f"im{k}.jpg", 40, 20)
        objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                       f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
        (root / "Annotations" / f"im{k}.xml").write_text(
            f"<annotation><filename>im{k}.jpg</filename><size><width>40</width><height>20</height></size>"
            f"{objs}</annotation>")


@pytest.fixture
def tiny_net(tmp_path, monkeypatch):
    (tmp_path / "tinynet_eval.py").write_text(TINY_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tinynet_eval:build"
    sys.modules.pop("tinynet_eval", None)


def test_voc_boxes_are_rescaled_to_the_model_input(tmp_path):
    _voc(tmp_path / "voc", [[("cat", (1, 1, 20, 10)), ("dog", (31, 11, 40, 20)), ("cat", (21, 1, 22, 2))]])
    records = userdata.voc_records(tmp_path / "voc", classes=("cat", "dog"))
    assert userdata.class_items(records) == [(0, 0), (0, 1)]
    cat = userdata.load_item(records[0], 0, 20, (0, 0, 0), (1, 1, 1))
    assert cat["x"].shape == (3, 20, 20) and 0 <= cat["x"].min() and cat["x"].max() <= 1
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[:10, :10] = True                        # VOC (1, 1, 20, 10) of 40x20 -> cols 0-9, rows 0-9
    expected[:2, 10] = True                          # second cat (cols 20-21, rows 0-1): nearest of col 10 is 21
    assert torch.equal(cat["box"], expected) and torch.equal(cat["mask"], expected)   # VOC: mask = box
    dog = userdata.load_item(records[0], 1, 20, (0, 0, 0), (1, 1, 1))
    expected = torch.zeros(20, 20, dtype=torch.bool)
    expected[10:, 15:] = True
    assert torch.equal(dog["box"], expected)


def test_coco_masks_and_boxes_are_rescaled(tmp_path):
    _image(tmp_path / "a.png", 20, 20)
    coco = {"images": [{"id": 7, "file_name": "a.png", "width": 20, "height": 20},
                       {"id": 8, "file_name": "unannotated.png", "width": 20, "height": 20}],
            "categories": [{"id": 3, "name": "kite"}, {"id": 1, "name": "bird"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [4, 6, 8, 4],
                             "segmentation": [[4, 6, 11, 6, 4, 9]]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert userdata.coco_classes(tmp_path / "c.json") == ("bird", "kite")
    records = userdata.coco_records(tmp_path / "c.json", tmp_path)
    assert len(records) == 1 and records[0]["objects"][0]["label"] == 1
    item = userdata.load_item(records[0], 1, 10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[3:5, 2:6] = True                         # box (4, 6, 12, 10) at half resolution
    assert torch.equal(item["box"], expected)
    assert item["mask"].any() and not (item["mask"] & ~item["box"]).any() and item["mask"].sum() < 8
    assert -1 <= item["x"].min() and item["x"].max() <= 1


def test_user_data_errors(tmp_path):
    _voc(tmp_path / "voc", [[("zebra", (1, 1, 5, 5))]])
    with pytest.raises(ValueError, match="zebra"):
        userdata.voc_records(tmp_path / "voc", classes=("cat",))
    (tmp_path / "voc" / "JPEGImages" / "im0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="im0.jpg"):
        userdata.voc_records(tmp_path / "voc", classes=("zebra",))


def test_evaluate_voc_end_to_end(tmp_path, tiny_net):
    _voc(tmp_path / "voc", [[("cat", (1, 1, 20, 10))], [("dog", (5, 5, 30, 18)), ("cat", (31, 1, 40, 8))]])
    out = tmp_path / "rep"
    assert _run(["--voc", str(tmp_path / "voc"), "--classes", "cat,dog", "--model", tiny_net, "--num-classes", "2",
                 "--size", "32", "--methods", "rap,gradient-x-input", "--out", str(out), "-q"]) == 0
    res = _strict_json(out / "metrics.json")["models"]["user-model"]
    assert res["items"] == 3                          # (im0, cat), (im1, cat), (im1, dog)
    _check_rows(res["rows"], ["rap", "gradient-x-input"])
    assert (out / "grid-user-model.png").is_file()


def test_evaluate_coco_end_to_end_and_its_checks(tmp_path, tiny_net, capsys):
    for k in range(2):
        _image(tmp_path / f"{k}.jpg", 24, 16)
    coco = {"images": [{"id": k, "file_name": f"{k}.jpg", "width": 24, "height": 16} for k in range(2)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}],
            "annotations": [{"id": 1, "image_id": 0, "category_id": 5, "bbox": [2, 2, 10, 8]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [12, 4, 10, 10],
                             "segmentation": [[12, 4, 22, 4, 22, 14]]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    base = ["--coco", str(tmp_path / "c.json"), "--images-dir", str(tmp_path), "--model", tiny_net,
            "--size", "32", "--methods", "rsp,gradient"]
    assert _run([*base, "--out", str(tmp_path / "rep"), "-q"]) == 0
    res = _strict_json(tmp_path / "rep" / "metrics.json")["models"]["user-model"]
    assert res["items"] == 2
    _check_rows(res["rows"], ["rsp", "gradient"])
    assert "2 outputs but there are 3 classes" in _error([*base, "--num-classes", "2", "--out",
                                                          str(tmp_path / "x")], capsys)
    assert "shapes-vgg" in _error([*base[:4], "--model", "shapes-vgg", "--out", str(tmp_path / "x")], capsys)
    assert not (tmp_path / "x").exists()


def test_a_model_function_that_raises_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    (tmp_path / "rp_eval_raises.py").write_text("def build(num_classes=3):\n    raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _voc(tmp_path / "voc", [[("cat", (1, 1, 20, 10))]])
    err = _error(["--voc", str(tmp_path / "voc"), "--classes", "cat,dog", "--model", "rp_eval_raises:build",
                  "--out", str(tmp_path / "rep")], capsys)
    assert err.strip().splitlines()[-1] == ("relprop evaluate: error: --model rp_eval_raises:build raised "
                                            "RuntimeError: no GPU here")
    assert not (tmp_path / "rep").exists()


def test_unreadable_user_image_fails_cleanly(tmp_path, tiny_net, capsys):
    _voc(tmp_path / "voc", [[("cat", (1, 1, 20, 10))], [("dog", (5, 5, 30, 18))]])
    (tmp_path / "voc" / "JPEGImages" / "im1.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "rep"
    assert _run(["--voc", str(tmp_path / "voc"), "--classes", "cat,dog", "--model", tiny_net, "--num-classes", "2",
                 "--size", "32", "--methods", "gradient", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "im1.jpg" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tinynet_eval.py", "voc"]     # no report, no temp folder


def test_grid_outline_is_drawn_on_every_cell(tmp_path):
    from relprop import viz

    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 3:7] = True
    edge = viz.outline(mask)
    assert edge.sum() == 12 and not edge[3:5, 4:6].any() and edge[2, 3] and edge[5, 6]
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    heat = np.zeros((8, 8))
    viz.save_grid(tmp_path / "g.png", [image], [[heat], [heat]], ["in", "a", "b"], outlines=[mask])
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    top = grid.shape[0] - viz.PAD - 8                                   # the row's first pixel row
    for col in range(3):
        left = viz.PAD + col * (8 + viz.PAD)
        cell = grid[top:top + 8, left:left + 8]
        assert (cell[edge] == 0).all() and (cell[~edge] != 0).any(axis=-1).all()
    with pytest.raises(ValueError, match="outlines"):
        viz.save_grid(tmp_path / "h.png", [image], [[heat]], ["in", "a"], outlines=[mask, mask])


def test_maps_reported_as_untrustworthy_are_counted_not_printed(tmp_path, recwarn):
    """RAP's residual splits on shapes-resnet nearly cancel: the report counts the maps the
    explainer reports (the same count as Attribution.error above the bound), the run prints
    no warning per batch, and RSP (splits of one sign) reports fewer (its maps only for other
    steps: inputs within rounding of 0, max-pool near-ties)."""
    import relprop
    from relprop.benchmark import models, shapes
    from relprop.explainer import trusted_error
    out = tmp_path / "report"
    assert _run(["--model", "shapes-resnet", "--images", "12", "--methods", "rap,rsp", "--out", str(out), "-q"]) == 0
    assert not [w for w in recwarn if "the map(s) of sample(s)" in str(w.message)]
    rows = {r["method"]: r for r in _strict_json(out / "metrics.json")["models"]["shapes-resnet"]["rows"]}
    data = shapes.ShapesDataset(12, size=64, seed=0, split="test")
    x = shapes.normalise(torch.stack([data[i]["image"] for i in range(12)]))
    target = torch.tensor([data[i]["label"] for i in range(12)])
    counts = {}
    for method in ("rap", "rsp"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            att = relprop.Explainer(models.load("shapes-resnet"), method).attribute(x, target)
        counts[method] = int((att.error > trusted_error(torch.float32)).sum())
        assert rows[method]["untrusted"] == counts[method]
    assert counts["rap"] >= 6 > counts["rsp"]
    assert "maps reported ⚠" in (out / "metrics.md").read_text()


def test_ctrl_c_is_one_line_and_leaves_no_report(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a run: 'relprop evaluate: interrupted', exit 130, no traceback, and no
    report folder (it is written only when the run has finished)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "run", interrupted)
    out = tmp_path / "report"
    assert _run(["--model", "shapes-vgg", "--methods", "rap", "--images", "2", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["relprop evaluate: interrupted"]
    assert not out.exists()
