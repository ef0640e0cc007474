"""The ``relprop`` command line and the synthetic-shapes demo behind ``relprop demo``."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import relprop
from relprop import cli, demo, viz


def _exit_code(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


def test_help_explains_relprop(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "relevance propagation" in out
    for command in ("demo", "methods", "backends"):
        assert command in out
    assert "relprop demo --methods" in out                       # an example line


@pytest.mark.parametrize("command", ["demo", "methods", "backends"])
def test_every_subcommand_has_help_with_an_example(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: relprop {command}" in out
    assert "example" in out and f"relprop {command}" in out.split("example", 1)[1]


def test_demo_help_documents_every_option(capsys):
    _exit_code(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ("--out", "--methods", "--images", "--seed", "--steps", "relprop-demo", "heatmaps.png"):
        assert option in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: relprop" in capsys.readouterr().err


def test_methods_lists_every_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    lines = [line for line in out if not line.lstrip().startswith("parameters (--param KEY=VALUE): ")]
    methods = relprop.available_methods()
    assert len(methods) == 19 and len(lines) == len(methods)
    assert {"lrp-gamma", "lrp-epsilon-gamma-box", "gradcam", "rap-split"} <= {line.split()[0] for line in lines}
    for line, (name, summary) in zip(lines, methods.items()):
        assert line.split()[0] == name
        assert line.rstrip().endswith(summary)
    # each method's parameter line, right under it, gives the defaults Explainer uses
    params, name = {}, None
    for line in out:
        if line.lstrip().startswith("parameters (--param KEY=VALUE): "):
            params[name] = line.strip()
        else:
            name = line.split()[0]
    assert params["lrp-epsilon"].startswith("parameters (--param KEY=VALUE): epsilon=")
    assert "ratio=" in params["ae"] and "gradient" not in params
    for name, line in params.items():
        defaults = relprop.Explainer(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten()),
                                     name).method.params()
        assert line == "parameters (--param KEY=VALUE): " + ", ".join(f"{k}={v!r}" for k, v in defaults.items())


def test_backends_reports_availability_and_reasons(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.strip().splitlines()}
    assert set(lines) == set(relprop.backends())
    assert "unavailable" not in lines["torch"] and "available" in lines["torch"]
    for name, info in relprop.backends().items():
        if not info["available"]:
            assert "unavailable" in lines[name] and info["reason"] in lines[name]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the demo starts drawing data or training."""
    def refuse(*a, **k):
        raise AssertionError("the demo started working before validating its arguments")
    monkeypatch.setattr(demo, "make_shapes", refuse)
    monkeypatch.setattr(demo, "train", refuse)


def test_unknown_method_exits_2_naming_it_and_the_valid_ones(tmp_path, capsys, no_training):
    out = tmp_path / "out"
    assert _exit_code(["demo", "--out", str(out), "--methods", "rap,lrp-epsilonn"]) == 2
    err = capsys.readouterr().err
    assert "'lrp-epsilonn'" in err and "unknown method" in err
    assert "'rap'" not in err                                      # only the bad name is reported as unknown
    for name in relprop.available_methods():
        assert name in err
    assert not out.exists()


def test_unwritable_output_folder_exits_2_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert _exit_code(["demo", "--out", str(blocker / "sub"), "--methods", "rap"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "sub" in err


@pytest.mark.parametrize("args, message", [
    (["--images", "0"], "relprop demo: error: argument --images: must be >= 1, got 0"),
    (["--steps", "-1"], "relprop demo: error: argument --steps: must be >= 0, got -1"),
    (["--images", "two"], "relprop demo: error: argument --images: not an integer: 'two'"),
])
def test_bad_numbers_exit_2(args, message, tmp_path, capsys, no_training):
    assert _exit_code(["demo", "--out", str(tmp_path)] + args) == 2
    assert message in capsys.readouterr().err


def test_tiny_demo_writes_grid_and_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "TRAIN_IMAGES", 64)
    monkeypatch.setattr(demo, "TEST_IMAGES", 16)
    out = tmp_path / "demo"
    methods = ["rap", "lrp-epsilon", "gradient"]
    code = cli.main(["demo", "--out", str(out), "--steps", "3", "--images", "2", "--methods", ",".join(methods), "-q"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps.png", "summary.json"]

    console = capsys.readouterr().out
    assert "accuracy" in console and str(out / "heatmaps.png") in console
    for name in methods:
        assert name in console

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["method_seconds"]) == methods and summary["failed"] == {}
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["test_images"] == 16 and summary["steps"] == 3
    assert len(summary["explained"]) == 2
    assert all(0.0 <= summary["mask_share"][m] <= 1.0 for m in methods)

    im = Image.open(out / "heatmaps.png")
    assert im.format == "PNG"
    arr = np.asarray(im.convert("RGB"))
    cell, pad, columns = 2 * demo.SIZE, viz.PAD, 1 + len(methods)
    # columns are right-aligned: the input column starts `columns` cells (+ gaps) from the right edge
    x0 = im.width - columns * (cell + pad)
    assert x0 > 0 and im.height > 2 * (cell + pad)
    band = arr[:, x0:x0 + cell]
    # runs of non-white pixel rows in the input column: exactly two image rows of `cell` pixels
    nonwhite = (band != 255).any(axis=(1, 2)).astype(int)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], nonwhite, [0]])))
    starts, runs = edges[::2], edges[1::2] - edges[::2]
    rows = [(y, r) for y, r in zip(starts, runs) if r > 40]
    assert [r for _, r in rows] == [cell, cell]
    assert rows[1][0] - rows[0][0] == cell + pad
    for y, _ in rows:
        assert (arr[y:y + cell, x0 - pad:x0] == 255).all()          # white gap left of the input cell
        assert (arr[y:y + cell, x0 + cell:x0 + cell + pad] == 255).all()
        assert arr[y:y + cell, x0:x0 + cell].std() > 5                  # a textured image, not a flat cell


def test_demo_run_rejects_unknown_methods_before_work(tmp_path, no_training):
    with pytest.raises(ValueError, match="unknown method.*'nope'"):
        demo.run(tmp_path / "x", methods=["nope"])
    assert not (tmp_path / "x").exists()


def test_shapes_are_deterministic_and_labelled():
    a = demo.make_shapes(8, torch.Generator().manual_seed(3), labels=torch.arange(8) % 4)
    b = demo.make_shapes(8, torch.Generator().manual_seed(3), labels=torch.arange(8) % 4)
    c = demo.make_shapes(8, torch.Generator().manual_seed(4), labels=torch.arange(8) % 4)
    images, labels, masks = a
    assert images.shape == (8, 3, demo.SIZE, demo.SIZE) and masks.shape == (8, demo.SIZE, demo.SIZE)
    assert 0 <= images.min() and images.max() <= 1
    assert labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.equal(a[0], c[0])
    area = masks.float().mean((1, 2))
    assert (area > 0.02).all() and (area < 0.5).all()
    # the shape differs in colour from its surroundings
    inside = (images * masks[:, None]).sum((2, 3)) / masks.sum((1, 2))[:, None]
    outside = (images * ~masks[:, None]).sum((2, 3)) / (~masks).sum((1, 2))[:, None]
    assert ((inside - outside).abs().max(1).values > 0.2).all()


def test_module_entry_point_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "relprop.cli", "methods"], capture_output=True, text=True)
    assert ok.returncode == 0 and "rap" in ok.stdout and "sglrp" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "relprop.cli", "demo", "--methods", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown method(s) 'nope'" in bad.stderr


def test_target_and_targets_are_one_option_in_both_commands():
    parser = cli.build_parser()
    for flag in ("--target", "--targets"):
        assert parser.parse_args(["explain", "a.png", "--model", "shapes-vgg", flag, "3,7", "-o", "o"]).target == "3,7"
        assert parser.parse_args(["attribute", "--data", "d", "--model", "shapes-vgg", flag, "topk:2",
                                  "--out", "o"]).targets == "topk:2"


def test_explain_blames_the_model_for_unsupported_operations(tmp_path, monkeypatch, capsys):
    (tmp_path / "odd_net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU(), nn.Flatten(), nn.LazyLinear(3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["explain", str(tmp_path / "a.png"), "--model", "odd_net:build", "--size", "16", "-o",
                  str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "relprop explain: error: --model odd_net:build: relprop has no relevance rule" in err, err
    assert "--method/--param" not in err and not (tmp_path / "out").exists()


def test_attribute_blames_the_model_for_unsupported_operations(tmp_path, monkeypatch, capsys):
    """As explain: one usage error naming the model and every operation, exit 2, nothing
    written (it was a traceback, exit 1)."""
    (tmp_path / "odd_net2.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU(), nn.Flatten(), nn.LazyLinear(3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "data").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attribute", "--data", str(tmp_path / "data"), "--model", "odd_net2:build", "--size", "16",
                  "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "relprop attribute: error: --model odd_net2:build: relprop has no relevance rule" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["methods"], ["backends"]])
def test_a_reader_that_closes_early_ends_the_command_quietly(command):
    """``relprop methods | head -1``: standard output closed before the command writes is
    exit 141 (a shell's SIGPIPE status) without a traceback (was a BrokenPipeError, exit 1)."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "relprop.cli", *command], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_a_text_parameter_keeps_the_text_as_typed():
    """The built-in VGG's layers are named like '0.10': --param init_layer=0.10 is that name,
    not the float 0.1; numbers stay numbers for numeric parameters."""
    parser = cli.build_parser()
    args = parser.parse_args(["explain", "a.png", "--model", "shapes-vgg", "--method", "rsp",
                              "--param", "init_layer=0.10", "-o", "o"])
    assert cli.method_params_from_args(args) == {"init_layer": "0.10"}
    args = parser.parse_args(["explain", "a.png", "--model", "shapes-vgg", "--method", "ae",
                              "--param", "init_layer=0.10", "--param", "ratio=1.5", "-o", "o"])
    assert cli.method_params_from_args(args) == {"init_layer": "0.10", "ratio": 1.5}
