"""Maps given as NumPy arrays: metrics accept them wherever they accept tensors."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["as_tensor"]


def as_tensor(value):
    """A NumPy array as a tensor (shared memory when possible, on the CPU); anything else
    unchanged, so that the caller's own type check reports it."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"maps must hold real numbers, got a NumPy array of {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    return value
