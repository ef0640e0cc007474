"""relprop.viz: the signed colour map, image un-normalisation and the atomic PNG grid."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from relprop import viz

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def test_to_rgb_zero_is_white_and_extremes_are_red_and_blue():
    rgb = viz.to_rgb(torch.tensor([[0.0, 2.0, -2.0, 1.0, -1.0]]))
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == WHITE
    assert tuple(rgb[0, 1]) == RED
    assert tuple(rgb[0, 2]) == BLUE
    # half of max|R|: half-way between white and the extreme colour
    r, g, b = map(int, rgb[0, 3])
    assert r == 255 and 120 <= g <= 136 and 120 <= b <= 136
    r, g, b = map(int, rgb[0, 4])
    assert b == 255 and 120 <= r <= 136 and 120 <= g <= 136


def test_to_rgb_is_symmetric_and_scaled_per_map():
    r = torch.randn(17, 23, generator=torch.Generator().manual_seed(0))
    pos, neg = viz.to_rgb(r), viz.to_rgb(-r)
    np.testing.assert_array_equal(neg, pos[..., ::-1])          # red and blue swapped, green unchanged
    np.testing.assert_array_equal(viz.to_rgb(r * 1000.0), pos)   # normalised by max |R|
    # the normalisation uses |R|: a map whose largest magnitude is negative still reaches pure blue
    m = np.array([[-4.0, 1.0, 0.0]])
    rgb = viz.to_rgb(m)
    assert tuple(rgb[0, 0]) == BLUE and tuple(rgb[0, 2]) == WHITE
    assert rgb[0, 1, 0] == 255 and rgb[0, 1, 1] > 150                 # weak positive: pale red


def test_to_rgb_monotone_in_magnitude():
    rgb = viz.to_rgb(np.linspace(0, 1, 11)[None, :])
    green = rgb[0, :, 1].astype(int)
    assert (np.diff(green) < 0).all()                                # redder as the value grows
    assert (rgb[0, :, 0] == 255).all()


def test_to_rgb_degenerate_maps():
    assert (viz.to_rgb(np.zeros((3, 4))) == 255).all()
    rgb = viz.to_rgb(np.array([[np.nan, 1.0]]))
    assert tuple(rgb[0, 0]) == WHITE and tuple(rgb[0, 1]) == RED
    with pytest.raises(ValueError, match="2-D"):
        viz.to_rgb(np.zeros((1, 3, 4)))


def test_to_rgb_infinite_values_are_the_extremes():
    """+inf (the most relevant pixel) was drawn white, as 0."""
    for heat in (np.array([[np.inf, 1.0, -1.0, -np.inf, np.nan]]),
                 torch.tensor([[float("inf"), 1.0, -1.0, float("-inf"), float("nan")]])):
        assert [tuple(p) for p in viz.to_rgb(heat)[0]] == [RED, WHITE, WHITE, BLUE, WHITE]
    with pytest.raises(TypeError, match="heatmap must be real, got a complex map"):
        viz.to_rgb(np.ones((2, 2), dtype=complex))


def test_image_to_rgb_undoes_normalisation():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(1)).float()
    x = (pixels / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    out = viz.image_to_rgb(x, mean, std)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, pixels.permute(1, 2, 0).numpy().astype(np.uint8))
    clipped = viz.image_to_rgb(torch.tensor([-1.0, 0.5, 2.0]).view(3, 1, 1))
    assert tuple(clipped[0, 0]) == (0, 128, 255)


def _grid_inputs(n_rows=2, h=16, w=20):
    g = torch.Generator().manual_seed(2)
    images = [torch.randint(0, 256, (h, w, 3), generator=g).numpy().astype(np.uint8) for _ in range(n_rows)]
    maps_a = [torch.randn(h, w, generator=g) for _ in range(n_rows)]
    maps_b = [torch.randn(h, w, generator=g).numpy() for _ in range(n_rows)]
    return images, [maps_a, maps_b]


def test_save_grid_layout_and_pixels(tmp_path):
    images, columns = _grid_inputs()
    path = tmp_path / "grid.png"
    size = viz.save_grid(path, images, columns, ["input", "method a", "method b"], scale=2)
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]              # no temporary file left behind
    im = Image.open(path)
    assert im.format == "PNG" and im.mode == "RGB"
    cw, ch, pad = 40, 32, viz.PAD
    assert im.size == size
    assert im.width == pad + 3 * (cw + pad)
    assert 2 * (ch + pad) + pad + 8 < im.height < 2 * (ch + pad) + pad + 60   # rows + a one-line title band
    arr = np.asarray(im)
    # the last row's cells end PAD pixels above the bottom edge, each column at its offset
    y0 = im.height - pad - ch
    for j, expected in enumerate([images[1], viz.to_rgb(columns[0][1]), viz.to_rgb(columns[1][1])]):
        x0 = pad + j * (cw + pad)
        cell = arr[y0:y0 + ch, x0:x0 + cw]
        np.testing.assert_array_equal(cell, expected.repeat(2, axis=0).repeat(2, axis=1))
    # first row of the input column sits one cell + PAD above
    y1 = y0 - ch - pad
    np.testing.assert_array_equal(arr[y1:y1 + ch, pad:pad + cw], images[0].repeat(2, axis=0).repeat(2, axis=1))
    # titles are drawn: some dark pixels above the first row
    assert (arr[:y1] < 128).any()


def test_save_grid_row_titles_widen_and_long_titles_wrap(tmp_path):
    images, columns = _grid_inputs()
    plain = viz.save_grid(tmp_path / "a.png", images, columns, ["in", "a", "b"])
    titled = viz.save_grid(tmp_path / "b.png", images, columns, ["in", "a", "b"], row_titles=["first", "second"])
    wrapped = viz.save_grid(tmp_path / "c.png", images, columns, ["in", "lrp-epsilon-alpha2beta1-flat", "b"])
    assert titled[0] > plain[0] and titled[1] == plain[1]
    assert wrapped[0] == plain[0] and wrapped[1] > plain[1]          # same width, taller title band
    one = viz.save_grid(tmp_path / "d.png", images, columns, ["in", "a", "b"], caption="short")
    many = viz.save_grid(tmp_path / "e.png", images, columns, ["in", "a", "b"], caption="a long caption " * 20)
    assert one[0] == many[0] == plain[0]                             # captions wrap to the grid width
    assert plain[1] < one[1] < many[1]


def test_save_grid_rejects_mismatches_without_writing(tmp_path):
    images, columns = _grid_inputs()
    with pytest.raises(ValueError, match="column titles"):
        viz.save_grid(tmp_path / "g.png", images, columns, ["input", "only one"])
    with pytest.raises(ValueError, match="row titles"):
        viz.save_grid(tmp_path / "g.png", images, columns, ["in", "a", "b"], row_titles=["x"])
    with pytest.raises(ValueError, match="maps"):
        viz.save_grid(tmp_path / "g.png", images, [columns[0], columns[1][:1]], ["in", "a", "b"])
    assert os.listdir(tmp_path) == []


def test_write_atomic_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    viz.write_atomic(path, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(viz.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        viz.write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_import_relprop_does_not_import_matplotlib():
    code = "import sys, relprop, relprop.viz; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
