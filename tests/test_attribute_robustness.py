"""``relprop attribute`` / ``explain`` never leave a blocked or corrupt folder (issue 12, part 3).

Validation before anything is written, whole shards (fsync + rename, checksums, damaged
shards redone), write errors and Ctrl-C as one line, float16 overflow, explain's output
names, symbolic-link loops, unreadable data sets, torchrun summaries and working-directory
independent index paths.
"""
import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import relprop
from relprop import attribute as attr_mod
from relprop import cli
from relprop.attribute import attribute_dataset, shard_paths
from relprop.images import ImageFolderDataset, list_images
from relprop.models import load_model
from test_attribute import (SIZE, SPEC, _attr_args, _dataset, _index, _one_thread, _run, _shard_arrays,  # noqa: F401
                            _write_images, data, labelled, tiny_model)

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESUME = "finished shards are kept: fix this, then run the same command again to resume"


def _cli(argv, capsys):
    """(exit status, stderr lines) of ``relprop ARGV`` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def _fake_args(out, *extra, size=3):
    """``relprop attribute`` on FakeData 64x64 with the built-in shapes-vgg, one image per shard."""
    return ["attribute", "--dataset", "FakeData", "--dataset-option", f"size={size}", "--dataset-option",
            "image_size=(3, 64, 64)", "--model", "shapes-vgg", "--shard-size", "1", "--batch-size", "1",
            "--out", str(out), "-q", *extra]


def _subprocess(argv, prefix=(), **kw):
    return subprocess.run([*prefix, sys.executable, "-m", "relprop.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def _stamps(out, shards):
    return {k: [os.stat(p).st_mtime_ns for p in shard_paths(out, k)] for k in shards}


def _tmp_files(out):
    return sorted(p.name for p in pathlib.Path(out).rglob("*.tmp"))


def _user_warnings(record):
    """The messages of relprop's own warnings (not the Explainer's numerical RuntimeWarnings)."""
    return [str(w.message) for w in record if w.category is UserWarning]


def _whole(out, k):
    """Shard k's .npy is the one its .json describes (size, shape, dtype and sha256)."""
    npy, js = shard_paths(out, k)
    meta = json.loads(pathlib.Path(js).read_text())
    raw = pathlib.Path(npy).read_bytes()
    arr = np.load(npy)
    return (len(raw) == meta["bytes"] and hashlib.sha256(raw).hexdigest() == meta["sha256"]
            and list(arr.shape) == meta["shape"] and arr.dtype.name == meta["dtype"]
            and arr.shape[0] == len(meta["items"]))


# --------------------------------------------------------------------------- validation before writing
def test_bad_targets_and_parameters_are_refused_before_anything_is_written(data, labelled, tmp_path, capsys):
    out = tmp_path / "out"
    for targets, message in [
            ("99", "targets '99': class 99 is out of range: the model has 4 classes (0 to 3)"),
            ("1,7", "targets '1,7': class 7 is out of range: the model has 4 classes (0 to 3)"),
            ("topk:1000000", "targets 'topk:1000000': the model has only 4 classes")]:
        code, err = _cli(_attr_args(data, out, "--targets", targets), capsys)
        assert not out.exists()
        assert (code, err) == (2, [f"relprop attribute: error: {message}"])
    # --param epsilon=abc: refused by the Explainer's parameter check or, at the latest, by the
    # validation's explanation of the first image; either way nothing is written
    code, err = _cli(_attr_args(data, out, "--method", "lrp-epsilon", "--param", "epsilon=abc"), capsys)
    assert code == 2 and err[-1].startswith("relprop attribute: error: ") and "epsilon" in err[-1]
    assert "Traceback" not in "\n".join(err) and not out.exists()
    # more class folders than the model has classes
    code, err = _cli(_attr_args(labelled, out, "--targets", "label", "--num-classes", "2"), capsys)
    assert (code, err) == (2, ["relprop attribute: error: targets 'label': the data set has the label 2 but the "
                               "model has 2 classes (0 to 1)"])
    assert not out.exists()
    # the corrected command runs in the same folder
    assert _cli(_attr_args(data, out, "--targets", "3", "--shard-size", "4"), capsys)[0] == 0
    assert [r["target"] for r in _index(out)] == [3] * 10


def test_param_values_are_parsed_as_numbers_where_they_are(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["attribute", "--model", "m", "--out", "o", "--param", "epsilon= 1e-2",
                              "--param", "ratio=2", "--param", "name=abc", "--param", "flag=True",
                              "--param", "big=inf", "--param", "odd={1}"])
    params = cli._params(args.subparser, args.param, json_only=True)
    assert params == {"epsilon": 0.01, "ratio": 2, "name": "abc", "flag": True, "big": float("inf"), "odd": "{1}"}
    with pytest.raises(SystemExit):
        cli._params(args.subparser, ["epsilon=1", "epsilon=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "relprop attribute: error: --param: epsilon is given twice"


def test_a_data_set_none_of_whose_images_can_be_read_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("a.png", "b.png", "c.jpg"):
        (bad / name).write_bytes(b"not an image")
    first_error = ImageFolderDataset(bad)[0][2]
    assert first_error.startswith("UnidentifiedImageError: ")
    code, err = _cli(_attr_args(bad, tmp_path / "out"), capsys)
    assert (code, err) == (2, [f"relprop attribute: error: none of the 3 images can be read (the first, a.png: "
                               f"{first_error})"])
    assert not (tmp_path / "out").exists()


def test_out_of_memory_in_the_validation_is_the_clear_one_item_error(data, tmp_path, monkeypatch):
    def oom(self, x, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(relprop.Explainer, "attribute", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="even for one item at a time.*smaller --size"):
        _run(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- whole shards
def test_every_file_is_flushed_to_disk_before_it_is_renamed(data, tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    out = tmp_path / "out"
    _run(data, out)
    renames = [(i, e) for i, e in enumerate(events) if e[0] == "replace"]
    names = sorted(os.path.relpath(e[2], out) for _, e in renames)
    assert names == sorted(["run.json", "index.jsonl"] + [f"shards/shard-0000{k}.{x}" for k in range(3)
                                                          for x in ("npy", "json")])
    for i, (_, inode, dst) in renames:
        assert ("fsync", inode) in events[:i], dst                         # the data, before the rename
        folder = os.stat(os.path.dirname(dst)).st_ino
        assert ("fsync", folder) in events[i + 1:], dst                    # the rename itself, after it


def test_damaged_shards_are_computed_again_with_a_warning(data, tmp_path):
    out = tmp_path / "out"
    _run(data, out, shard_size=1)
    npy, js = zip(*[shard_paths(out, k) for k in range(10)])
    size = os.path.getsize(npy[0])
    with open(npy[0], "r+b") as f:                          # 0: truncated (a copy cut short)
        f.truncate(size - 100)
    raw = bytearray(pathlib.Path(npy[1]).read_bytes())      # 1: a flipped byte in the data
    raw[-7] ^= 0xFF
    pathlib.Path(npy[1]).write_bytes(bytes(raw))
    os.unlink(npy[2])                                       # 2: the .npy is missing
    pathlib.Path(js[3]).write_text("")                      # 3: an empty .json
    pathlib.Path(js[4]).write_text('{"shard": 4, "fi')      # 4: a cut .json
    meta = json.loads(pathlib.Path(js[5]).read_text())      # 5: made under another run.json
    meta["settings"] = "0" * 64
    pathlib.Path(js[5]).write_text(json.dumps(meta))
    with open(npy[6], "r+b") as f:                          # 6: a header that says another shape
        head = f.read(128)
        f.seek(0)
        f.write(head.replace(b"(1, 3, 32, 32)", b"(1, 3, 32, 31)"))
    kept = _stamps(out, range(7, 10))
    try:
        json.loads(pathlib.Path(js[4]).read_text())
    except ValueError as e:
        cut = str(e)
    with pytest.warns(UserWarning) as record:
        summary = _run(data, out, shard_size=1)
    assert _user_warnings(record) == [f"shard {k} is damaged: {problem}; computing it again"
                                                for k, problem in [
        (0, f"{npy[0]} has {size - 100} bytes, {size} expected"),
        (1, f"{npy[1]} fails its checksum (sha256 recorded in {js[1]})"),
        (2, f"{npy[2]} is missing"),
        (3, f"{js[3]} is empty"),
        (4, f"{js[4]} is not valid JSON ({cut})"),
        (5, f"{js[5]} was made with other settings than run.json"),
        (6, f"{npy[6]} holds a float32 array of shape (1, 3, 32, 31), not float32 (1, 3, 32, 32)")]]
    assert summary == {"shards": 10, "done": 7, "skipped_shards": 3, "items": 10, "skipped_images": 0,
                       "batch_size": 3}
    assert _stamps(out, range(7, 10)) == kept
    _run(data, tmp_path / "fresh", shard_size=1)
    assert _index(out) == _index(tmp_path / "fresh")
    for a, b in zip(_shard_arrays(out, 10), _shard_arrays(tmp_path / "fresh", 10)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert all(_whole(out, k) for k in range(10))


def test_temporary_files_of_dead_runs_are_removed(data, tmp_path):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = attr_mod._HOST
    stale = [f"shards/.shard-00001.npy.{dead.pid}-{host}.0123abcd.tmp",     # a dead process here
             f"shards/.shard-00002.json.{dead.pid}.89abcdef.tmp",           # relprop's older name
             f".run.json.{os.getpid()}-another_host.deadbeef.tmp"]          # another machine's
    alive = [f"shards/.shard-00003.npy.{os.getppid()}-{host}.00000000.tmp",  # a live process's
             "shards/notes.tmp", "mine.tmp"]                                # not relprop's
    for name in stale + alive:
        (out / name).write_bytes(b"partial")
    _run(data, out)
    assert _tmp_files(out) == sorted(os.path.basename(n) for n in alive)


def test_a_corrupt_run_json_is_named_with_what_to_do(data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _attr_args(data, out, "--shard-size", "4")
    assert _cli(argv, capsys)[0] == 0
    kept = _stamps(out, range(3))
    advice = ("delete it and run the command again (the finished shards made with the same settings are kept, "
              "the others are computed again)")
    (out / "run.json").write_text("")
    assert _cli(argv, capsys) == (2, [f"relprop attribute: error: {out / 'run.json'} is empty: {advice}"])
    (out / "run.json").write_text('{"format": 2, "meth')
    with pytest.raises(ValueError) as cut:
        json.loads('{"format": 2, "meth')
    assert _cli(argv, capsys) == (2, [f"relprop attribute: error: {out / 'run.json'} is corrupt ({cut.value}): "
                                      f"{advice}"])
    # following the advice: the same command keeps every shard ...
    (out / "run.json").unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "3 shards (0 computed now, 3 already done)" in capsys.readouterr().out
    assert _stamps(out, range(3)) == kept
    # ... and another command computes every shard again
    (out / "run.json").unlink()
    with pytest.warns(UserWarning, match="was made with other settings than run.json") as record:
        assert cli.main(argv + ["--targets", "2"]) == 0
    assert _user_warnings(record) == [f"shard {k} is damaged: {shard_paths(out, k)[1]} was made with other "
                                      "settings than run.json; computing it again" for k in range(3)]
    assert [r["target"] for r in _index(out)] == [2] * 10


# --------------------------------------------------------------------------- write errors and Ctrl-C
def _partial_fake_run(out, capsys, size=3):
    """A finished FakeData run whose last shard is then unfinished (its .json removed)."""
    assert cli.main(_fake_args(out, size=size)) == 0
    capsys.readouterr()
    os.unlink(shard_paths(out, size - 1)[1])
    return _stamps(out, range(size - 1))


def test_a_full_disk_ends_with_one_line_and_keeps_the_finished_shards(tmp_path, capsys):
    out = tmp_path / "out"
    kept = _partial_fake_run(out, capsys)
    # 16 KiB per file: run.json (kept) fits, the 48 KiB shard does not: write() fails with EFBIG
    proc = _subprocess(_fake_args(out), prefix=("bash", "-c", "trap '' XFSZ; ulimit -f 16; exec \"$@\"", "bash"))
    npy = shard_paths(out, 2)[0]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"relprop attribute: error: cannot write {npy}: "
                                                f"{os.strerror(errno.EFBIG)}; {RESUME}"]
    assert _stamps(out, range(2)) == kept and all(_whole(out, k) for k in range(2))
    assert not os.path.exists(shard_paths(out, 2)[1]) and not (out / "index.jsonl").exists()
    assert _tmp_files(out) == []
    assert cli.main(_fake_args(out)) == 0                                   # room again: resumes
    assert "3 shards (1 computed now, 2 already done)" in capsys.readouterr().out


def test_a_read_only_shards_folder_ends_with_one_line_and_keeps_the_finished_shards(tmp_path, capsys):
    out = tmp_path / "out"
    kept = _partial_fake_run(out, capsys)
    shards = out / "shards"
    if os.geteuid() == 0:                  # root writes through permissions: a read-only bind mount instead
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare (util-linux) to mount the folder read-only as root")
        prefix = ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(shards))
        reason = os.strerror(errno.EROFS)
    else:
        shards.chmod(0o555)
        prefix, reason = (), os.strerror(errno.EACCES)
    try:
        proc = _subprocess(_fake_args(out), prefix=prefix)
    finally:
        shards.chmod(0o755)
    if "mount" in proc.stderr and proc.returncode != 1:
        pytest.skip(f"cannot mount read-only here: {proc.stderr.strip()}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"relprop attribute: error: cannot write to {shards}: {reason}; "
                                                f"{RESUME}"]
    assert _stamps(out, range(2)) == kept and all(_whole(out, k) for k in range(2))
    assert _tmp_files(out) == []


def test_a_file_named_shards_is_reported_before_anything_is_written(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").write_text("not a folder")
    assert _cli(_attr_args(data, out), capsys) == (1, [f"relprop attribute: error: {out / 'shards'} exists but "
                                                       "is not a folder: move it away or use another output folder"])
    assert sorted(os.listdir(out)) == ["shards"]


def test_ctrl_c_ends_with_one_line_and_keeps_the_finished_shards(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "relprop.cli", *_fake_args(out, size=500)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(shard_paths(out, 2)[1]) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == ["relprop attribute: interrupted; finished shards are kept: run the same "
                                           "command again to resume"]
    finished = [k for k in range(500) if os.path.exists(shard_paths(out, k)[1])]
    assert finished == list(range(len(finished))) and len(finished) >= 3
    assert all(_whole(out, k) for k in finished)
    assert _tmp_files(out) == [] and not (out / "index.jsonl").exists()


# --------------------------------------------------------------------------- float16
def test_float16_overflow_keeps_the_shard_in_float32_with_a_warning(data, tmp_path, monkeypatch):
    _run(data, tmp_path / "f32")
    orig, calls = relprop.Explainer.attribute, []

    def huge_for_item_7(self, x, *a, **k):     # calls: the validation, then batches 0-2, 3, 4-6, 7, 8-9
        att = orig(self, x, *a, **k)
        calls.append(len(x))
        if len(calls) == 5:
            att.relevance.mul_(1e5 / att.relevance.abs().max())
        return att

    monkeypatch.setattr(relprop.Explainer, "attribute", huge_for_item_7)
    with pytest.warns(UserWarning) as record:
        _run(data, tmp_path / "f16", dtype="float16")
    assert _user_warnings(record) == [
        "shard 1 is stored as float32, not float16: item img07.png has relevance values up to |R| = 100000, "
        "beyond float16's largest value 65504 (its .json and index lines say dtype float32)"]
    a32, a16 = _shard_arrays(tmp_path / "f32", 3), _shard_arrays(tmp_path / "f16", 3)
    assert [a.dtype.name for a in a16] == ["float16", "float32", "float16"]
    assert np.isfinite(a16[1]).all() and np.abs(a16[1]).max() == pytest.approx(1e5, rel=1e-6)
    assert np.array_equal(a16[1][:3], a32[1][:3].astype(np.float16).astype(np.float32))
    assert np.allclose(a16[1][3], a32[1][3] * (1e5 / np.abs(a32[1][3]).max()), rtol=1e-6, atol=0)
    for k in (0, 2):
        assert np.array_equal(a16[k], a32[k].astype(np.float16))
    metas = [json.loads(pathlib.Path(shard_paths(tmp_path / "f16", k)[1]).read_text()) for k in range(3)]
    assert [m["dtype"] for m in metas] == ["float16", "float32", "float16"]
    assert [r["dtype"] for r in _index(tmp_path / "f16")] == ["float16"] * 4 + ["float32"] * 4 + ["float16"] * 2
    assert all(r["dtype"] == "float32" for r in _index(tmp_path / "f32"))


# --------------------------------------------------------------------------- explain, data folders
def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


def test_explain_gives_images_with_the_same_name_distinct_outputs(tmp_path, capsys):
    a, b = _png(tmp_path / "a" / "pic.png", 1), _png(tmp_path / "b" / "pic.png", 2)
    out = tmp_path / "maps"
    assert cli.main(["explain", str(a), str(b), str(a), "--model", SPEC, "--size", str(SIZE), "--resize",
                     str(SIZE), "--target", "1", "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["a_pic-1-heatmap.png", "a_pic-1-overlay.png",
                                       "b_pic-1-heatmap.png", "b_pic-1-overlay.png"]
    from relprop import viz
    explainer = relprop.Explainer(tiny_model(), "rap")
    for name, path in (("a_pic", a), ("b_pic", b)):
        x = relprop.images.Preprocessing(SIZE, SIZE).load(path)[None]
        heat = np.asarray(Image.open(out / f"{name}-1-heatmap.png"))
        assert np.array_equal(heat, viz.to_rgb(explainer(x, 1)[0].sum(0)))
    assert capsys.readouterr().out.count("-> ") == 2                    # the repeated file: explained once


def test_explain_writes_nothing_on_errors_and_ends_with_one_line(data, tmp_path, capsys, monkeypatch):
    img = data / "a" / "img00.png"
    out = tmp_path / "maps"
    argv = ["explain", str(img), "--model", SPEC, "--size", str(SIZE), "--resize", str(SIZE), "-o", str(out)]
    code, err = _cli(argv + ["--method", "lrp-epsilon", "--param", "epsilon=abc"], capsys)
    assert code == 2 and "epsilon" in err[-1] and not out.exists()
    for bad in ("9", "1,4"):              # named as the option, like attribute's --targets
        code, err = _cli(argv + [f"--target={bad}"], capsys)
        wrong = bad.split(",")[-1]
        assert (code, err[-1]) == (2, f"relprop explain: error: --target: class {wrong} is out of range: the model "
                                      "has 4 classes (0 to 3)")
        assert not out.exists()
    code, err = _cli(argv + ["--target=-1"], capsys)
    assert (code, err[-1]) == (2, "relprop explain: error: --target: targets [-1]: need at least one class index, "
                                  "all >= 0")
    code, err = _cli(argv + ["--target", "label"], capsys)
    assert (code, err[-1]) == (2, "relprop explain: error: --target: label needs a data set with labels: use "
                                  "relprop attribute --data DIR --targets label")
    assert not out.exists()

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(relprop.viz, "write_atomic", full_disk)
    code, err = _cli(argv + ["--target", "1"], capsys)
    assert (code, err) == (1, [f"relprop explain: error: cannot write {out / 'img00-1-heatmap.png'}: "
                               "No space left on device"])

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(relprop.Explainer, "attribute", interrupted)
    assert _cli(argv, capsys) == (130, ["relprop explain: interrupted"])


def test_output_names_are_distinct_case_insensitively():
    assert cli._output_stems(["x/a.png", "y/b.png"]) == ["a", "b"]
    assert cli._output_stems(["d/a/x.png", "d/b/x.png", "d/a_x.png"]) == ["a_x", "b_x", "a_x~2"]
    assert cli._output_stems(["d/x.png", "d/X.jpg"]) == ["x_png", "X_jpg"]
    assert cli._output_stems(["d/sub/x.png", "d/x.png"]) == ["sub_x", "x"]


def test_a_symbolic_link_loop_in_the_data_folder_is_followed_once(tmp_path):
    root = tmp_path / "data"
    _png(root / "a.png", 1)
    _png(root / "sub" / "b.png", 2)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)       # sub/loop -> data
    paths, labels, _ = list_images(root)
    assert [os.path.relpath(p, root) for p in paths] == ["a.png", "sub/b.png"]
    assert labels is None and len(ImageFolderDataset(root)) == 2
    # two links to one folder: listed once, at the first path in sorted order
    twice = tmp_path / "twice"
    _png(twice / "sub" / "b.png", 2)
    (twice / "again").symlink_to(twice / "sub", target_is_directory=True)
    assert [os.path.relpath(p, twice) for p in list_images(twice)[0]] == ["again/b.png"]


def test_index_paths_are_relative_to_the_data_folder_whatever_the_working_directory(data, tmp_path, capsys,
                                                                                   monkeypatch):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    args = ["--batch-size", "3", "--shard-size", "4"]
    assert cli.main(_attr_args(os.path.relpath(data), "out", *args)) == 0
    for k in (1, 2):
        os.unlink(shard_paths(tmp_path / "out", k)[1])
    monkeypatch.chdir(work)                                                 # resume from elsewhere
    assert cli.main(_attr_args(os.path.relpath(data), os.path.relpath(tmp_path / "out"), *args)) == 0
    assert "3 shards (2 computed now, 1 already done)" in capsys.readouterr().out
    ds = _dataset(data)
    assert [r["path"] for r in _index(tmp_path / "out")] == [os.path.relpath(p, data) for p in ds.paths]


# --------------------------------------------------------------------------- API
def test_the_api_raises_output_error_naming_the_file(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        if "w" in mode or "x" in mode:
            if os.path.basename(os.fspath(path)).startswith(".shard-00001.npy"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(attr_mod.OutputError) as info:
        attribute_dataset(tiny_model(), _dataset(data), "rap", out_dir=out, batch_size=3, shard_size=4,
                          progress=False)
    assert str(info.value) == f"cannot write {shard_paths(out, 1)[0]}: No space left on device; {RESUME}"
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert _whole(out, 0) and not os.path.exists(shard_paths(out, 1)[1]) and _tmp_files(out) == []


def test_explain_takes_predicted_and_topk_targets_like_attribute(data, tmp_path, capsys):
    img = data / "a" / "img00.png"
    argv = ["explain", str(img), "--model", SPEC, "--size", str(SIZE), "--resize", str(SIZE), "--method", "rap"]
    model, _ = load_model(SPEC)
    pre = relprop.images.Preprocessing(SIZE, SIZE)
    with torch.no_grad():
        top = model.eval()(pre.load(str(img))[None])[0].topk(2).indices.tolist()
    assert cli.main(argv + ["--target", "topk:2", "-o", str(tmp_path / "top")]) == 0
    assert sorted(p.name for p in (tmp_path / "top").glob("*-heatmap.png")) == sorted(
        f"img00-{c}-heatmap.png" for c in top)
    assert cli.main(argv + ["--targets", "predicted", "-o", str(tmp_path / "pred")]) == 0
    assert [p.name for p in (tmp_path / "pred").glob("*-heatmap.png")] == [f"img00-{top[0]}-heatmap.png"]
    capsys.readouterr()
    for bad, message in (("topk:5", "--target: topk:5: the model has only 4 classes"),
                         ("topk:0", "--target: targets 'topk:0': topk:K needs an integer K >= 1")):
        code, err = _cli(argv + ["--target", bad, "-o", str(tmp_path / "bad")], capsys)
        assert (code, err[-1]) == (2, f"relprop explain: error: {message}") and not (tmp_path / "bad").exists()


def test_explain_names_the_image_whose_maps_may_be_untrustworthy(tmp_path):
    """The per-call warning would say "sample(s) [0]"; explain says which image and class."""
    img = _png(tmp_path / "noise.png", 3)
    with pytest.warns(RuntimeWarning) as caught:
        assert cli.main(["explain", str(img), "--model", "shapes-resnet", "--method", "rap", "--target", "0,1,2",
                         "-o", str(tmp_path / "maps")]) == 0
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "sample(s)" in m]
    assert len(messages) == 1
    assert re.fullmatch(rf"{re.escape(str(img))}: the map\(s\) for class\(es\) \[[012, ]+\] may be numerically "
                        r"untrustworthy \(estimated relative error up to ~\de[+-]\d\d; README, Numerics\)", messages[0])


def test_cli_warnings_are_one_line_without_python_source_lines(tmp_path):
    """Run as a user runs it (a subprocess): the warning is one line, no file:line, no source."""
    img = _png(tmp_path / "noise.png", 3)
    proc = subprocess.run([sys.executable, "-m", "relprop.cli", "explain", str(img), "--model", "shapes-resnet",
                           "--method", "rap", "--target", "0", "-o", str(tmp_path / "maps")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"relprop explain: warning: {img}: the map(s) for class(es) [0]")
