"""Percentile-bootstrap confidence intervals over images (Efron & Tibshirani 1993, ch. 13),
for data-set summaries of per-image scores (means, medians, the pointing game's class mean)."""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["bootstrap_interval", "resample_indices", "nanmean_statistic", "nanmedian_statistic",
           "class_mean_statistic"]


def resample_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """``(resamples, n)`` indices drawn uniformly with replacement from ``range(n)`` by
    ``torch.randint`` on a CPU ``torch.Generator`` seeded with ``seed`` (deterministic; the
    same draws for every statistic of the same ``n`` and ``seed``, so methods scored on the
    same items are resampled alike)."""
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 items and resamples >= 1, got n={n}, resamples={resamples}")
    return torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(int(seed)))


def nanmean_statistic(values) -> Callable[[torch.Tensor], torch.Tensor]:
    """Statistic: the mean of ``values`` (N,) over the resampled items, ignoring NaN (NaN
    when a resample holds only NaN)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    return lambda idx: torch.nanmean(v[idx], dim=1)


def nanmedian_statistic(values) -> Callable[[torch.Tensor], torch.Tensor]:
    """Statistic: ``torch.nanmedian`` (the lower median for an even count) of the
    resampled items; +inf entries count as large values."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    return lambda idx: torch.nanmedian(v[idx], dim=1).values


def class_mean_statistic(hits, classes, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Statistic: the pointing game's accuracy, the mean over the classes present in the
    resample of each class's hit rate (:func:`relprop.metrics.pointing_game_accuracy`)."""
    h = torch.as_tensor(hits).cpu().to(torch.float64).reshape(-1)
    c = torch.as_tensor(classes).long().reshape(-1).cpu()

    def stat(idx):
        ci = c[idx]
        total = torch.zeros(idx.shape[0], num_classes, dtype=torch.float64).scatter_add_(1, ci, torch.ones_like(h[idx]))
        hit = torch.zeros_like(total).scatter_add_(1, ci, h[idx])
        present = total > 0
        rate = torch.where(present, hit / total.clamp(min=1), 0)
        return rate.sum(dim=1) / present.sum(dim=1)

    return stat


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of sorted finite values (numpy's default)."""
    pos = q * (sorted_values.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, sorted_values.numel() - 1)
    a, b = sorted_values[lo].item(), sorted_values[hi].item()
    return a if a == b or pos == lo else a + (pos - lo) * (b - a)      # inf == inf: no inf - inf


def bootstrap_interval(statistic: Callable[[torch.Tensor], torch.Tensor], n: int, resamples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval ``(low, high)`` of a statistic of ``n`` items.

    ``statistic(idx)`` maps ``(resamples, n)`` resampled item indices
    (:func:`resample_indices` with ``seed``) to the ``(resamples,)`` statistic values;
    ``low`` / ``high`` are their ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles
    (linear interpolation between the sorted values).  Resamples whose statistic is NaN
    (e.g. only NaN items drawn) are left out; ``(nan, nan)`` if all are.  Infinite values
    count as such (a quantile among them is inf).  ``n = 1`` gives a zero-width interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    values = statistic(resample_indices(n, resamples, seed)).double()
    values = values[~values.isnan()].sort().values
    if values.numel() == 0:
        return math.nan, math.nan
    return _quantile(values, (1 - level) / 2), _quantile(values, (1 + level) / 2)
