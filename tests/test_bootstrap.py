"""Bootstrap confidence intervals over images (relprop.metrics.bootstrap) against a
hand-computed percentile bootstrap, and the intervals of the evaluate report."""
import math

import numpy as np
import pytest
import torch

from relprop import metrics as M
from relprop.metrics import bootstrap as B


def hand_percentile_bootstrap(values, statistic, resamples, seed, level=0.95):
    """Draw the resamples as documented (torch.randint on a CPU generator seeded with seed),
    apply a plain-Python statistic to each, and take numpy's linear percentiles."""
    idx = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    stats = [statistic([values[i] for i in row]) for row in idx.tolist()]
    stats = [s for s in stats if not math.isnan(s)]
    return (np.percentile(stats, 100 * (1 - level) / 2), np.percentile(stats, 100 * (1 + level) / 2))


def py_nanmean(v):
    kept = [a for a in v if not math.isnan(a)]
    return sum(kept) / len(kept) if kept else math.nan


def py_lower_median(v):
    kept = sorted(a for a in v if not math.isnan(a))
    return kept[(len(kept) - 1) // 2] if kept else math.nan


def test_two_values_cover_the_whole_range():
    """Items (0, 1): resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4, so
    the 2.5% and 97.5% quantiles of 1000 resamples are exactly 0 and 1."""
    assert B.bootstrap_interval(B.nanmean_statistic([0.0, 1.0]), 2, 1000, seed=0) == (0.0, 1.0)
    assert B.bootstrap_interval(B.nanmean_statistic([0.5, 0.5, 0.5]), 3, 50) == (0.5, 0.5)
    assert B.bootstrap_interval(B.nanmean_statistic([0.25]), 1, 50) == (0.25, 0.25)


@pytest.mark.parametrize("seed", [0, 7])
def test_mean_and_median_against_a_hand_computed_bootstrap(seed):
    values = [0.3, 1.5, -0.2, 2.25, 0.9, math.nan, 4.0]
    for fast, slow in ((B.nanmean_statistic, py_nanmean), (B.nanmedian_statistic, py_lower_median)):
        got = B.bootstrap_interval(fast(values), len(values), 37, seed=seed)
        want = hand_percentile_bootstrap(values, slow, 37, seed)
        assert got == pytest.approx(want, abs=1e-12)
    got90 = B.bootstrap_interval(B.nanmean_statistic(values), len(values), 37, level=0.9, seed=seed)
    assert got90 == pytest.approx(hand_percentile_bootstrap(values, py_nanmean, 37, seed, 0.9), abs=1e-12)


def test_pointing_game_class_mean_matches_pointing_game_accuracy_per_resample():
    hits = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    classes = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    stat = B.class_mean_statistic(hits, classes, 4)
    idx = B.resample_indices(8, 25, seed=3)
    got = stat(idx)
    for row, value in zip(idx, got):
        assert value.item() == pytest.approx(M.pointing_game_accuracy(hits[row], classes[row], 4)["mean"], abs=1e-12)
    assert stat(torch.arange(8)[None]).item() == pytest.approx(M.pointing_game_accuracy(hits, classes, 4)["mean"])


def test_deterministic_seeded_and_edge_cases():
    v = torch.randn(30)
    a = B.bootstrap_interval(B.nanmean_statistic(v), 30, 200, seed=1)
    assert a == B.bootstrap_interval(B.nanmean_statistic(v), 30, 200, seed=1)
    assert a != B.bootstrap_interval(B.nanmean_statistic(v), 30, 200, seed=2)
    assert a[0] < v.double().mean().item() < a[1]
    low, high = B.bootstrap_interval(B.nanmean_statistic([math.nan, math.nan]), 2, 10)
    assert math.isnan(low) and math.isnan(high)
    assert B.bootstrap_interval(B.nanmedian_statistic([math.inf, math.inf, 1.0]), 3, 200) == (1.0, math.inf)
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got 1.5"):
        B.bootstrap_interval(B.nanmean_statistic(v), 30, 10, level=1.5)
    with pytest.raises(ValueError, match="need n >= 1 items and resamples >= 1, got n=0, resamples=10"):
        B.bootstrap_interval(B.nanmean_statistic([]), 0, 10)
