"""The fused relevance primitives in pure PyTorch: the reference every backend is tested
against, and the fallback for every call a fast backend does not cover.

These are the units a fast backend replaces (:mod:`relprop.ops.dispatch` dispatches them):
the split forward with its scaling epilogue (:func:`split_scale`), the split transposed
pass times the input, optionally with the uniform shift (:func:`split_backward`), and the
per-sample shift (:func:`shift_nonzero`) and AE's mass normalisation (:func:`ae_masses`)
on their own.  Each takes a non-negative input ``x``; rules keep signed inputs on the plain
path.  Notation of methods.md §1.1-1.2 (``fwd``/``bwd`` of :class:`LinearMap`, ``SD``).

:data:`EPILOGUES` is the one table of the split-scale epilogues: the Triton kernels' rule
constants (``kernels/epilogue.py``) and the C++ enums (``csrc/ops.h``, ``csrc/kernels.h``)
are tested against it (tests/test_primitives.py), so a rule cannot drift between backends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear_map import LinearMap
from .tensor import psum, safe_divide, stabilize


@dataclass(frozen=True)
class Epilogue:
    """One split-scale rule as every backend implements it.

    ``code``: the rule's number in the kernels (Triton constexpr, C++ enum), shared by the
    rules that compute the same formulas; ``kernel``: the name the compiled op takes for that
    code; ``split``: the sign split of the weights (``"pa"`` = ``[W+; |W-|]``, ``"pn"`` =
    ``[W+; W-]``); ``bias``: whether the layer's bias enters ``Z``; ``one_sided``:
    ``"always"``, ``"beta=0"`` (only ``S1`` when ``beta == 0``) or ``"never"``.
    """

    code: int
    kernel: str
    split: str
    bias: bool
    one_sided: str


EPILOGUES: dict[str, Epilogue] = {
    "rap-conv": Epilogue(0, "rap-conv", "pa", False, "never"),
    "rap-linear": Epilogue(1, "rap-linear", "pa", False, "never"),
    "alphabeta": Epilogue(2, "alphabeta", "pn", True, "beta=0"),
    "alphabeta-repo": Epilogue(3, "alphabeta-repo", "pn", False, "beta=0"),
    "zplus": Epilogue(2, "alphabeta", "pn", False, "always"),   # Gu's z+: alpha-beta, beta = 0, no bias
}


def split_scale(lin: LinearMap, x: torch.Tensor, r: torch.Tensor, rule: str, alpha: float = 1.0,
                beta: float = 0.0, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled relevances ``(S1, S2)`` from ``Z1 = fwd(x, W+)`` and ``Z2 = fwd(x, V2)``.

    * ``rap-conv``   (V2 = |W-|): ``S1 = SD(R+, Z1)``, ``S2 = SD(R, Z1 + Z2) + SD(R-, Z2)``
    * ``rap-linear`` (V2 = |W-|): ``S1 = SD(R, Z1)``,  ``S2 = SD(R, Z1 + Z2)``
    * ``alphabeta``  (V2 = W-, Zennit): ``Z1 += b+``, ``Z2 += b-``,
      ``S1 = alpha R / stabilize(Z1, eps)``, ``S2 = -beta R / stabilize(Z2, eps)``
    * ``alphabeta-repo`` (V2 = W-, RAP repository): ``S1 = alpha SD(R, Z1)``, ``S2 = -beta SD(R, Z2)``
    * ``zplus`` (Gu's CLRP z+): ``alphabeta`` with ``beta = 0`` and the bias ignored,
      ``S1 = alpha R / stabilize(Z1, eps)`` (``= R / (Z1 + eps)``, as ``Z1 >= 0``)

    With ``beta == 0`` (always for ``zplus``) only ``Z1`` is computed and ``S2 = None``.
    """
    split = EPILOGUES[rule].split
    zennit = rule in ("alphabeta", "zplus")
    b = lin.bias if EPILOGUES[rule].bias else None
    if one_sided(rule, beta):
        z1 = lin.fwd(x, lin.pos)
        if b is not None:
            z1 = z1 + bias_view(lin, b.clamp(min=0), z1)
        return (alpha * r / stabilize(z1, eps) if zennit else alpha * safe_divide(r, z1)), None
    z1, z2 = lin.fwd2(x, split)
    if rule == "rap-conv":
        return safe_divide(r.clamp(min=0), z1), safe_divide(r, z1 + z2) + safe_divide(r.clamp(max=0), z2)
    if rule == "rap-linear":
        return safe_divide(r, z1), safe_divide(r, z1 + z2)
    if zennit:
        if b is not None:
            z1 = z1 + bias_view(lin, b.clamp(min=0), z1)
            z2 = z2 + bias_view(lin, b.clamp(max=0), z2)
        return alpha * r / stabilize(z1, eps), -beta * r / stabilize(z2, eps)
    return alpha * safe_divide(r, z1), -beta * safe_divide(r, z2)


def one_sided(rule: str, beta: float) -> bool:
    """Whether ``split_scale`` computes only ``S1`` for this rule."""
    sided = EPILOGUES[rule].one_sided
    return sided == "always" or (sided == "beta=0" and beta == 0)


def split_backward(lin: LinearMap, x: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None, split: str,
                   shift_to: torch.Tensor | None = None) -> torch.Tensor:
    """``C = x * (bwd(S1, W+) + bwd(S2, V2))`` (``V2`` = W- for ``"pn"``, |W-| for ``"pa"``;
    ``S2 = None`` drops the second term).  With ``shift_to`` (B,), ``C`` is then shifted
    uniformly over its non-zero entries so that each sample sums to ``shift_to``."""
    if s2 is None:
        c = x * lin.bwd(s1, lin.pos, x.shape)
    else:
        c = x * lin.bwd2(s1, s2, split, x.shape)
    if shift_to is None:
        return c
    return shift_nonzero(c, psum(c) - shift_to.reshape(-1, *([1] * (c.ndim - 1))))


def shift_nonzero(c: torch.Tensor, excess: torch.Tensor) -> torch.Tensor:
    """Uniform shift of RAP/RSP/AE: ``c - [c != 0] * SD(excess, #nonzero(c))`` per sample."""
    nz = (c != 0).to(c.dtype)
    return c - nz * safe_divide(excess, psum(nz))


def ae_masses(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AE's target and hostile masses per sample: ``T = SD(R+, sum R+)`` (sums to 1) and
    ``O = -SD(R-, sum R-)`` (sums to -1, or 0 where there is no negative relevance)."""
    rp, rn = r.clamp(min=0), r.clamp(max=0)
    return safe_divide(rp, psum(rp)), -safe_divide(rn, psum(rn))


def bias_view(lin: LinearMap, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bias shaped to broadcast against a layer output."""
    return b.reshape(1, -1, *([1] * (like.ndim - 2))) if lin.is_conv else b
