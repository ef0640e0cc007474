"""relprop.metrics: evaluation metrics checked on hand-made maps with known answers."""
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import relprop
from relprop import metrics as M
from relprop.evaluate import explain_function
from relprop.metrics import sensitivity as S

GRADIENT = explain_function("gradient")


# --------------------------------------------------------------------------- helpers

def point_map(h, w, r, c, batch=1):
    m = torch.zeros(batch, h, w)
    m[:, r, c] = 1.0
    return m


def pixel_mask(h, w, pixels):
    """One image per (row, col) pixel; each mask holds that single pixel."""
    m = torch.zeros(len(pixels), h, w, dtype=torch.bool)
    for i, (r, c) in enumerate(pixels):
        m[i, r, c] = True
    return m


def brute_ap(scores, labels):
    """scikit-learn's definition: sum over distinct thresholds of (R_n - R_{n-1}) P_n."""
    npos = sum(labels)
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        sel = [l for s, l in zip(scores, labels) if s >= t]
        tp = sum(sel)
        recall = tp / npos
        ap += (recall - prev_recall) * tp / len(sel)
        prev_recall = recall
    return ap


def brute_ssim(a, b, k=11, sigma=1.5, c1=1e-4, c2=9e-4):
    """Explicit loop over the valid window positions of one (H, W) pair, float64."""
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    win = torch.outer(g, g) / torch.outer(g, g).sum()
    a, b = a.double(), b.double()
    vals = []
    for i in range(a.shape[0] - k + 1):
        for j in range(a.shape[1] - k + 1):
            pa, pb = a[i:i + k, j:j + k], b[i:i + k, j:j + k]
            ma, mb = (win * pa).sum(), (win * pb).sum()
            va = (win * (pa - ma) ** 2).sum()
            vb = (win * (pb - mb) ** 2).sum()
            cov = (win * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return torch.stack(vals).mean()


# --------------------------------------------------------------------------- import / ground truth

def test_import_relprop_does_not_import_metrics():
    """`import relprop` leaves relprop.metrics unimported; the explicit import works."""
    code = ("import sys, relprop; assert 'relprop.metrics' not in sys.modules; "
            "from relprop import metrics; import relprop.metrics; print(metrics.pointing_game.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pointing_game"


def test_boxes_to_masks_inclusive_exclusive_and_union():
    """(x0, y0, x1, y1): columns x0..x1-1, rows y0..y1-1; lists give the union per image,
    an empty list an empty mask."""
    m = M.boxes_to_masks(torch.tensor([[1, 2, 4, 3]]), 5, 5)
    expected = torch.zeros(1, 5, 5, dtype=torch.bool)
    expected[0, 2, 1:4] = True
    assert m.dtype == torch.bool and torch.equal(m, expected)
    m = M.boxes_to_masks([[[0, 0, 2, 2], [3, 3, 4, 4]], [], torch.tensor([4, 0, 9, 1])], 4, 5)
    expected = torch.zeros(3, 4, 5, dtype=torch.bool)
    expected[0, :2, :2] = True
    expected[0, 3, 3] = True
    expected[2, 0, 4] = True      # clipped to the image
    assert torch.equal(m, expected)


def test_boxes_accepted_wherever_masks_are():
    """Every localisation metric gives the same numbers for boxes and their masks."""
    torch.manual_seed(1)
    maps = torch.randn(2, 30, 30)
    boxes = torch.tensor([[3, 4, 20, 12], [0, 10, 30, 30]])
    masks = M.boxes_to_masks(boxes, 30, 30)
    assert torch.equal(M.pointing_game(maps, boxes), M.pointing_game(maps, masks))
    torch.testing.assert_close(M.outside_inside_ratio(maps, boxes), M.outside_inside_ratio(maps, masks))
    torch.testing.assert_close(M.relevance_mass_accuracy(maps, list(boxes)),
                               M.relevance_mass_accuracy(maps, masks))
    a, b = M.segmentation_scores(maps, boxes), M.segmentation_scores(maps, masks)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


# --------------------------------------------------------------------------- pointing game

def test_pointing_game_tolerance_is_strict_euclidean():
    """Max at (20, 20); a one-pixel mask 0, 14, 15, 16 px away horizontally and at
    (10, 10) / (11, 11) diagonally (14.1 / 15.6 px): hit iff distance < 15."""
    pixels = [(20, 20), (20, 34), (20, 35), (20, 36), (30, 30), (31, 31), (6, 20)]
    maps = point_map(48, 48, 20, 20, batch=len(pixels)) + 0.1 * torch.rand(len(pixels), 48, 48) - 0.2
    maps[:, 20, 20] = 5.0
    hits = M.pointing_game(maps, pixel_mask(48, 48, pixels))
    assert hits.dtype == torch.bool
    assert hits.tolist() == [True, True, False, False, True, False, True]
    hits = M.pointing_game(maps, pixel_mask(48, 48, pixels), tolerance=1)
    assert hits.tolist() == [True, False, False, False, False, False, False]
    hits = M.pointing_game(maps[:2], pixel_mask(48, 48, [(20, 20), (20, 21)]), tolerance=0)
    assert hits.tolist() == [True, False]


def test_pointing_game_ties_take_first_maximum_and_empty_mask_misses():
    """Equal maxima at (2, 2) and (30, 30): the first (row-major) is the point; a mask near
    the second one misses; an empty mask always misses."""
    maps = torch.zeros(3, 40, 40)
    maps[:, 2, 2] = maps[:, 30, 30] = 1.0
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, 30, 30] = True
    assert M.pointing_game(maps, masks).tolist() == [True, False, False]


def test_pointing_game_accuracy_by_hand():
    """hits [1,0,1,1,0] for classes [0,0,1,2,2] of 4: per class [1/2, 1, 1/2, NaN],
    mean over present classes 2/3, overall 3/5."""
    acc = M.pointing_game_accuracy(torch.tensor([True, False, True, True, False]),
                                   torch.tensor([0, 0, 1, 2, 2]), num_classes=4)
    pc = acc["per_class"]
    assert pc.shape == (4,)
    assert pc[:3].tolist() == [0.5, 1.0, 0.5] and math.isnan(pc[3].item())
    assert acc["mean"] == pytest.approx(2 / 3)
    assert acc["overall"] == pytest.approx(0.6)


def test_torchray_tolerance_is_15_px_at_224_on_the_shorter_side():
    """15 px at 224: 15 at 224, 30 at 448, 15 * 64 / 224 = 4.2857 at 64, the shorter side of
    a non-square image; a non-positive size is refused."""
    assert M.torchray_tolerance(224) == 15
    assert M.torchray_tolerance(448) == 30
    assert M.torchray_tolerance(64) == pytest.approx(4.285714285714286, abs=1e-15)
    assert M.torchray_tolerance(64, 300) == M.torchray_tolerance(300, 64) == M.torchray_tolerance(64)
    with pytest.raises(ValueError, match="image size must be positive"):
        M.torchray_tolerance(0)


def test_pointing_game_scaled_tolerance_disc_by_hand():
    """64 x 64, point at (30, 30), tolerance 15 * 64 / 224 (squared 18.37): one-pixel masks at
    offsets (4, 1) (d^2 17), (3, 3) (18) and (0, 4) (16) are hits; (4, 2) (20), (0, 5) (25)
    and (3, -4) (25) misses; a mask under the point is a hit."""
    offsets = [(4, 1), (3, 3), (0, 4), (4, 2), (0, 5), (3, -4), (0, 0)]
    pixels = [(30 + dr, 30 + dc) for dr, dc in offsets]
    maps = torch.zeros(len(pixels), 64, 64)
    maps[:, 30, 30] = 1.0
    hits = M.pointing_game(maps, pixel_mask(64, 64, pixels), tolerance=M.torchray_tolerance(64))
    assert hits.tolist() == [True, True, True, False, False, False, True]


def test_pointing_game_upsamples_the_map_before_the_argmax():
    """A 2 x 2 map [[0, 1], [0, 0]] against 8 x 8 masks is first resized bilinearly with
    align_corners=False: output column j reads source column (j + 0.5) / 4 - 0.5, so the
    value 1 fills rows 0-1, columns 6-7 and the point is (0, 6) (not (0, 4), where nearest
    upsampling would put its first maximum).  Tolerance 1: a mask at (0, 6) hits, at
    (0, 7) or (0, 4) misses; boxes take the image size from ``size``."""
    small = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]).expand(3, 2, 2)
    hits = M.pointing_game(small, pixel_mask(8, 8, [(0, 6), (0, 7), (0, 4)]), tolerance=1)
    assert hits.tolist() == [True, False, False]
    up = torch.nn.functional.interpolate(small[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert up[0, :2, 6:].eq(1).all() and up[0].lt(1).sum() == 60
    boxes = torch.tensor([[6, 0, 7, 1], [7, 0, 8, 1], [4, 0, 5, 1]])
    assert M.pointing_game(small, boxes, tolerance=1, size=(8, 8)).tolist() == [True, False, False]
    # without the size, boxes are read at the map's own 2 x 2 resolution: the point is (0, 1)
    assert M.pointing_game(small, torch.tensor([[1, 0, 2, 1]] * 3), tolerance=1).tolist() == [True] * 3
    with pytest.raises(ValueError, match=r"size=\(4, 4\) disagrees with the masks' \(8, 8\)"):
        M.pointing_game(small, pixel_mask(8, 8, [(0, 6)] * 3), size=(4, 4))


def test_max_abs_channel_reduction_moves_the_point():
    """Pixel (0, 0) has channels (+2, -2, 0): sum 0, max |.| 2; pixel (3, 3) has (1, 0, 0):
    sum 1, max |.| 1.  The channel sum points at (3, 3), TorchRay's max |.| at (0, 0)."""
    rel = torch.zeros(1, 3, 4, 4)
    rel[0, :, 0, 0] = torch.tensor([2.0, -2.0, 0.0])
    rel[0, :, 3, 3] = torch.tensor([1.0, 0.0, 0.0])
    reduced = M.max_abs_channels(rel)
    assert reduced.shape == (1, 4, 4)
    assert reduced[0, 0, 0] == 2 and reduced[0, 3, 3] == 1 and reduced.sum() == 3
    at_origin = pixel_mask(4, 4, [(0, 0)])
    assert M.pointing_game(reduced, at_origin, tolerance=1).tolist() == [True]
    assert M.pointing_game(rel.sum(1), at_origin, tolerance=1).tolist() == [False]
    with pytest.raises(ValueError, match=r"max_abs_channels takes a \(B, C, H, W\) tensor, got \(4, 4\)"):
        M.max_abs_channels(rel[0, 0])


def test_pointing_game_per_class_mean_then_mean_over_classes():
    """Six items of classes [0, 0, 0, 0, 1, 2]: class 0 hits 1 of 4, classes 1 and 2 hit:
    per class [1/4, 1, 1], mean 0.75 (TorchRay's number), while the plain hit rate is 3/6."""
    maps = torch.zeros(6, 10, 10)
    maps[:, 5, 5] = 1.0
    pixels = [(5, 5), (0, 0), (9, 9), (0, 9), (5, 6), (4, 5)]
    hits = M.pointing_game(maps, pixel_mask(10, 10, pixels), tolerance=2)
    assert hits.tolist() == [True, False, False, False, True, True]
    acc = M.pointing_game_accuracy(hits, torch.tensor([0, 0, 0, 0, 1, 2]), num_classes=3)
    assert acc["per_class"].tolist() == [0.25, 1.0, 1.0]
    assert acc["mean"] == pytest.approx(0.75) and acc["overall"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- relevance in the box

def ratio_case():
    """4x4 map, mask = top-left 2x2: inside [2, 2, -1, 0] (positive mean 4/4 = 1), outside
    three 1s, one -5, eight 0s (positive mean 3/12)."""
    m = torch.zeros(4, 4)
    m[0, 0], m[0, 1], m[1, 0] = 2.0, 2.0, -1.0
    m[0, 2], m[2, 0], m[3, 3], m[3, 2] = 1.0, 1.0, 1.0, -5.0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    return m, mask


def test_outside_inside_ratio_by_hand_and_edge_cases():
    """Ratio = (3/12) / (4/4) = 0.25; no positive inside -> inf; empty or full mask -> NaN."""
    m, mask = ratio_case()
    no_pos_inside = m.clone()
    no_pos_inside[:2, :2] = -1.0
    maps = torch.stack([m, no_pos_inside, m, m])
    masks = torch.stack([mask, mask, torch.zeros_like(mask), torch.ones_like(mask)])
    r = M.outside_inside_ratio(maps, masks)
    assert r[0].item() == pytest.approx(0.25)
    assert r[1].item() == math.inf
    assert math.isnan(r[2].item()) and math.isnan(r[3].item())


def test_relevance_mass_accuracy_by_hand():
    """Positive mass 4 inside, 3 outside -> 4/7; a map with 3 inside, 1 outside and negative
    pixels everywhere -> 0.75; no positive relevance -> 0."""
    m, mask = ratio_case()
    m2 = -torch.ones(4, 4)
    m2[0, 0], m2[1, 1], m2[3, 3] = 1.0, 2.0, 1.0
    maps = torch.stack([m, m2, -m.abs()])
    r = M.relevance_mass_accuracy(maps, mask.expand(3, 4, 4))
    torch.testing.assert_close(r, torch.tensor([4 / 7, 0.75, 0.0]))


# --------------------------------------------------------------------------- segmentation

def test_binarize_threshold_and_quantile():
    """Strictly-above threshold; quantile q uses each image's own q-quantile (0.75 of 0..15
    is 11.25 -> the four pixels 12..15)."""
    maps = torch.stack([torch.arange(16.0).reshape(4, 4) - 5, 10 * torch.arange(16.0).reshape(4, 4)])
    b = M.binarize(maps)
    assert b.dtype == torch.bool
    assert b[0].sum().item() == 10 and not b[0].flatten()[5]            # value 0 is not > 0
    assert b[1].sum().item() == 15
    q = M.binarize(maps, quantile=0.75)
    assert q.flatten(1).sum(1).tolist() == [4, 4]
    assert torch.equal(q[0].flatten(), torch.arange(16) >= 12)
    assert torch.equal(M.binarize(maps, threshold=9.0)[0].flatten(), torch.arange(16) >= 15)
    with pytest.raises(ValueError, match=re.escape("quantile must lie in [0, 1], got 1.5")):
        M.binarize(maps, quantile=1.5)


def test_segmentation_iou_and_pixel_accuracy_by_hand():
    """Prediction (map > 0) = 3 pixels, mask = 4 pixels, overlap 2 on a 4x4 image:
    IoU 2/5, background IoU 11/14 (11 pixels in neither, 14 outside the overlap), pixel
    accuracy (2 + 11)/16."""
    m = -torch.ones(1, 4, 4)
    m[0, 0, 0] = m[0, 0, 1] = m[0, 3, 3] = 1.0
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, :2] = mask[0, 1, :2] = True
    s = M.segmentation_scores(m, mask)
    assert s["iou"].item() == pytest.approx(2 / 5)
    assert s["iou_background"].item() == pytest.approx(11 / 14)
    assert s["pixel_accuracy"].item() == pytest.approx(13 / 16)


def test_average_precision_known_rankings_and_ties():
    """Perfect ranking -> 1; scores [.9,.8,.7,.6] labels [1,0,1,0] -> (1 + 2/3)/2; three tied
    scores with labels [1,1,0] are one group -> 2/3 (not 1 or 7/12); empty mask -> NaN."""
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.1],
                           [0.3, 0.2, 0.1, 0.0]]).view(4, 2, 2)
    labels = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).bool().view(4, 2, 2)
    ap = M.segmentation_scores(scores, labels)["average_precision"]
    assert ap[:3].tolist() == pytest.approx([1.0, (1 + 2 / 3) / 2, 2 / 3])
    assert math.isnan(ap[3].item())


def test_average_precision_matches_threshold_definition_with_ties():
    """Random maps with many ties: batched AP equals the step-wise sum over distinct
    thresholds, image by image."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (4, 6, 7), generator=g).float()
    labels = torch.rand(4, 6, 7, generator=g) < 0.4
    ap = M.segmentation_scores(scores, labels)["average_precision"]
    for i in range(4):
        ref = brute_ap(scores[i].flatten().tolist(), labels[i].flatten().int().tolist())
        assert ap[i].item() == pytest.approx(ref, abs=1e-6)


# --------------------------------------------------------------------------- region perturbation

class TopLeftSum(nn.Module):
    """Logit 0 = sum of channel 0 over the top-left 4x4 cell; logit 1 = its negative.
    Records every call (batch size, training flag, inputs)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)          # a submodule whose training flag is observable
        self.calls = []

    def forward(self, x):
        self.calls.append((x.shape[0], self.training, self.lin.training, x.clone()))
        s = x[:, 0, :4, :4].sum(dim=(1, 2))
        return torch.stack([s, -s], dim=1)


def perturbation_case():
    """Two 2x8x8 images (4 cells of 4x4): image 0 has ones in cell 0 (channel-0 mean 1/4),
    image 1 twos in cell 0 (mean 1/2); channel 1 is noise.  Image 0's map ranks cell 0 first,
    image 1's map ranks cell 3 first and cell 0 second."""
    x = torch.zeros(2, 2, 8, 8)
    x[0, 0, :4, :4] = 1.0
    x[1, 0, :4, :4] = 2.0
    x[:, 1] = torch.rand(2, 8, 8)
    maps = torch.zeros(2, 8, 8)
    maps[0, :4, :4] = 1.0
    maps[1, 4:, 4:] = 2.0
    maps[1, :4, :4] = 1.0
    maps[1, 0, 4] = -3.0                    # cell 1 least relevant for image 1
    return x, maps


def test_region_perturbation_morf_lerf_by_hand():
    """MoRF replaces the relevant cell first: drops [0,12,12,12,12] (AOPC 9.6) and
    [0,0,24,24,24] (AOPC 14.4); LeRF last: [0,0,0,0,12] (AOPC 2.4), [0,0,0,24,24] (9.6)."""
    x, maps = perturbation_case()
    model = TopLeftSum()
    morf = M.region_perturbation(model, x, maps, 0, patch=4, steps=4, order="morf", replace="mean")
    torch.testing.assert_close(morf["scores"], torch.tensor([[16.0, 4, 4, 4, 4], [32.0, 32, 8, 8, 8]]))
    torch.testing.assert_close(morf["drop"], torch.tensor([[0.0, 12, 12, 12, 12], [0.0, 0, 24, 24, 24]]))
    torch.testing.assert_close(morf["aopc"], torch.tensor([9.6, 14.4]))
    assert morf["ranking"].tolist() == [[0, 1, 2, 3], [3, 0, 2, 1]]
    lerf = M.region_perturbation(model, x, maps, 0, patch=4, steps=4, order="lerf", replace="mean")
    torch.testing.assert_close(lerf["drop"], torch.tensor([[0.0, 0, 0, 0, 12], [0.0, 0, 0, 24, 24]]))
    torch.testing.assert_close(lerf["aopc"], torch.tensor([2.4, 9.6]))
    assert (lerf["aopc"] < morf["aopc"]).all()
    # target 1 scores the negated logit: same curve, opposite sign
    neg = M.region_perturbation(model, x, maps, torch.tensor([1, 1]), patch=4, steps=4, order="morf",
                                replace="mean")
    torch.testing.assert_close(neg["drop"], -morf["drop"])


def test_region_perturbation_replaces_exactly_the_top_cells():
    """Each scored image equals x outside the first k cells and the replacement inside; random
    noise lies in the image's value range; a 10x6 image has 3x2 cells, the border ones cut."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 6)
    maps = torch.randn(2, 10, 6)
    model = TopLeftSum()
    out = M.region_perturbation(model, x, maps, 0, patch=4, steps=6, order="morf", replace="random",
                                generator=torch.Generator().manual_seed(0))
    (n, _, _, imgs), = model.calls
    assert n == 2 * 7
    imgs = imgs.view(2, 7, 3, 10, 6)
    rows = torch.arange(10) // 4
    cols = torch.arange(6) // 4
    cell_of = rows[:, None] * 2 + cols[None, :]                        # (10, 6) cell index
    for b in range(2):
        lo, hi = x[b].min(), x[b].max()
        for k in range(7):
            changed = torch.isin(cell_of, out["ranking"][b, :k])
            same = (imgs[b, k] == x[b]).all(dim=0)
            assert torch.equal(same, ~changed)
            assert (imgs[b, k][:, changed] >= lo).all() and (imgs[b, k][:, changed] <= hi).all()
        # the noise is drawn once per image: a cell keeps its values once replaced
        c0 = cell_of == out["ranking"][b, 0]
        assert torch.equal(imgs[b, 1][:, c0], imgs[b, 6][:, c0])
    with pytest.raises(ValueError, match=re.escape("steps must lie in [0, 6] (the number of 4x4 cells), got 7")):
        M.region_perturbation(model, x, maps, 0, patch=4, steps=7)


def test_region_perturbation_blur_and_mean_of_constant_image_change_nothing():
    """A constant image blurred (replicate padding) or replaced by its mean is unchanged:
    zero drop for every step; the blur of a non-constant image does change the score."""
    x = torch.full((1, 2, 8, 8), 0.7)
    maps = torch.randn(1, 8, 8)
    for replace in ("blur", "mean"):
        out = M.region_perturbation(TopLeftSum(), x, maps, 0, patch=2, steps=16, replace=replace)
        torch.testing.assert_close(out["drop"], torch.zeros(1, 17), atol=1e-5, rtol=0)
    x2, maps2 = perturbation_case()
    out = M.region_perturbation(TopLeftSum(), x2, maps2, 0, patch=4, steps=1, replace="blur")
    assert out["drop"][0, 1] > 0.5


def test_region_perturbation_batched_calls_eval_mode_and_determinism():
    """One model call without batch_size (plus one to predict when target is None);
    ceil(B*(steps+1)/batch_size) calls with it; eval mode during the calls, training flags
    restored; a seeded generator reproduces the random order, another seed does not."""
    torch.manual_seed(0)
    x, maps = torch.randn(3, 1, 16, 16), torch.randn(3, 16, 16)
    x[0, 0, :4, :4], x[1, 0, :4, :4] = 1.0, -1.0     # predicted classes 0 and 1
    model = TopLeftSum().train()
    predicted = model(x).argmax(1)
    assert predicted.unique().numel() == 2          # the None default must not mean class 0
    model.calls.clear()
    a = M.region_perturbation(model, x, maps, predicted, patch=4, steps=6, order="random",
                              generator=torch.Generator().manual_seed(5))
    assert [c[0] for c in model.calls] == [21]
    assert all(not c[1] and not c[2] for c in model.calls)
    assert model.training and model.lin.training
    model.calls.clear()
    b = M.region_perturbation(model, x, maps, None, patch=4, steps=6, order="random", batch_size=10,
                              generator=torch.Generator().manual_seed(5))
    assert [c[0] for c in model.calls] == [3, 10, 10, 1]
    for k in ("scores", "drop", "aopc", "ranking"):
        torch.testing.assert_close(a[k], b[k])
    c = M.region_perturbation(model, x, maps, predicted, patch=4, steps=6, order="random",
                              generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a["ranking"], c["ranking"])


# --------------------------------------------------------------------------- spearman / ssim

def test_spearman_known_values():
    """Identical 1, reversed -1, monotone transform 1, ties by hand ([1,2,2,3] vs [1,2,3,4]:
    ranks [1,2.5,2.5,4] -> 4.5/sqrt(22.5)), constant -> NaN; rows independent."""
    a = torch.tensor([[3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    b = torch.tensor([[3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    r = M.spearman(a, b)
    assert r[:3].tolist() == pytest.approx([1.0, 4.5 / math.sqrt(22.5), -1.0])
    assert math.isnan(r[3].item())
    x = torch.randn(2, 5, 5)
    assert M.spearman(x, x.exp() * 3).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_known_values():
    """Identical -> 1; constant 0 vs constant 1 -> C1/(1+C1); symmetric; a map vs its
    negation or noise < 1; equals an explicit window-by-window computation."""
    torch.manual_seed(0)
    a = torch.rand(3, 16, 16)
    assert M.ssim(a, a).tolist() == pytest.approx([1.0] * 3)
    c1 = 1e-4
    assert M.ssim(torch.zeros(1, 12, 12), torch.ones(1, 12, 12)).item() == pytest.approx(c1 / (1 + c1))
    n = torch.rand(3, 16, 16)
    torch.testing.assert_close(M.ssim(a, n), M.ssim(n, a))
    assert (M.ssim(a, 1 - a) < 0.5).all() and (M.ssim(a, n) < 0.5).all()
    a2, b2 = torch.rand(13, 12), torch.rand(13, 12)
    assert M.ssim(a2[None], b2[None]).item() == pytest.approx(brute_ssim(a2, b2).item(), abs=1e-5)


# --------------------------------------------------------------------------- cascading randomisation

def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_cascading_randomization_order_similarity_and_user_model_untouched():
    """The user's model is bit-identical afterwards (state_dict, training flags); one entry
    per Conv2d/Linear from the top down; the first step already lowers the gradient map's
    similarity below 1; a fixed seed reproduces the numbers."""
    model = tiny_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 12, 12)
    res = M.cascading_randomization(model, x, None, GRADIENT, seed=0)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert [r["layer"] for r in res] == ["6", "2", "0"]
    for key in ("spearman", "spearman_signed", "ssim", "ssim_signed"):
        assert res[0][key].shape == (2,)
        assert (res[0][key] < 0.99).all(), key
    again = M.cascading_randomization(model, x, None, GRADIENT, seed=0)
    for r, s in zip(res, again):
        torch.testing.assert_close(r["spearman"], s["spearman"])
        torch.testing.assert_close(r["ssim"], s["ssim"])


def test_cascading_randomization_is_cumulative_from_the_top():
    """Snapshot the model handed to every explain call: step k has exactly the top k layers
    re-initialised (bias in [0, 1]), earlier ones kept as randomised before; `layers`
    overrides the list and its order; the explained targets stay those of the original."""
    seen = []

    def recording(model, x, targets):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        seen[-1]["target"] = torch.as_tensor(targets).clone()
        return GRADIENT(model, x, targets)

    model = tiny_cnn()
    orig = model.state_dict()
    x = torch.randn(2, 3, 12, 12)
    predicted = model(x).argmax(1)
    M.cascading_randomization(model, x, None, recording, seed=1)
    assert len(seen) == 4                      # reference + 3 steps
    order = ["6", "2", "0"]
    for k in range(4):
        for i, name in enumerate(order):
            changed = not torch.equal(seen[k][name + ".weight"], orig[name + ".weight"])
            assert changed == (i < k), (k, name)
            if i < k:
                assert torch.equal(seen[k][name + ".weight"], seen[i + 1][name + ".weight"])
                b = seen[k][name + ".bias"]
                assert (b >= 0).all() and (b <= 1).all()
        if k:
            assert torch.equal(seen[k]["target"], predicted)
    seen.clear()
    res = M.cascading_randomization(model, x, torch.tensor([2, 0]), recording, layers=["0", "6"])
    assert [r["layer"] for r in res] == ["0", "6"]
    assert not torch.equal(seen[1]["0.weight"], orig["0.weight"])
    assert torch.equal(seen[1]["6.weight"], orig["6.weight"])
    assert torch.equal(seen[2]["2.weight"], orig["2.weight"])
    assert seen[1]["target"].tolist() == [2, 0]
    with pytest.raises(ValueError, match=re.escape("module '1' (ReLU) has no >= 2-D weight to randomise")):
        M.cascading_randomization(model, x, None, GRADIENT, layers=["1"])   # ReLU: no weight


MODEL_TOL = {"rtol": 1e-4, "atol": 1e-5}          # values that went through a model (float32 convolutions)


def _check_metrics_agree(ref, dev):
    """Every metric run on device ``dev`` returns tensors on ``dev`` with the numbers of a run
    on ``ref``.  Random draws come from a generator on the inputs' device (CPU and CUDA
    streams differ), so: region perturbation is compared with the deterministic
    replacements; cascading randomisation by its reference map, its layer order and its
    similarities recomputed on the CPU from the randomised maps it returns (and, on one
    device type, with the same seed, as a whole)."""
    ref, dev = torch.device(ref), torch.device(dev)

    def same(got, want, **tol):
        assert got.device.type == dev.type
        torch.testing.assert_close(got.cpu(), want.cpu(), equal_nan=True, **tol)

    torch.manual_seed(0)
    maps, masks = torch.randn(2, 20, 20), torch.rand(2, 20, 20) > 0.5
    for f in (M.pointing_game, M.outside_inside_ratio, M.relevance_mass_accuracy):
        same(f(maps.to(dev), masks.to(dev)), f(maps.to(ref), masks.to(ref)))
    seg, seg_ref = M.segmentation_scores(maps.to(dev), masks.to(dev)), M.segmentation_scores(maps.to(ref),
                                                                                             masks.to(ref))
    assert set(seg) == set(seg_ref) >= {"iou", "iou_background", "pixel_accuracy", "average_precision"}
    for key in seg_ref:
        same(seg[key], seg_ref[key])

    x, heat = torch.randn(2, 2, 8, 8), maps[:, :8, :8]
    out = M.region_perturbation(TopLeftSum().to(dev), x.to(dev), heat.to(dev), 0, patch=4, steps=4,
                                generator=torch.Generator(device=dev).manual_seed(0))
    assert out["aopc"].device.type == dev.type and out["aopc"].shape == (2,)
    for replace in ("mean", "blur"):
        got, want = (M.region_perturbation(TopLeftSum().to(d), x.to(d), heat.to(d), 0, patch=4, steps=4,
                                           replace=replace) for d in (dev, ref))
        assert torch.equal(got["ranking"].cpu(), want["ranking"].cpu())
        for key in ("scores", "drop", "aopc"):
            same(got[key], want[key], **MODEL_TOL)

    model = tiny_cnn()                                # reseeds: x is the same on every call
    x, target = torch.randn(2, 3, 12, 12), torch.tensor([2, 0])
    h0, h0_ref = (relprop.Explainer(tiny_cnn().to(d), "gradient").heatmap(x.to(d), target.to(d))
                  for d in (dev, ref))
    same(h0, h0_ref, **MODEL_TOL)                     # the unrandomised reference map
    res = M.cascading_randomization(model.to(dev), x.to(dev), target.to(dev), GRADIENT, seed=0,
                                    return_maps=True)
    assert [r["layer"] for r in res] == ["6", "2", "0"]
    h0 = h0.cpu()

    def by_max(h):
        return h.abs() / h.abs().flatten(1).amax(1)[:, None, None]

    def min_max(h):
        lo, hi = h.flatten(1).amin(1)[:, None, None], h.flatten(1).amax(1)[:, None, None]
        return (h - lo) / (hi - lo)

    for step in res:
        h = step["heatmap"].cpu()
        assert h.shape == (2, 12, 12) and h.abs().amax() > 0
        same(step["spearman"], S.spearman(h0.abs(), h.abs()), **MODEL_TOL)
        same(step["spearman_signed"], S.spearman(h0, h), **MODEL_TOL)
        same(step["ssim"], S.ssim(by_max(h0), by_max(h)), **MODEL_TOL)
        same(step["ssim_signed"], S.ssim(min_max(h0), min_max(h)), **MODEL_TOL)
    if ref.type == dev.type:
        again = M.cascading_randomization(tiny_cnn().to(ref), x.to(ref), target.to(ref), GRADIENT, seed=0)
        for step, want in zip(res, again):
            for key in ("spearman", "spearman_signed", "ssim", "ssim_signed"):
                same(step[key], want[key])


def test_metric_device_comparison_runs_on_the_cpu():
    """The comparison of the GPU test below, CPU against CPU: the checking code itself works."""
    _check_metrics_agree("cpu", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_stay_on_the_gpu(monkeypatch):
    """CUDA inputs give CUDA outputs with the CPU numbers (generator on the GPU too); TF32
    is off so that the GPU's float32 convolutions compare with the CPU's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _check_metrics_agree("cpu", "cuda")


def test_maps_with_nan_or_inf_are_refused_naming_the_samples():
    """A NaN pixel would win the pointing game's arg-max and vanish from the mass sums: a
    metric of a non-finite map is an error, never an ordinary-looking score."""
    from relprop import metrics as M
    mask = torch.zeros(3, 16, 16, dtype=torch.bool)
    mask[:, 4:8, 4:8] = True
    h = torch.rand(3, 16, 16)
    h[1, 2, 2] = float("nan")
    h[2, 0, 0] = float("inf")
    msg = r"heat maps of sample\(s\) \[1, 2\] contain NaN or Inf"
    for metric in (M.pointing_game, M.relevance_mass_accuracy, M.outside_inside_ratio, M.segmentation_scores):
        with pytest.raises(ValueError, match=msg):
            metric(h, mask)
    with pytest.raises(ValueError, match=r"maps of sample\(s\) \[1, 2\] contain NaN or Inf"):
        M.spearman(h, torch.rand(3, 16, 16))
    assert M.pointing_game(h[:1], mask[:1]).shape == (1,)          # the finite map is scored


def test_an_empty_batch_is_refused_by_every_map_metric():
    maps, masks = torch.zeros(0, 8, 8), torch.zeros(0, 8, 8, dtype=torch.bool)
    for metric in (M.pointing_game, M.relevance_mass_accuracy, M.outside_inside_ratio, M.segmentation_scores):
        with pytest.raises(ValueError, match=re.escape("empty batch: heat maps have shape (0, 8, 8)")):
            metric(maps, masks)


@pytest.mark.parametrize("tolerance", [-5, float("nan"), float("inf"), True, "15", None])
def test_pointing_game_refuses_a_tolerance_that_is_not_a_distance(tolerance):
    """-5 acted as +5 (it is squared) and NaN as 0."""
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 4:8, 4:8] = True
    with pytest.raises(ValueError, match=re.escape(f"tolerance must be a number of pixels >= 0, got {tolerance!r}")):
        M.pointing_game(torch.rand(1, 16, 16), mask, tolerance=tolerance)


def test_pointing_game_accuracy_refuses_hits_that_are_not_hits():
    """Hits of 2.0 and 0.5 gave a per-class "hit rate" of 1.25."""
    with pytest.raises(ValueError, match=r"hits must be bool \(or 0/1\)"):
        M.pointing_game_accuracy(torch.tensor([2.0, 0.5]), torch.tensor([0, 0]), 1)
    got = M.pointing_game_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), 1)
    assert got["mean"] == 0.5
