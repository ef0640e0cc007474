"""Attributing image folders: relprop.images, relprop.attribute, ``relprop attribute``/``explain``."""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import relprop
from relprop import attribute as attr_mod
from relprop import cli, demo
from relprop.attribute import attribute_dataset, shard_paths
from relprop.benchmark import models as builtin
from relprop.benchmark import normalise
from relprop.images import ImageFolderDataset, Preprocessing, TorchvisionDataset, list_images
from relprop.models import load_model, weights_preprocessing

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
SIZE = 32
SPEC = "test_attribute:tiny_model"


@pytest.fixture(autouse=True)
def _one_thread():
    """The maps are tiny: one intra-op thread is faster, and robust on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(num_classes: int = 4):
    """A small VGG with fixed random weights (and non-trivial BatchNorm statistics)."""
    g = torch.Generator().manual_seed(123)
    model = demo.make_model(width=4, classes=num_classes)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if "running_var" in name:
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(0.3 * torch.randn(t.shape, generator=g))
    return model.eval()


def _write_images(folder, n, sub=lambda i: "", seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        d = folder / sub(i)
        d.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"img{i:02d}.png")
    return folder


@pytest.fixture
def data(tmp_path):
    """10 images: 6 in class folders a/ and b/, 4 at the root (so no labels)."""
    return _write_images(tmp_path / "data", 10, sub=lambda i: "ab"[i % 2] if i < 6 else "")


@pytest.fixture
def labelled(tmp_path):
    """9 images in the ImageFolder layout, classes a, b, c."""
    return _write_images(tmp_path / "labelled", 9, sub=lambda i: "abc"[i % 3])


def _dataset(root):
    return ImageFolderDataset(root, Preprocessing(SIZE, SIZE))


def _run(root, out, **kw):
    kw.setdefault("method", "rap")
    kw.setdefault("batch_size", 3)
    kw.setdefault("shard_size", 4)
    return attribute_dataset(tiny_model(), _dataset(root), out_dir=out, progress=False, **kw)


def _index(out):
    with open(out / "index.jsonl") as f:
        return [json.loads(line) for line in f]


def _shard_arrays(out, n):
    return [np.load(shard_paths(out, k)[0]) for k in range(n)]


# --------------------------------------------------------------------------- images
def test_listing_is_recursive_sorted_and_labels_only_for_imagefolder_layout(data, labelled):
    (data / "notes.txt").write_text("not an image")
    (data / "x.JPEG").write_bytes((data / "img06.png").read_bytes())
    paths, labels, classes = list_images(data)
    rel = [os.path.relpath(p, data).replace(os.sep, "/") for p in paths]
    assert rel == sorted(rel) and len(rel) == 11 and "x.JPEG" in rel and "notes.txt" not in rel
    assert "a/img00.png" in rel and labels is None and classes == []
    paths, labels, classes = list_images(labelled)
    assert classes == ["a", "b", "c"]
    assert [classes[label] for label in labels] == [os.path.basename(os.path.dirname(p)) for p in paths]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_listing_takes_tiff_and_gif_as_explain_reads_them(tmp_path):
    arr = (np.arange(8 * 8 * 3) % 251).astype(np.uint8).reshape(8, 8, 3)
    for name in ("a.tif", "b.TIFF", "c.gif", "d.png"):
        Image.fromarray(arr).save(tmp_path / name)
    paths, _, _ = list_images(tmp_path)
    assert [os.path.basename(p) for p in paths] == ["a.tif", "b.TIFF", "c.gif", "d.png"]


@pytest.mark.parametrize("mean, std", [((0.5, 0.5, 0.5), (float("inf"), 1.0, 1.0)),
                                       ((0.5, 0.5, 0.5), (float("nan"), 1.0, 1.0)),
                                       ((float("nan"), 0.5, 0.5), (1.0, 1.0, 1.0))])
def test_preprocessing_refuses_non_finite_mean_and_std(mean, std):
    with pytest.raises(ValueError, match=r"^mean and std need 3 finite values each \(std > 0\)"):
        Preprocessing(16, 20, mean=mean, std=std)


def test_dataset_preprocesses_like_resize_crop_normalise(tmp_path):
    arr = (np.arange(40 * 60 * 3) % 251).astype(np.uint8).reshape(40, 60, 3)
    (tmp_path / "d").mkdir()
    Image.fromarray(arr).save(tmp_path / "d" / "x.png")
    ds = ImageFolderDataset(tmp_path / "d", Preprocessing(16, 20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    i, x, err = ds[0]
    assert i == 0 and err is None and x.shape == (3, 16, 16)
    ref = Image.fromarray(arr).resize((30, 20), Image.BILINEAR)       # shorter side 40 -> 20
    ref = np.asarray(ref, dtype=np.float32)[2:18, 7:23] / 255.0       # centre 16x16
    assert np.abs(x.permute(1, 2, 0).numpy() - (ref - 0.5) / 0.5).max() < 0.05


def _plain(size):
    """Loads without resizing or normalising: the tensor is the image's [0, 1] intensities."""
    return Preprocessing(size, None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_16_bit_greyscale_images_are_scaled_by_their_range_not_clipped(tmp_path):
    arr = (np.arange(24 * 24, dtype=np.int64).reshape(24, 24) * 113 % 65536).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")      # Pillow's 16-bit greyscale ("I;16", "I" in older Pillow)
    expected = torch.from_numpy(arr.astype(np.float32) / np.float32(65535))
    x = _plain(24).load(tmp_path / "g16.png")
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    for c in range(3):                      # grey: the same intensities in every channel, not clipped at 255
        assert torch.equal(x[c], expected)
    assert 0.45 < x.mean().item() < 0.55 and x.min().item() == 0.0
    # mode "I" (32-bit integers holding 16-bit values) and big-endian "I;16B" read the same
    ref = _plain(24)(Image.fromarray(arr))
    assert torch.equal(_plain(24)(Image.fromarray(arr.astype(np.int32))), ref)
    assert torch.equal(_plain(24)(Image.frombytes("I;16B", (24, 24), arr.astype(">u2").tobytes())), ref)
    # resized and normalised like an 8-bit image of the same picture (up to 8-bit rounding)
    pre = Preprocessing(16, 20)
    eight = (arr.astype(np.float64) / 65535 * 255).round().astype(np.uint8)
    assert (pre.load(tmp_path / "g16.png") - pre(Image.fromarray(eight))).abs().max().item() < 0.05


def test_float_images_are_read_as_intensities_in_0_1(tmp_path):
    arr = np.linspace(0.0, 1.0, 20 * 20, dtype=np.float32).reshape(20, 20)
    Image.fromarray(arr).save(tmp_path / "f.tiff")
    x = _plain(20).load(tmp_path / "f.tiff")
    assert x.shape == (3, 20, 20) and all(torch.equal(x[c], torch.from_numpy(arr)) for c in range(3))
    with pytest.raises(ValueError, match=r"float image \(Pillow mode F\) with values in \[0, 255\]: relprop reads "
                                         r"float images as intensities in \[0, 1\]"):
        _plain(20)(Image.fromarray(arr * 255))
    with pytest.raises(ValueError, match=r"32-bit integer image \(Pillow mode I\) with values in \[-5, 7\], "
                                         r"outside the 16-bit range 0..65535"):
        _plain(2)(Image.fromarray(np.array([[-5, 7], [0, 1]], dtype=np.int32)))


def test_8_bit_images_load_exactly_as_before(tmp_path):
    """RGB, L, P and RGBA images: Pillow's RGB conversion, resize, crop, to_tensor, normalise."""
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8))
    images = {"rgb.png": rgb, "l.png": rgb.convert("L"), "p.png": rgb.convert("P"), "rgba.png": rgba,
              "rgb.jpg": rgb}
    pre = Preprocessing(16, 20, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    for name, im in images.items():
        im.save(tmp_path / name)
        with Image.open(tmp_path / name) as f:
            ref = TF.resize(f.convert("RGB"), 20, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            ref = TF.normalize(TF.to_tensor(TF.center_crop(ref, [16, 16])), pre.mean, pre.std)
        assert torch.equal(pre.load(tmp_path / name), ref), name


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:, :15, 0] = 255                    # left half red, right half blue, as stored
    arr[:, 15:, 2] = 255
    arr[0, 0] = (0, 255, 0)                 # a green corner pixel fixes the orientation exactly
    for orientation, upright in ((6, np.rot90(arr, -1)), (3, arr[::-1, ::-1]), (8, np.rot90(arr, 1)),
                                 (1, arr)):
        exif = Image.Exif()
        exif[0x0112] = orientation          # 6: the camera was turned, show rotated 90 degrees clockwise
        path = tmp_path / f"o{orientation}.png"
        Image.fromarray(arr).save(path, exif=exif)
        h, w = upright.shape[:2]
        x = Preprocessing(min(h, w), None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).load(path)
        top, left = (h - min(h, w)) // 2, (w - min(h, w)) // 2
        ref = upright[top:top + min(h, w), left:left + min(h, w)].astype(np.float32) / 255
        assert np.array_equal(x.permute(1, 2, 0).numpy(), ref), orientation


# --------------------------------------------------------------------------- end to end
def test_shards_equal_the_explainer_on_the_same_batches(data, tmp_path):
    out = tmp_path / "out"
    summary = _run(data, out)
    assert summary == {"shards": 3, "done": 3, "skipped_shards": 0, "items": 10, "skipped_images": 0,
                       "batch_size": 3}
    ds, model = _dataset(data), tiny_model()
    explainer = relprop.Explainer(model, "rap")
    arrays = _shard_arrays(out, 3)
    index = _index(out)
    assert [r["index"] for r in index] == list(range(10))
    assert [r["path"] for r in index] == [os.path.relpath(p, data) for p in ds.paths]    # relative to the folder
    assert [os.path.join(data, r["path"]) for r in index] == ds.paths
    for k, arr in enumerate(arrays):
        first, stop = 4 * k, min(4 * k + 4, 10)
        assert arr.dtype == np.float32 and arr.shape == (stop - first, 3, SIZE, SIZE)
        # the same batches as the run: batch_size 3 inside each shard
        for s in range(first, stop, 3):
            idx = list(range(s, min(s + 3, stop)))
            x = torch.stack([ds[i][1] for i in idx])
            a = explainer.attribute(x)
            got = torch.from_numpy(arr[s - first:s - first + len(idx)])
            assert torch.allclose(got, a.relevance, atol=1e-6, rtol=0)
            for j, i in enumerate(idx):
                rec = index[i]
                assert rec["target"] == a.target[j].item() == a.logits[j].argmax().item()
                assert rec["logit"] == pytest.approx(a.logits[j, rec["target"]].item(), abs=1e-6)
                assert rec["relevance_sum"] == pytest.approx(a.relevance[j].double().sum().item(), abs=1e-5)
                assert rec["delta"] == pytest.approx(rec["relevance_sum"] - rec["logit"], abs=1e-9)
                assert rec["error_estimate"] == pytest.approx(a.error[j].item(), rel=1e-6)
                assert rec["reported"] == (a.error[j].item() > 1e-3)
                assert rec["shard"] == k and rec["row"] == i - first
    with open(shard_paths(out, 1)[1]) as f:
        assert [r["index"] for r in json.load(f)["items"]] == [4, 5, 6, 7]
    settings = json.loads((out / "run.json").read_text())
    assert settings["method"] == "rap" and settings["shard_size"] == 4 and settings["dtype"] == "float32"
    assert not [p for p in (out / "shards").iterdir() if p.name.endswith(".tmp")]


def test_topk_gives_k_items_per_image_with_the_top_classes_in_one_pass(data, tmp_path, monkeypatch):
    calls = []
    orig = relprop.Explainer.attribute
    monkeypatch.setattr(relprop.Explainer, "attribute", lambda self, x, *a, **k: calls.append(len(x)) or
                        orig(self, x, *a, **k))
    _run(data, tmp_path / "out", targets="topk:2", method="lrp-epsilon")
    # the validation explains image 0 once, then batches of 3 (shards of 4) images, repeated twice
    assert calls == [1, 6, 2, 6, 2, 4]
    index = _index(tmp_path / "out")
    ds, model = _dataset(data), tiny_model()
    x = torch.stack([ds[i][1] for i in range(10)])
    top2 = model(x).topk(2, dim=1).indices
    assert [r["index"] for r in index] == [i for i in range(10) for _ in range(2)]
    assert [r["target"] for r in index] == top2.reshape(-1).tolist()
    arrays = _shard_arrays(tmp_path / "out", 3)
    assert [a.shape[0] for a in arrays] == [8, 8, 4]
    ref = relprop.Explainer(model, "lrp-epsilon")(x[8:10].repeat_interleave(2, 0), top2[8:10].reshape(-1))
    assert torch.allclose(torch.from_numpy(arrays[2]), ref, atol=1e-6, rtol=0)


def test_label_and_list_targets(labelled, tmp_path):
    _run(labelled, tmp_path / "lab", targets="label")
    index = _index(tmp_path / "lab")
    assert [r["target"] for r in index] == [r["label"] for r in index] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    _run(labelled, tmp_path / "list", targets=[3, 1])
    assert [r["target"] for r in _index(tmp_path / "list")] == [3, 1] * 9


def test_float16_storage(data, tmp_path):
    _run(data, tmp_path / "f32")
    _run(data, tmp_path / "f16", dtype="float16")
    a32, a16 = _shard_arrays(tmp_path / "f32", 3), _shard_arrays(tmp_path / "f16", 3)
    for x, y in zip(a32, a16):
        assert y.dtype == np.float16
        assert np.array_equal(y, x.astype(np.float16))            # the float32 maps, rounded


def test_an_infinite_output_is_null_in_the_index_and_reported(data, tmp_path):
    """A logit that overflows (inf) makes the item's numbers null in the index, which stays
    strict JSON (Python wrote ``Infinity``), and the item reported."""
    model = tiny_model()
    with torch.no_grad():
        model[-1][-1].bias[1] = float("inf")   # every image's class 1 logit
    with pytest.warns(RuntimeWarning):
        attribute_dataset(model, _dataset(data), "gradcam", out_dir=tmp_path / "out", progress=False, batch_size=3,
                          shard_size=4, targets=[1])
    def refuse(name):
        raise AssertionError(f"{name} in index.jsonl")
    with open(tmp_path / "out" / "index.jsonl") as f:
        items = [json.loads(line, parse_constant=refuse) for line in f]
    assert len(items) == 10
    for item in items:
        assert item["logit"] is None and item["delta"] is None and item["error_estimate"] is None
        assert item["reported"] is True


def test_corrupt_image_is_reported_and_skipped(data, tmp_path):
    (data / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match="broken.png"):
        summary = _run(data, tmp_path / "out")
    assert summary["items"] == 10 and summary["skipped_images"] == 1
    index = _index(tmp_path / "out")
    skipped = [r for r in index if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("broken.png") and skipped[0]["error"]
    ds = _dataset(data)
    assert sorted(r["index"] for r in index) == list(range(11)) and len(ds) == 11
    assert sum(a.shape[0] for a in _shard_arrays(tmp_path / "out", 3)) == 10


def test_killed_run_resumes_without_recomputing_finished_shards(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    orig = relprop.Explainer.attribute
    calls, kill = [], [True]

    def failing(self, x, *a, **k):
        calls.append(len(x))
        if kill[0] and len(calls) == 4:     # 1: the validation, shard 0 = batches 2-3; die inside shard 1
            raise RuntimeError("killed")
        return orig(self, x, *a, **k)

    monkeypatch.setattr(relprop.Explainer, "attribute", failing)
    with pytest.raises(RuntimeError, match="killed"):
        _run(data, out)
    npy0, json0 = shard_paths(out, 0)
    assert os.path.exists(json0) and not os.path.exists(shard_paths(out, 1)[1])
    assert not (out / "index.jsonl").exists()
    stamp = (os.stat(npy0).st_mtime_ns, os.stat(json0).st_mtime_ns)

    calls.clear()
    kill[0] = False
    summary = _run(data, out)
    assert calls == [1, 3, 1, 2]                 # the validation, then shards 1 and 2 only
    assert summary["done"] == 2 and summary["skipped_shards"] == 1
    assert (os.stat(npy0).st_mtime_ns, os.stat(json0).st_mtime_ns) == stamp
    index = _index(out)
    assert [r["index"] for r in index] == list(range(10))
    assert sum(a.shape[0] for a in _shard_arrays(out, 3)) == 10
    monkeypatch.setattr(relprop.Explainer, "attribute", orig)
    _run(data, tmp_path / "fresh")
    assert _index(tmp_path / "fresh") == index
    for a, b in zip(_shard_arrays(out, 3), _shard_arrays(tmp_path / "fresh", 3)):
        assert np.array_equal(a, b)


def test_a_run_that_finished_no_shard_does_not_block_its_folder(data, tmp_path, monkeypatch):
    """A run stopped before its first shard was finished (an error at the first batch, a kill)
    leaves only its run.json: the corrected command, with other settings, takes the folder
    over (it was refused as "a run with different settings"), and the result is that of a
    fresh folder."""
    calls, orig = [], relprop.Explainer.attribute

    def fails_after_validation(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("stopped")
        return orig(self, *a, **k)

    monkeypatch.setattr(relprop.Explainer, "attribute", fails_after_validation)
    with pytest.raises(RuntimeError, match="stopped"):
        _run(data, tmp_path / "out", method="lrp-epsilon")
    assert (tmp_path / "out" / "run.json").exists() and not _index_exists(tmp_path / "out")
    monkeypatch.setattr(relprop.Explainer, "attribute", orig)
    _run(data, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "run.json").read_text())["method"] == "rap"
    _run(data, tmp_path / "fresh")
    assert _index(tmp_path / "out") == _index(tmp_path / "fresh")
    with pytest.raises(ValueError, match="different settings"):   # now it holds shards
        _run(data, tmp_path / "out", method="lrp-epsilon")


def _index_exists(out):
    return (out / "index.jsonl").exists() or any((out / "shards").glob("shard-*.json"))


def test_resume_with_other_settings_is_refused(data, tmp_path):
    _run(data, tmp_path / "out")
    for change in ({"method": "lrp-epsilon"}, {"shard_size": 5}, {"targets": "topk:2"}, {"dtype": "float16"}):
        with pytest.raises(ValueError, match="different settings"):
            _run(data, tmp_path / "out", **change)
    _write_images(data, 1, seed=5, sub=lambda i: "c")            # the data changed
    with pytest.raises(ValueError, match="different settings"):
        _run(data, tmp_path / "out")


def test_batch_size_may_change_on_resume(data, tmp_path):
    _run(data, tmp_path / "out")
    summary = _run(data, tmp_path / "out", batch_size=1)
    assert summary["done"] == 0 and summary["items"] == 10


def test_batch_size_auto_is_measured_printed_and_recorded(data, tmp_path, capsys, monkeypatch):
    """``auto`` extrapolates the measured per-image peak to the memory available: with
    MemAvailable pretended to be 40 MiB plus what the fixed part needs, it picks about
    0.7 * 40 MiB / per-image, capped at the shard size; the choice is printed, recorded in
    run.json (outside the settings, so a resume with a fixed size is not refused), and the
    maps equal a run with that batch size."""
    real = attr_mod._proc_kib
    monkeypatch.setattr(attr_mod, "_proc_kib",
                        lambda path, field: 40 * 1024 if field == "MemAvailable" else real(path, field))
    summary = attribute_dataset(tiny_model(), _dataset(data), out_dir=tmp_path / "auto", batch_size="auto",
                                shard_size=1024, progress=True)
    with open(tmp_path / "auto" / "run.json") as f:
        batch = json.load(f)["batch_size"]
    assert batch["requested"] == "auto" and batch["chosen"] == summary["batch_size"] >= 1
    per, fixed, free = batch["per_image_bytes"], batch["fixed_bytes"], batch["available_bytes"]
    assert free == 40 * 2**20 and per > 0 and fixed >= 0
    assert abs(batch["chosen"] - max(1, min(1024, (0.7 * free - fixed) / per))) <= 1
    err = capsys.readouterr().err
    assert f"--batch-size auto: {batch['chosen']} images per batch (measured" in err
    fixed = attribute_dataset(tiny_model(), _dataset(data), out_dir=tmp_path / "fixed", batch_size=batch["chosen"],
                              shard_size=1024, progress=False)
    np.testing.assert_array_equal(_shard_arrays(tmp_path / "auto", 1)[0], _shard_arrays(tmp_path / "fixed", 1)[0])
    assert fixed["items"] == summary["items"] == 10
    resumed = attribute_dataset(tiny_model(), _dataset(data), out_dir=tmp_path / "auto", batch_size=2,
                                shard_size=1024, progress=False)
    assert resumed["done"] == 0


def test_batch_size_auto_is_capped_by_the_shard_size(data, tmp_path):
    summary = _run(data, tmp_path / "out", batch_size="auto", shard_size=4)   # GiBs free: the cap decides
    assert summary["batch_size"] == 4


@pytest.mark.parametrize("bad", [0, -1, "big", 2.5, True])
def test_bad_batch_size_is_refused_before_anything_is_written(data, tmp_path, bad):
    with pytest.raises(ValueError, match="batch_size"):
        _run(data, tmp_path / "out", batch_size=bad)
    assert not (tmp_path / "out").exists()


def test_progress_bar_shows_images_per_second_and_eta(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)          # the bar is drawn on terminals only
    attribute_dataset(tiny_model(), _dataset(data), out_dir=tmp_path / "out", batch_size=3, shard_size=4)
    err = capsys.readouterr().err
    # tqdm: "attributing: 100%|...| 10/10 [00:01<00:00,  7.50img/s]" -- elapsed<ETA, rate
    assert re.search(r"attributing.*10/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s\]", err), err[-500:]


# --------------------------------------------------------------------------- torchvision data sets
FAKE = {"size": 7, "image_size": (3, 40, 36), "num_classes": 4}


def test_torchvision_dataset_end_to_end_with_stable_ids(tmp_path):
    import torchvision

    pre = Preprocessing(SIZE, SIZE)
    ds = TorchvisionDataset("FakeData", preprocessing=pre, options=FAKE)
    fake = torchvision.datasets.FakeData(**FAKE)
    assert len(ds) == 7 and [ds.labels[i] for i in range(7)] == [int(fake[i][1]) for i in range(7)]
    out = tmp_path / "out"
    summary = attribute_dataset(tiny_model(), ds, "rap", out_dir=out, targets="label", batch_size=3,
                                shard_size=4, progress=False)
    assert summary["items"] == 7 and summary["shards"] == 2
    index = _index(out)
    assert [r["id"] for r in index] == [f"FakeData[image_size=(3, 40, 36),num_classes=4,size=7]:{i}"
                                        for i in range(7)]
    assert all(r["path"] is None for r in index)
    assert [r["target"] for r in index] == [r["label"] for r in index] == [int(fake[i][1]) for i in range(7)]
    x = torch.stack([pre(fake[i][0]) for i in range(7)])
    ref = relprop.Explainer(tiny_model(), "rap")(x, [r["label"] for r in index])
    got = torch.from_numpy(np.concatenate(_shard_arrays(out, 2)))
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert json.loads((out / "run.json").read_text())["data"]["dataset"] == "FakeData"


def test_torchvision_labels_out_of_range_are_named(tmp_path):
    """A torchvision data set without ``.targets`` gives its labels with its items: the first
    readable item's is checked before anything is written, the others before their batch,
    and the error names the item (it was torch's 'target 10 out of range', after shards)."""
    opts = dict(FAKE, size=8, num_classes=1000)            # labels 197, 113, ...: the first is out of range
    ds = TorchvisionDataset("FakeData", preprocessing=Preprocessing(SIZE, SIZE), options=opts)
    with pytest.raises(ValueError, match=r"^targets 'label': FakeData\[.*\]:0 has the label 197 but the model has "
                                         r"4 classes \(0 to 3\)$"):
        attribute_dataset(tiny_model(), ds, "rap", out_dir=tmp_path / "a", targets="label", batch_size=2,
                          shard_size=2, progress=False)
    assert not (tmp_path / "a").exists()
    opts = dict(FAKE, size=8, num_classes=7)               # labels 5, 5, 5, 5, 3, 2, 1, 4 on a 5-class model
    ds = TorchvisionDataset("FakeData", preprocessing=Preprocessing(SIZE, SIZE), options=opts)
    ds.labels = _LazyLabels(ds.labels)
    with pytest.raises(ValueError, match=r"^targets 'label': FakeData\[.*\]:0 has the label 5 but"):
        attribute_dataset(tiny_model(5), ds, "rap", out_dir=tmp_path / "b", targets="label", batch_size=2,
                          shard_size=2, progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match=r"^targets 'label': FakeData\[.*\]:7 has the label 4 but the model has "
                                         r"4 classes"):
        attribute_dataset(tiny_model(4), _with_labels(ds, [3, 3, 3, 3, 3, 2, 1, 4]), "rap", out_dir=tmp_path / "c",
                          targets="label", batch_size=2, shard_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "c" / "shards").glob("*.npy")) == [
        f"shard-0000{k}.npy" for k in range(3)]            # the shards before it are whole, for a resume


class _LazyLabels:
    """Labels read item by item, as ``_ItemLabels`` gives them (no ``.targets`` list)."""

    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return int(self.labels[i])


def _with_labels(ds, labels):
    ds.labels = _LazyLabels(labels)
    return ds


def test_torchvision_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown torchvision data set 'NoSuchSet'.*FakeData"):
        TorchvisionDataset("NoSuchSet")
    with pytest.raises(FileNotFoundError, match=r"CIFAR10.*never downloads.*download=True"):
        TorchvisionDataset("CIFAR10", tmp_path)                          # an empty folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TorchvisionDataset("CIFAR10", tmp_path / "missing")
    with pytest.raises(ValueError, match="needs its folder"):
        TorchvisionDataset("CIFAR10")
    with pytest.raises(ValueError, match="has no folder"):
        TorchvisionDataset("FakeData", tmp_path)
    with pytest.raises(ValueError, match="never downloads"):
        TorchvisionDataset("CIFAR10", tmp_path, options={"download": True})
    with pytest.raises(ValueError, match="bad options.*FakeData"):
        TorchvisionDataset("FakeData", options={"no_such_option": 1})


# --------------------------------------------------------------------------- out of memory
def _oom_above(limit, calls, freed):
    """An Explainer.attribute that raises CUDA out-of-memory for more than ``limit`` items
    (after the first call, the validation's one image)."""
    orig = relprop.Explainer.attribute

    def attribute(self, x, *a, **k):
        calls.append(len(x))
        freed.append(all(ref() is None for ref in held))     # the failed attempts' tensors are gone
        if len(x) > limit and len(calls) > 1:
            scratch = torch.empty(len(x), 1000)                # "the memory the failed pass held"
            held.append(weakref.ref(scratch))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return orig(self, x, *a, **k)

    held = []
    return attribute


def test_out_of_memory_splits_the_batch_with_a_warning(data, tmp_path, monkeypatch):
    _run(data, tmp_path / "whole", batch_size=4)
    calls, freed = [], []
    monkeypatch.setattr(relprop.Explainer, "attribute", _oom_above(2, calls, freed))
    with pytest.warns(UserWarning, match="out of memory with 4 items at once: retrying with 2") as record:
        summary = _run(data, tmp_path / "split", batch_size=4)
    assert len([w for w in record if "out of memory" in str(w.message)]) == 1      # halved once, then kept
    assert calls == [1, 4, 2, 2, 2, 2, 2] and all(freed)
    assert summary["items"] == 10
    whole, split = _index(tmp_path / "whole"), _index(tmp_path / "split")
    assert [(r["id"], r["target"]) for r in split] == [(r["id"], r["target"]) for r in whole]
    for a, b in zip(whole, split):
        assert b["logit"] == pytest.approx(a["logit"], abs=1e-6)
        assert b["relevance_sum"] == pytest.approx(a["relevance_sum"], abs=1e-5)
    for a, b in zip(_shard_arrays(tmp_path / "whole", 3), _shard_arrays(tmp_path / "split", 3)):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-6, rtol=0)


def test_out_of_memory_for_a_single_image_is_a_clear_error(data, tmp_path, monkeypatch):
    calls, freed = [], []
    monkeypatch.setattr(relprop.Explainer, "attribute", _oom_above(0, calls, freed))
    with warnings.catch_warnings(record=True) as record, \
            pytest.raises(torch.cuda.OutOfMemoryError, match="even for one item at a time.*smaller --size"):
        warnings.simplefilter("always")
        _run(data, tmp_path / "out", batch_size=3)
    assert calls == [1, 3, 1] and all(freed)
    assert ["retrying with 1" in str(w.message) for w in record] == [True]
    assert not os.path.exists(shard_paths(tmp_path / "out", 0)[1])


# --------------------------------------------------------------------------- models
def test_load_model_specs_and_weights(tmp_path):
    m, pre = load_model(SPEC)
    assert isinstance(m, torch.nn.Module) and not m.training and pre == Preprocessing()     # ImageNet, 224
    assert load_model(SPEC, num_classes=7)[0][-1][-1].out_features == 7
    state = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="resnet18: no weights given, so the model has random weights"):
        r, pre = load_model("resnet18", num_classes=3)
    assert r.fc.out_features == 3 and torch.equal(torch.random.get_rng_state(), state)
    assert (pre.size, pre.resize, pre.mean) == (224, 256, (0.485, 0.456, 0.406))
    again, _ = load_model("resnet18", num_classes=3)                 # random weights, but reproducible
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), again.state_dict().values()))
    torch.save(r.state_dict(), tmp_path / "w.pth")
    r2, _ = load_model("resnet18", weights=tmp_path / "w.pth", num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), r2.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit"):
        load_model("resnet18", weights=tmp_path / "w.pth")               # 1000 classes
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_model(SPEC, weights=tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="package.module:function"):
        load_model("no_such_net")
    with pytest.raises(ValueError, match="cannot import"):
        load_model("no_such_module:f")


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A folder on the Python path with model modules: a factory that raises, a module whose import
    fails (a missing dependency, a syntax error) and a non-callable attribute."""
    folder = tmp_path / "usermods"
    folder.mkdir()
    (folder / "rp_factories.py").write_text(
        "import torch\n"
        "NOT_A_FUNCTION = 3\n"
        "def make(num_classes=10):\n    raise ValueError('depth must be even,\\n got 3')\n"
        "def make_key():\n    raise KeyError('backbone')\n"
        "def make_exit():\n    import sys\n    sys.exit('no GPU found')\n")
    (folder / "rp_exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    (folder / "rp_needs_missing.py").write_text("import rp_no_such_dependency\ndef make():\n    pass\n")
    (folder / "rp_bad_syntax.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_model_functions_that_raise_are_one_clear_error(user_modules):
    from relprop.models import ModelFunctionError

    with pytest.raises(ModelFunctionError) as info:
        load_model("rp_factories:make")
    assert str(info.value) == "rp_factories:make raised ValueError: depth must be even, got 3"
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ModelFunctionError, match=r"^rp_factories:make_key raised KeyError: 'backbone'$"):
        load_model("rp_factories:make_key")
    # sys.exit() in a factory or at its module's import is the factory failing, not relprop exiting
    with pytest.raises(ModelFunctionError, match=r"^rp_factories:make_exit raised SystemExit: no GPU found$"):
        load_model("rp_factories:make_exit")
    with pytest.raises(ModelFunctionError, match=r"^rp_exits_at_import:make: importing rp_exits_at_import raised "
                                                 r"SystemExit: 0$"):
        load_model("rp_exits_at_import:make")
    with pytest.raises(ModelFunctionError, match=r"^rp_needs_missing:make: importing rp_needs_missing raised "
                                                 r"ModuleNotFoundError: No module named 'rp_no_such_dependency'$"):
        load_model("rp_needs_missing:make")
    with pytest.raises(ModelFunctionError, match=r"^rp_bad_syntax:make: importing rp_bad_syntax raised SyntaxError"):
        load_model("rp_bad_syntax:make")
    with pytest.raises(ValueError, match=r"no module 'rp_not_there' on the Python path"):
        load_model("rp_not_there:make")
    with pytest.raises(ValueError, match=r"module 'rp_factories' has no attribute 'nope'"):
        load_model("rp_factories:nope")
    with pytest.raises(ValueError, match=r"^'rp_factories:NOT_A_FUNCTION' is a int, not a function"):
        load_model("rp_factories:NOT_A_FUNCTION")
    for spec in (":make", "rp_factories:"):
        with pytest.raises(ValueError, match=r"bad model spec .*expected 'package.module:function'"):
            load_model(spec)


@pytest.mark.parametrize("command", ["explain", "attribute"])
def test_cli_model_function_errors_are_one_line_without_traceback(command, user_modules, data, tmp_path):
    image = str(data / "img06.png")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(user_modules), str(ROOT)]))
    where = [image] if command == "explain" else ["--data", str(data)]
    for spec, line in (("rp_factories:make", "--model rp_factories:make raised ValueError: depth must be even, "
                                             "got 3"),
                       ("rp_needs_missing:make", "--model rp_needs_missing:make: importing rp_needs_missing raised "
                                                 "ModuleNotFoundError: No module named 'rp_no_such_dependency'"),
                       ("rp_bad_syntax:make", "--model rp_bad_syntax:make: importing rp_bad_syntax raised "
                                              "SyntaxError: invalid syntax (rp_bad_syntax.py, line 1)")):
        r = subprocess.run([sys.executable, "-m", "relprop.cli", command, *where, "--model", spec,
                            "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1] == f"relprop {command}: error: {line}"
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_downloads(monkeypatch):
    import torchvision.models._api

    def refuse(url, *a, **k):
        raise AssertionError(f"tried to download {url}")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_torchvision_segmentation_builders_build_without_downloading_the_backbone(no_downloads, tmp_path, capsys):
    spec = "torchvision.models.segmentation:lraspp_mobilenet_v3_large"
    with pytest.warns(UserWarning, match=f"{spec}: a torchvision model built without weights has random weights"):
        model, pre = load_model(spec, num_classes=3)
    assert model.classifier.low_classifier.out_channels == 3 and pre == Preprocessing()
    again, _ = load_model(spec, num_classes=3)              # random weights, seed 0: reproducible
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # trained weights given: no random-weights warning
        load_model(spec, weights=tmp_path / "seg.pth", num_classes=3)
    # the command line builds it, then refuses the dense output (explains classifiers only)
    err = _cli_error(["explain", str(_write_images(tmp_path / "d", 1) / "img00.png"), "--model", spec,
                      "--size", "64", "--out", str(tmp_path / "out")], capsys)
    assert "relprop explain: error: relprop explain explains classifiers, whose output is (B, classes) scores" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["shapes-vgg", "shapes-resnet"])
def test_builtin_models_with_their_preprocessing(name, tmp_path):
    untrained = builtin.build(name)
    torch.save(untrained.state_dict(), tmp_path / "w.pt")
    own, _ = load_model(name, tmp_path / "w.pt")                      # --weights PATH replaces the shipped ones
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), untrained.state_dict().values()))
    model, pre = load_model(name)
    assert pre == Preprocessing(64, 64, (0.490, 0.496, 0.501), (0.261, 0.258, 0.263))
    trained = builtin.load(name)
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ValueError, match="built-in model with 10 classes"):
        load_model(name, num_classes=3)


def test_builtin_model_explain_matches_the_benchmark_preprocessing(tmp_path, capsys):
    from relprop import viz
    from relprop.benchmark import ShapesDataset

    image = ShapesDataset(1, split="test")[0]["image"]                # (3, 64, 64) in [0, 1]
    png = tmp_path / "shape.png"
    Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()).save(png)
    assert cli.main(["explain", str(png), "--model", "shapes-resnet", "--method", "rap", "-o",
                     str(tmp_path / "maps")]) == 0
    model = builtin.load("shapes-resnet")
    x = normalise(torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1).float()[None] / 255)
    predicted = model(x).argmax(1).item()
    r = relprop.Explainer(model, "rap")(x)[0].sum(0)
    heat = np.asarray(Image.open(tmp_path / "maps" / f"shape-{predicted}-heatmap.png"))
    assert heat.shape == (64, 64, 3) and np.array_equal(heat, viz.to_rgb(r))


def _model_args(*extra):
    args = cli.build_parser().parse_args(["explain", "x.png", "-o", "out", *extra])
    return cli.load_model_from_args(args)[1]


def test_preprocessing_defaults_are_the_models_and_can_be_overridden():
    assert _model_args("--model", "shapes-vgg") == Preprocessing(64, 64, (0.490, 0.496, 0.501), (0.261, 0.258, 0.263))
    assert _model_args("--model", "resnet18") == Preprocessing(224, 256)
    assert _model_args("--model", SPEC) == Preprocessing(224, 256)
    assert _model_args("--model", "resnet18", "--size", "112") == Preprocessing(112, 128)   # ratio kept
    assert _model_args("--model", "shapes-vgg", "--size", "32", "--mean", "0.5,0.5,0.5", "--std", "1,1,1",
                       "--interpolation", "bicubic") == Preprocessing(32, 32, (0.5,) * 3, (1.0,) * 3, "bicubic")
    assert _model_args("--model", "resnet18", "--size", "100", "--resize", "100").resize == 100


def test_weights_preprocessing_comes_from_the_torchvision_weights():
    import torchvision

    assert weights_preprocessing(torchvision.models.EfficientNet_B3_Weights.DEFAULT) == Preprocessing(
        300, 320, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def test_torchvision_weights_names_load_from_the_hub_cache(torch_home, tmp_path, capsys):
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"    # file name of torchvision's url
    with pytest.raises(ValueError, match=re.escape(str(cached)) + ".*TORCH_HOME"):
        load_model("resnet18", "IMAGENET1K_V1")
    with pytest.raises(ValueError, match="has no torchvision weights 'IMAGENET1K_V9'.*IMAGENET1K_V1, DEFAULT"):
        load_model("resnet18", "IMAGENET1K_V9")
    err = _cli_error(["explain", str(tmp_path), "--model", "resnet18", "--weights", "DEFAULT", "-o",
                      str(tmp_path / "o")], capsys)
    assert f"{str(tmp_path)!r} is a folder; explain takes image files" in err          # before the weights
    err = _cli_error(["explain", str(tmp_path / "missing.png"), "--model", "resnet18", "--weights", "DEFAULT", "-o",
                      str(tmp_path / "o")], capsys)
    assert "image file(s) not found" in err
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    err = _cli_error(["explain", str(img), "--model", "resnet18", "--weights", "DEFAULT", "-o", str(tmp_path / "o")],
                     capsys)
    assert "not available offline" in err and str(cached) in err

    with torch.random.fork_rng():
        torch.manual_seed(7)
        state = __import__("torchvision").models.resnet18().state_dict()
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        model, pre = load_model("resnet18", name)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert pre == Preprocessing(224, 256)
    torch.save({"fc.weight": torch.zeros(2)}, cached)
    with pytest.raises(ValueError, match="cannot load torchvision weights"):
        load_model("resnet18", "DEFAULT")


# --------------------------------------------------------------------------- CLI
def _cli_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("work started before the arguments were validated")
    monkeypatch.setattr(attr_mod, "attribute_dataset", refuse)
    monkeypatch.setattr(relprop.Explainer, "attribute", refuse)


def _attr_args(data, out, *extra):
    return ["attribute", "--data", str(data), "--model", SPEC, "--method", "rap", "--size", str(SIZE),
            "--resize", str(SIZE), "--out", str(out), "-q", *extra]


def test_cli_validates_before_any_work(data, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    assert "does not exist" in _cli_error(_attr_args(tmp_path / "missing", out), capsys)
    (tmp_path / "empty").mkdir()
    assert "no images" in _cli_error(_attr_args(tmp_path / "empty", out), capsys)
    (tmp_path / "afile").write_text("x")
    assert "cannot write" in _cli_error(_attr_args(data, tmp_path / "afile" / "out"), capsys)
    err = _cli_error(["attribute", "--data", str(data), "--model", "no_such_net", "--out", str(out)], capsys)
    assert "unknown model 'no_such_net'" in err and "package.module:function" in err and "resnet50" in err
    assert "fcn_resnet50" not in err and "fasterrcnn" not in err and "quantized" not in err   # classifiers only
    err = _cli_error(["attribute", "--data", str(data), "--model", "fasterrcnn_resnet50_fpn", "--out", str(out)],
                     capsys)
    assert "'fasterrcnn_resnet50_fpn' is a torchvision model but not an image classifier" in err
    err = _cli_error(_attr_args(data, out, "--method", "nope"), capsys)
    assert "unknown method 'nope'" in err and "lrp-epsilon" in err
    assert "no parameter" in _cli_error(_attr_args(data, out, "--param", "bogus=1"), capsys)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert "cannot read weights" in _cli_error(_attr_args(data, out, "--weights", str(tmp_path / "junk.pth")),
                                              capsys)
    assert "topk:K" in _cli_error(_attr_args(data, out, "--targets", "topk:x"), capsys)
    assert "ImageFolder" in _cli_error(_attr_args(data, out, "--targets", "label"), capsys)
    assert not (out / "run.json").exists()


def test_weights_files_that_do_not_fit_are_explained_in_one_line(tmp_path):
    from relprop.models import load_weights
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    torch.save(small.state_dict(), tmp_path / "five.pt")
    torch.save(small, tmp_path / "whole.pt")
    (tmp_path / "junk.pt").write_bytes(b"hello world" * 20)
    errors = {}
    for name, model in [("junk.pt", small), ("whole.pt", small),
                        ("five.pt", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 7))),
                        ("five.pt", torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))]:
        with pytest.raises(ValueError) as e:
            load_weights(model, tmp_path / name)
        assert "\n" not in str(e.value)
        errors.setdefault(name, []).append(str(e.value))
    assert errors["junk.pt"][0].startswith(f"cannot read weights file {str(tmp_path / 'junk.pt')!r}: not a file "
                                           "torch.save wrote (")
    assert "holds pickled Python objects (a whole model saved with torch.save(model)?)" in errors["whole.pt"][0]
    assert "save model.state_dict() instead" in errors["whole.pt"][0]
    classes, other = errors["five.pt"]
    assert classes.endswith("2 tensors have other shapes (the first, 2.weight: (5, 4) in the file, (7, 4) in the "
                            "model); the file's output layer has 5 classes, the model's 7: build the model with 5 "
                            "classes (--num-classes 5)")
    assert other.endswith("2 of the model's 4 tensors are not in the file (1.weight, 1.bias); 2 tensors of the file "
                          "are not in the model (2.weight, 2.bias); 2 tensors have other shapes (the first, 0.weight: "
                          "(4, 3, 3, 3) in the file, (2, 2) in the model)")


def test_cli_attribute_end_to_end_and_settings_mismatch(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_attr_args(data, out, "--batch-size", "3", "--shard-size", "4", "--workers", "2")) == 0
    assert "3 shards" in capsys.readouterr().out
    _run(data, tmp_path / "api")
    assert [{k: v for k, v in r.items()} for r in _index(out)] == _index(tmp_path / "api")
    assert cli.main(_attr_args(data, out, "--batch-size", "3", "--shard-size", "4", "--float16")) == 2
    assert "different settings" in capsys.readouterr().err


def test_cli_attribute_torchvision_dataset_with_a_builtin_model(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["attribute", "--dataset", "FakeData", "--dataset-option", "size=5", "--dataset-option",
            "image_size=(3, 64, 64)", "--model", "shapes-vgg", "--targets", "label", "--batch-size", "2",
            "--shard-size", "3", "--out", str(out), "-q"]
    assert cli.main(argv) == 0
    data = json.loads((out / "run.json").read_text())["data"]
    assert data["dataset"] == "FakeData" and data["size"] == 64 and data["mean"] == [0.490, 0.496, 0.501]
    model, pre = load_model("shapes-vgg")
    ds = TorchvisionDataset("FakeData", preprocessing=pre, options={"size": 5, "image_size": (3, 64, 64)})
    attribute_dataset(model, ds, "rap", out_dir=tmp_path / "api", targets="label", batch_size=2, shard_size=3,
                      progress=False)
    index = _index(out)
    assert index == _index(tmp_path / "api")
    assert [r["id"] for r in index] == [f"FakeData[image_size=(3, 64, 64),size=5]:{i}" for i in range(5)]
    for a, b in zip(_shard_arrays(out, 2), _shard_arrays(tmp_path / "api", 2)):
        assert np.array_equal(a, b)


def test_cli_dataset_errors_come_before_any_work(tmp_path, capsys, no_work):
    out = str(tmp_path / "out")
    base = ["attribute", "--model", "shapes-vgg", "--out", out]
    assert "--data: give an image folder, or --dataset" in _cli_error(base, capsys)
    assert "unknown torchvision data set 'Nope'" in _cli_error(base + ["--dataset", "Nope"], capsys)
    assert "never downloads" in _cli_error(base + ["--dataset", "CIFAR10", "--data", str(tmp_path)], capsys)
    assert "never downloads" in _cli_error(base + ["--dataset", "FakeData", "--dataset-option", "download=True"],
                                           capsys)
    assert "--dataset-option needs --dataset" in _cli_error(base + ["--data", str(tmp_path), "--dataset-option",
                                                                    "train=False"], capsys)
    assert "expected KEY=VALUE" in _cli_error(base + ["--dataset", "FakeData", "--dataset-option", "x"], capsys)
    assert "10 classes" in _cli_error(base + ["--dataset", "FakeData", "--num-classes", "3"], capsys)
    assert not os.path.exists(os.path.join(out, "run.json"))


def test_cli_explain_writes_heatmap_and_overlay(data, tmp_path, capsys):
    img = data / "a" / "img00.png"
    out = tmp_path / "maps"
    argv = ["explain", str(img), "--model", SPEC, "--method", "rap", "--size", str(SIZE), "--resize",
            str(SIZE), "--target", "1,3", "-o", str(out)]
    assert cli.main(argv) == 0
    assert sorted(os.listdir(out)) == ["img00-1-heatmap.png", "img00-1-overlay.png",
                                       "img00-3-heatmap.png", "img00-3-overlay.png"]
    x = _dataset(data)[0][1][None]
    r = relprop.Explainer(tiny_model(), "rap")(x, 3)[0].sum(0)
    from relprop import viz
    heat = np.asarray(Image.open(out / "img00-3-heatmap.png"))
    assert np.array_equal(heat, viz.to_rgb(r))
    overlay = np.asarray(Image.open(out / "img00-3-overlay.png")).astype(int)
    rgb = viz.image_to_rgb(x[0], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).astype(int)
    assert np.abs(overlay - (rgb + heat) / 2).max() <= 1
    missing = tmp_path / "nope.png"
    err = _cli_error(["explain", str(missing), "--model", SPEC, "-o", str(out)], capsys)
    assert f"relprop explain: error: image file(s) not found: {missing}" in err


def test_cli_explain_refuses_a_folder_pointing_at_attribute(data, tmp_path, capsys, no_work):
    out = tmp_path / "maps"
    err = _cli_error(["explain", str(data), "--model", SPEC, "-o", str(out)], capsys)
    assert err.strip().splitlines()[-1] == (
        f"relprop explain: error: {str(data)!r} is a folder; explain takes image files (e.g. "
        f"{os.path.join(str(data), '*.png')}); to explain every image of a folder use: relprop attribute --data "
        f"{data} --out DIR")
    err = _cli_error(["explain", str(data / "img06.png"), str(data / "a"), str(data / "b"), "--model", SPEC,
                      "-o", str(out)], capsys)
    assert f"error: {str(data / 'a')!r} is a folder (and 1 more); explain takes image files" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["attribute", "explain"])
def test_help_is_complete_with_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert f"relprop {command}" in out.split("example", 1)[1]
    for option in ("--model", "--weights", "--method", "--param", "--size", "--resize", "--mean", "--std",
                   "--interpolation", "shapes-vgg", "shapes-resnet", "IMAGENET1K_V1", "DEFAULT", "TORCH_HOME",
                   "hub/checkpoints", "package.module:function"):
        assert option in out
    if command == "attribute":
        for word in ("--targets", "topk:K", "--shard-size", "--float16", "--workers", "index.jsonl", "run.json",
                     "torchrun", "resume", "--dataset", "--dataset-option", "FakeData", "never downloaded",
                     "np.load", "relevance_sum", "delta", "logit", "label", "target", "skipped", "ETA",
                     "images/s", "out-of-memory", "rank"):
            assert word in out


# --------------------------------------------------------------------------- distributed
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*program, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *program]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_give_the_same_index_as_one(data, tmp_path):
    out = tmp_path / "dist"
    proc = _torchrun("-m", "relprop.cli", *_attr_args(data, out, "--batch-size", "3", "--shard-size", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the summary (printed by rank 0) counts the shards of both ranks
    assert proc.stdout.count("5 shards (5 computed now, 0 already done): 10 items, 0 unreadable images skipped") == 1
    ranks = [json.loads(pathlib.Path(shard_paths(out, k)[1]).read_text())["rank"] for k in range(5)]
    assert ranks == [0, 1, 0, 1, 0]                              # shard k by rank k % 2
    _run(data, tmp_path / "single", shard_size=2)
    assert _index(out) == _index(tmp_path / "single")
    for a, b in zip(_shard_arrays(out, 5), _shard_arrays(tmp_path / "single", 5)):
        assert np.array_equal(a, b)


def test_a_failing_rank_stops_every_rank_and_the_run_resumes(data, tmp_path, capsys):
    out = tmp_path / "dist"
    argv = _attr_args(data, out, "--batch-size", "3", "--shard-size", "2")
    # rank 1 fails in its second shard (shard 3); rank 0 must not wait for it forever
    proc = _torchrun(__file__, "--fail-rank", "1", *argv)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank 1 of 2 failed: RuntimeError: injected failure (seen by rank {rank}" in log, log[-3000:]
    assert not (out / "index.jsonl").exists()
    finished = [k for k in range(5) if os.path.exists(shard_paths(out, k)[1])]
    assert 3 not in finished and {0, 1} <= set(finished)
    for k in finished:                                      # every finished shard is complete and loads
        meta = json.loads(pathlib.Path(shard_paths(out, k)[1]).read_text())
        assert np.load(shard_paths(out, k)[0]).shape[0] == len(meta["items"]) == 2
    stamps = {k: os.stat(shard_paths(out, k)[0]).st_mtime_ns for k in finished}

    assert cli.main(argv) == 0                              # resume in one process
    assert f"5 shards ({5 - len(finished)} computed now, {len(finished)} already done)" in capsys.readouterr().out
    assert {k: os.stat(shard_paths(out, k)[0]).st_mtime_ns for k in finished} == stamps
    _run(data, tmp_path / "single", shard_size=2)
    index = _index(out)
    assert [r["index"] for r in index] == list(range(10))  # every image exactly once
    assert index == _index(tmp_path / "single")
    for a, b in zip(_shard_arrays(out, 5), _shard_arrays(tmp_path / "single", 5)):
        assert np.array_equal(a, b)


def test_more_processes_than_gpus_is_a_clear_error(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    with pytest.raises(RuntimeError, match=r"local rank 1 needs GPU 1 but 1 GPU\(s\) are visible.*--nproc-per-node 1"):
        _run(data, tmp_path / "out")


if __name__ == "__main__":
    # a torchrun worker for the test above: `test_attribute.py --fail-rank R relprop-attribute-args...`
    # runs `relprop attribute`, failing in rank R's third call of Explainer.attribute (the first is the
    # validation's, before anything is written; the second is its first shard's)
    assert sys.argv[1] == "--fail-rank"
    if int(os.environ["RANK"]) == int(sys.argv[2]):
        _orig, _calls = relprop.Explainer.attribute, []

        def _failing(self, x, *a, **k):
            _calls.append(len(x))
            if len(_calls) == 3:
                raise RuntimeError("injected failure")
            return _orig(self, x, *a, **k)

        relprop.Explainer.attribute = _failing
    sys.exit(cli.main(sys.argv[3:]))


def test_untrustworthy_maps_are_marked_in_the_index_with_one_warning_for_the_run(tmp_path, recwarn):
    """RAP's residual splits on the built-in ResNet nearly cancel: the index marks those maps
    ("reported", with the estimate) and the run warns once, not once per batch."""
    from relprop.benchmark import models, shapes
    pre = Preprocessing(64, 64, mean=shapes.MEAN, std=shapes.STD)
    ds = TorchvisionDataset("FakeData", preprocessing=pre, options={"size": 6, "image_size": (3, 64, 64)})
    model = models.load("shapes-resnet")
    attribute_dataset(model, ds, "rap", out_dir=tmp_path / "out", batch_size=2, shard_size=4, progress=False)
    index = _index(tmp_path / "out")
    x = torch.stack([ds[i][1] for i in range(6)])
    with relprop.explainer.reported_maps_quiet():
        att = relprop.Explainer(model, "rap").attribute(x)
    assert [r["reported"] for r in index] == (att.error > 1e-3).tolist()
    assert sum(r["reported"] for r in index) >= 3
    run_warnings = [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert run_warnings == [f"{sum(r['reported'] for r in index)} map(s) may be numerically untrustworthy (estimated "
                            "relative error above the trusted bound): their index lines have \"reported\": true "
                            "(README, Numerics)"]
