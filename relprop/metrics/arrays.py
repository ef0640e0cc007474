"""Maps given as NumPy arrays: metrics accept them wherever they accept tensors."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_tensor", "check_finite"]


def as_tensor(value):
    """A NumPy array as a tensor (shared memory when possible, on the CPU); anything else
    unchanged, so that the caller's own type check reports it."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"maps must hold real numbers, got a NumPy array of {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def check_finite(maps: torch.Tensor, what: str = "heat maps") -> torch.Tensor:
    """``maps`` (B, ...) unchanged, or a ValueError naming the samples holding NaN or Inf: a
    metric of such a map is undefined (a NaN pixel would win an arg-max, or vanish from a
    sum), and a score that looks ordinary must not be returned for it."""
    if maps.is_floating_point() or maps.is_complex():
        bad = ~torch.isfinite(maps.reshape(maps.shape[0], -1)).all(dim=1) if maps.ndim else ~torch.isfinite(maps)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            raise ValueError(f"{what} of sample(s) {rows[:10]}{' ...' if len(rows) > 10 else ''} contain NaN or Inf: "
                             "the metric is undefined for them (fix or drop those maps)")
    return maps
