"""Model-randomisation sensitivity (Adebayo et al., NeurIPS 2018, "Sanity checks for saliency
maps"; used by RSP and AE) with batched Spearman rank correlation and SSIM."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import targets as T
from .arrays import as_tensor, check_finite

__all__ = ["cascading_randomization", "spearman", "ssim"]


def _rows(a: torch.Tensor, b: torch.Tensor):
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"expected a batch (B, ...), got shape {tuple(a.shape)}")
    check_finite(a, "maps")
    check_finite(b, "maps")
    dt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.reshape(a.shape[0], -1).to(dt), b.reshape(b.shape[0], -1).to(dt)


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Per-row ranks 1..N; tied values share the mean of their ranks (scipy 'average')."""
    b, n = v.shape
    s, idx = v.sort(dim=1)
    pos = torch.arange(n, device=v.device).expand(b, n)
    is_start = torch.ones_like(s, dtype=torch.bool)
    is_start[:, 1:] = s[:, 1:] != s[:, :-1]
    is_end = torch.ones_like(s, dtype=torch.bool)
    is_end[:, :-1] = is_start[:, 1:]
    start = torch.where(is_start, pos, 0).cummax(dim=1).values
    end = torch.where(is_end, pos, n).flip(1).cummin(dim=1).values.flip(1)
    avg = (start + end).to(v.dtype) / 2 + 1
    return torch.empty_like(avg).scatter_(1, idx, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample: ``(B,)`` for inputs ``(B, ...)`` (flattened).

    The Pearson correlation of the ranks, ties receiving the average of their ranks (as
    ``scipy.stats.spearmanr``).  NaN when a sample is constant (zero rank variance).
    """
    a, b = _rows(a, b)
    ra, rb = _average_ranks(a), _average_ranks(b)
    da = ra - ra.mean(dim=1, keepdim=True)
    db = rb - rb.mean(dim=1, keepdim=True)
    den = da.pow(2).sum(dim=1).sqrt() * db.pow(2).sum(dim=1).sqrt()
    rho = (da * db).sum(dim=1) / torch.where(den > 0, den, 1)
    return torch.where(den > 0, rho.clamp(-1, 1), math.nan)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al., IEEE TIP 2004): ``(B,)`` for ``(B, H, W)``.

    Standard SSIM: Gaussian window ``window_size x window_size`` with std ``sigma`` (11, 1.5),
    local means, variances and covariance as Gaussian-weighted (biased) moments over the
    *valid* window positions (no padding, as Wang et al.'s reference code),
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = data_range``; the SSIM map is
    averaged per image.  Images smaller than the window use the largest odd window that
    fits.  Symmetric in ``a`` and ``b``; 1 for identical inputs.
    """
    if a.ndim != 3:
        raise ValueError(f"ssim expects (B, H, W) maps, got shape {tuple(a.shape)}")
    _rows(a, b)
    dt = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dt), b.to(dt)
    k = min(int(window_size), a.shape[1], a.shape[2])
    k -= 1 - k % 2
    t = torch.arange(k, device=a.device, dtype=dt) - (k - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    stack = torch.stack([a, b, a * a, b * b, a * b], dim=1)          # (B, 5, H, W)
    y = F.conv2d(stack, g.view(1, 1, 1, -1).expand(5, 1, 1, k), groups=5)
    y = F.conv2d(y, g.view(1, 1, -1, 1).expand(5, 1, k, 1), groups=5)
    mu_a, mu_b, e_aa, e_bb, e_ab = y.unbind(dim=1)
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)


def _normalise_abs(h: torch.Tensor) -> torch.Tensor:
    """|h| / max|h| per image (0 for an all-zero map)."""
    a = h.abs()
    m = a.flatten(1).amax(dim=1)[:, None, None]
    return torch.where(m > 0, a / torch.where(m > 0, m, 1), 0)


def _normalise_minmax(h: torch.Tensor) -> torch.Tensor:
    """(h - min) / (max - min) per image (0 for a constant map)."""
    lo = h.flatten(1).amin(dim=1)[:, None, None]
    hi = h.flatten(1).amax(dim=1)[:, None, None]
    span = hi - lo
    return torch.where(span > 0, (h - lo) / torch.where(span > 0, span, 1), 0)


def _randomisable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim >= 2


def _explained(explain, model, x, targets, what: str) -> torch.Tensor:
    h = as_tensor(explain(model, x, targets))
    if not torch.is_tensor(h) or h.ndim != 3 or h.shape[0] != x.shape[0]:
        shape = tuple(h.shape) if hasattr(h, "shape") else type(h).__name__
        raise ValueError(f"explain(model, x, targets) must return (B, H, W) maps with B = {x.shape[0]} "
                         f"({what}), got {shape}")
    return check_finite(h, f"explain(model, x, targets) maps ({what})").to(x.device)


def cascading_randomization(model: nn.Module, x: torch.Tensor, target, explain, layers=None, seed: int = 0,
                            return_maps: bool = False) -> list[dict]:
    """Cascading model-parameter randomisation (Adebayo et al., NeurIPS 2018, "Sanity checks
    for saliency maps"; the model-sensitivity test of RSP and AE): one dict per step.

    ``explain(model, x, targets) -> (B, H, W)`` maps (tensor or NumPy array) is any
    attribution method; ``relprop.evaluate.explain_function(method, **params)`` binds a
    relprop method.  It must explain the model it is given as that model is at the call
    (it is called again on the same, further randomised module: nothing may be cached).

    Works on a ``copy.deepcopy`` of ``model``, put in eval mode (the user's model is never
    modified).  The layers are randomised **from the top (output) layer down,
    cumulatively**: by default every ``nn.Conv2d`` / ``nn.Linear`` module in reverse
    ``named_modules()`` order (other layers such as BatchNorm keep their parameters);
    ``layers`` (module names) replaces that list and its order (any module with a >= 2-D
    ``weight``).  Each step re-initialises one layer as the AE authors' ``Sanity.py``:
    ``weight <- xavier_uniform_``, ``bias <- uniform_(0, 1)``, drawing from a
    ``torch.Generator`` seeded with ``seed`` (one stream, layers in order: deterministic).

    ``target`` None means the classes the unrandomised copy predicts for ``x``, kept fixed
    for every step; otherwise it is handed to ``explain`` as given (class indices or a
    callable target, :mod:`relprop.targets`).  The reference map ``h0 = explain(copy, x,
    targets)`` is taken before any randomisation and compared per image with the map
    ``h`` after each step:

    * ``spearman``: rank correlation of ``|h0|`` and ``|h|`` over pixels (Adebayo et al.'s
      absolute-value variant; average ranks for ties; NaN for a constant map);
    * ``spearman_signed``: the same on the signed maps;
    * ``ssim``: :func:`ssim` (data range 1) of ``|h0| / max|h0|`` and ``|h| / max|h|``
      (each map normalised by its own maximum absolute value; an all-zero map stays 0);
    * ``ssim_signed``: SSIM of the signed maps, each min-max normalised to [0, 1].

    Returns ``[{"layer": name, "spearman": (B,), "spearman_signed": (B,), "ssim": (B,),
    "ssim_signed": (B,)}, ...]`` in randomisation order (plus ``"heatmap"``, the
    randomised model's ``(B, H, W)`` map, when ``return_maps``).
    """
    if isinstance(explain, str) or not callable(explain):
        hint = (f"; for a relprop method use relprop.evaluate.explain_function({explain!r})"
                if isinstance(explain, str) else "")
        raise TypeError(f"explain must be a callable explain(model, x, targets) -> (B, H, W) maps, got "
                        f"{type(explain).__name__} {explain!r}{hint}")
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f"x must be a batch tensor (B, ...), got "
                         f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
    net = copy.deepcopy(model).eval()
    modules = dict(net.named_modules())
    if layers is None:
        names = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))
                 and _randomisable(m)][::-1]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        if len(set(names)) != len(names):
            raise ValueError(f"layers contains duplicates: {names}")
        for n in names:
            if n not in modules:
                raise ValueError(f"no module named {n!r} in {type(model).__name__}")
            if not _randomisable(modules[n]):
                raise ValueError(f"module {n!r} ({type(modules[n]).__name__}) has no >= 2-D weight to randomise")
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d/Linear layer to randomise")

    if target is None:
        with torch.no_grad():
            out = net(x)
        T.class_targets(None, out)                  # checks the (B, classes) output
        targets = out.argmax(dim=1)
    elif T.is_callable_target(target):
        targets = target
    else:
        targets = T.as_targets(target, x.shape[0], x.device)
    h0 = _explained(explain, net, x, targets, "reference map")
    h0_abs, h0_mm = _normalise_abs(h0), _normalise_minmax(h0)

    generators: dict = {}
    results = []
    for name in names:
        m = modules[name]
        dev = m.weight.device
        if dev not in generators:
            generators[dev] = torch.Generator(device=dev).manual_seed(int(seed))
        gen = generators[dev]
        with torch.no_grad():
            nn.init.xavier_uniform_(m.weight, generator=gen)
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.uniform_(0.0, 1.0, generator=gen)
        h = _explained(explain, net, x, targets, f"after randomising {name!r}")
        entry = {
            "layer": name,
            "spearman": spearman(h0.abs(), h.abs()),
            "spearman_signed": spearman(h0, h),
            "ssim": ssim(h0_abs, _normalise_abs(h)),
            "ssim_signed": ssim(h0_mm, _normalise_minmax(h)),
        }
        if return_maps:
            entry["heatmap"] = h
        results.append(entry)
    return results
