"""Attributing image folders: relprop.images, relprop.attribute, ``relprop attribute``/``explain``."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import relprop
from relprop import attribute as attr_mod
from relprop import cli, demo
from relprop.attribute import attribute_dataset, shard_paths
from relprop.images import ImageFolderDataset, Preprocessing, list_images
from relprop.models import load_model

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


# --------------------------------------------------------------------------- end to end
def test_shards_equal_the_explainer_on_the_same_batches(data, tmp_path):
    out = tmp_path / "out"
    summary = _run(data, out)
    assert summary == {"shards": 3, "done": 3, "skipped_shards": 0, "items": 10, "skipped_images": 0}
    ds, model = _dataset(data), tiny_model()
    explainer = relprop.Explainer(model, "rap")
    arrays = _shard_arrays(out, 3)
    index = _index(out)
    assert [r["index"] for r in index] == list(range(10))
    assert [r["path"] for r in index] == ds.paths
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
    assert calls == [6, 2, 6, 2, 4]              # batches of 3 (shards of 4) images, repeated twice
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
        if kill[0] and len(calls) == 3:                      # shard 0 = batches 1-2; die inside shard 1
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
    assert calls == [3, 1, 2]                    # shards 1 and 2 only
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


# --------------------------------------------------------------------------- models
def test_load_model_specs_and_weights(tmp_path):
    m, pre = load_model(SPEC)
    assert isinstance(m, torch.nn.Module) and not m.training and pre == Preprocessing()     # ImageNet, 224
    assert load_model(SPEC, num_classes=7)[0][-1][-1].out_features == 7
    state = torch.random.get_rng_state()
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
    err = _cli_error(_attr_args(data, out, "--method", "nope"), capsys)
    assert "unknown method 'nope'" in err and "lrp-epsilon" in err
    assert "no parameter" in _cli_error(_attr_args(data, out, "--param", "bogus=1"), capsys)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert "cannot read weights" in _cli_error(_attr_args(data, out, "--weights", str(tmp_path / "junk.pth")),
                                              capsys)
    assert "topk:K" in _cli_error(_attr_args(data, out, "--targets", "topk:x"), capsys)
    assert "ImageFolder" in _cli_error(_attr_args(data, out, "--targets", "label"), capsys)
    assert not (out / "run.json").exists()


def test_cli_attribute_end_to_end_and_settings_mismatch(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_attr_args(data, out, "--batch-size", "3", "--shard-size", "4", "--workers", "2")) == 0
    assert "3 shards" in capsys.readouterr().out
    _run(data, tmp_path / "api")
    assert [{k: v for k, v in r.items()} for r in _index(out)] == _index(tmp_path / "api")
    assert cli.main(_attr_args(data, out, "--batch-size", "3", "--shard-size", "4", "--float16")) == 2
    assert "different settings" in capsys.readouterr().err


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
    assert _cli_error(["explain", str(tmp_path / "nope.png"), "--model", SPEC, "-o", str(out)], capsys)


@pytest.mark.parametrize("command", ["attribute", "explain"])
def test_help_is_complete_with_an_example(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert f"relprop {command}" in out.split("example", 1)[1]
    for option in ("--model", "--weights", "--method", "--param", "--size", "--resize"):
        assert option in out
    if command == "attribute":
        for word in ("--targets", "topk:K", "--shard-size", "--float16", "--workers", "index.jsonl", "run.json",
                     "torchrun", "resume"):
            assert word in out


# --------------------------------------------------------------------------- distributed
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_index_as_one(data, tmp_path):
    out = tmp_path / "dist"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "relprop.cli", *_attr_args(data, out, "--batch-size", "3", "--shard-size", "2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(pathlib.Path(shard_paths(out, k)[1]).read_text())["rank"] for k in range(5)]
    assert ranks == [0, 1, 0, 1, 0]                              # shard k by rank k % 2
    _run(data, tmp_path / "single", shard_size=2)
    assert _index(out) == _index(tmp_path / "single")
    for a, b in zip(_shard_arrays(out, 5), _shard_arrays(tmp_path / "single", 5)):
        assert np.array_equal(a, b)
