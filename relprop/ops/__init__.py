"""relprop's ops layer: the relevance primitives, their reference and their dispatch.

* :mod:`.tensor`     -- safe divide, stabiliser, per-sample sum, vjp, max-pool tie split, near
  ties and near zeros, per-channel counts and mean squares
* :mod:`.linear_map` -- :class:`LinearMap`: a Conv2d/Linear map (BatchNorm folded in on
  request; a Linear over channels-last positions as a 1x1 conv, :class:`PerPosition`), its
  sign-split weights, its transpose, per-sample conv products
* :mod:`.reference`  -- the fused primitives in pure torch and the :data:`EPILOGUES` table
* :mod:`.dispatch`   -- which backend runs the fused primitives (``torch``, ``triton``,
  ``cuda``), the one fallback to the reference, the self-check behind ``auto``
* :mod:`.cuda`       -- the ``cuda`` backend on the compiled ops ``torch.ops.relprop.*``

The ``triton`` backend is the top-level ``kernels/`` package, installed as
``relprop.kernels``.  Neither fast backend is imported until it is asked for.
"""
from .linear_map import (LinearMap, PerPosition, WeightsMap, channels_first, channels_last, conv_per_sample,
                         conv_transpose_per_sample, conv_weight_grad_per_sample)
from .reference import EPILOGUES, Epilogue, ae_masses, bias_view, one_sided, shift_nonzero, split_backward, split_scale
from .tensor import (masked_square_sums, maxpool_near_ties, maxpool_ties_split, mean_square_per_channel, near_zero_bound,
                     entries_near, near_zero_counts, near_zero_entries, psum, safe_divide, stabilize, vjp)

__all__ = ["LinearMap", "PerPosition", "WeightsMap", "channels_first", "channels_last", "EPILOGUES", "Epilogue", "split_scale", "split_backward", "shift_nonzero", "ae_masses",
           "one_sided", "bias_view", "safe_divide", "stabilize", "psum", "vjp", "maxpool_ties_split", "maxpool_near_ties",
           "entries_near", "near_zero_bound", "near_zero_entries", "near_zero_counts", "masked_square_sums", "mean_square_per_channel",
           "conv_weight_grad_per_sample", "conv_per_sample", "conv_transpose_per_sample"]
