"""Layer rules shared by the methods (methods.md §1, §7).

A rule maps ``(layer, R)`` -- ``R`` the relevance at the layer output -- to a list with
the relevance at each tensor input.  Factories take the method-specific choices (how the
input is stabilised, how denominators are guarded) and return the rule.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import graph as g
from .engine import NEAR_TIE_UNITS, NEAR_ZERO_UNITS, Layer, Rule
from .ops import WeightsMap, maxpool_near_ties, maxpool_ties_split, near_zero_entries, safe_divide, stabilize, vjp
from .ops import reference as reference_ops

Divide = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eps_divide(eps: float) -> Divide:
    """``R / stabilize(z, eps)`` (Zennit's stabiliser)."""
    return lambda r, z: r / stabilize(z, eps)


def plus_divide(eps: float) -> Divide:
    """``R / (z + eps)`` (LRP code of the RAP repository, Gu's CLRP)."""
    return lambda r, z: r / (z + eps)


# ----------------------------------------------------------------- structural rules
def passthrough(layer: Layer, r: torch.Tensor) -> list:
    """ReLU and the other activations (GELU, SiLU, ...: the epsilon/z rules see an elementwise
    activation ``g`` as the identity, i.e. gradient x input with ``g'(z)`` replaced by
    ``g(z) / z``), Dropout, Identity, stochastic depth (and BatchNorm for Zennit): relevance
    passes unchanged."""
    return [r]


def signal_take_all(layer: Layer, r: torch.Tensor) -> list:
    """Gate ``y = x * g`` (squeeze-excitation): the signal ``x`` takes all the relevance and the
    gate ``g`` none (its branch is not visited), as LRP treats LSTM gates (Arras et al. 2017)."""
    outs = [None, None]
    signal = 1 - layer.node.gate
    outs[signal] = r.sum_to_size(layer.xs[signal].shape)
    return outs


def batchnorm_authors(layer: Layer, r: torch.Tensor) -> list:
    """The authors' BatchNorm rule ``x * SD(R, x*w) * w``, ``w = gamma / sqrt(var^2 + eps)``
    (sic, methods.md §1.4, §2.7): the identity, except that relevance is dropped where
    ``x*w == 0`` (a BatchNorm input that is exactly zero)."""
    m = layer.node.module
    w = (m.running_var ** 2 + m.eps).rsqrt()
    if m.weight is not None:
        w = w * m.weight.detach()
    xw = layer.x * w.reshape(1, -1, *([1] * (layer.x.ndim - 2)))
    return [torch.where(xw != 0, r, torch.zeros((), dtype=r.dtype, device=r.device))]


def scale(layer: Layer, r: torch.Tensor) -> list:
    """``y = c * x`` for a constant number or a model tensor ``c`` (ConvNeXt's layer scale): an
    elementwise linear map without bias, whose z-rule ``x * c * R / y`` is ``R``; summed over
    the dims ``c`` broadcasts ``x`` along, if any."""
    return [r.sum_to_size(layer.x.shape)]


def layernorm(divide: Divide = safe_divide) -> Rule:
    """LayerNorm over the last dims (channels-last ``nn.LayerNorm``, torchvision's
    ``LayerNorm2d``), the "identity" convention of AttnLRP / LXT (Achtibat et al. 2024): with
    the mean and standard deviation held fixed, ``y = (x - mean) / std * w + b`` is the
    elementwise affine map ``y = a * x + c``, ``a = w / std``, ``c = b - mean * a``.  Relevance
    takes its z-rule, ``R_in = x * a * divide(R, y)``: the offset ``c`` is a bias in the
    denominator, as a BatchNorm's is once folded into the conv before it (lrp-epsilon).  With
    ``divide`` the plain quotient this is gradient x input of the net with the statistics
    detached (tests/test_layernorm.py); it conserves where ``c = 0``.  Used by every method
    (its own ``divide``)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        m, x = layer.node.module, layer.x
        dims = tuple(range(x.ndim - len(m.normalized_shape), x.ndim))
        a = (x.var(dims, unbiased=False, keepdim=True) + m.eps).rsqrt()
        if m.weight is not None:
            a = a * m.weight.detach().to(x.dtype)
        return [x * a * divide(r, layer.y)]
    return rule


def norm_identity(layer: Layer, r: torch.Tensor) -> list:
    """AE's, RSP's and RAP's LayerNorm, RMS norm, GlobalResponseNorm and constant offset
    ``x + c`` (a ViT's position embedding): relevance passes unchanged where the input is
    non-zero, as through their authors' BatchNorm (:func:`batchnorm_authors`), and their
    convolutions' bias takes none.  Their relevance is not proportional to a layer's output
    (AE's and RSP's start from a Grad-CAM map and their hidden rules give inactive units a
    share; RAP's uniform shift adds a constant to every non-zero entry), so the z-rule's
    ``R * (1 - c / y)`` would amplify it without bound where the output ``y`` nears 0 beside
    the offset ``c`` (README, Numerics: up to 0.29 off float64 on shapes-convnext, and as
    unstable in float64 under a 1e-7 change of the input)."""
    return [torch.where(layer.x != 0, r, torch.zeros((), dtype=r.dtype, device=r.device))]


def rms_norm(divide: Divide = safe_divide) -> Rule:
    """An RMS norm (nn.RMSNorm, timm's RmsNorm / RmsNorm2d) by the LayerNorm convention: with the
    root mean square held fixed, ``y = a * x``, ``a = w / rms(x)``
    (:func:`relprop.graph.rms_norm_scale`), an elementwise linear map without offset whose
    z-rule ``R_in = x * a * divide(R, y)`` passes relevance unchanged wherever ``y != 0`` (up
    to the method's stabiliser).  Used by every method (its own ``divide``)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        return [layer.x * g.rms_norm_scale(layer.node.module, layer.x) * divide(r, layer.y)]
    return rule


def response_norm(divide: Divide = safe_divide) -> Rule:
    """ConvNeXt V2's GlobalResponseNorm ``y = x + b + w * x * n(x)`` by the LayerNorm convention:
    with the response ``n(x)`` (:func:`relprop.graph.response_norm_scale`) held fixed it is the
    elementwise affine map ``y = a * x + b``, ``a = 1 + w * n(x)``, whose z-rule
    ``R_in = x * a * divide(R, y)`` relevance takes.  Used by every method (its own ``divide``)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        m, x = layer.node.module, layer.x
        a = 1 + m.weight.detach().to(x.dtype).view(m.wb_shape) * g.response_norm_scale(m, x)
        return [x * a * divide(r, layer.y)]
    return rule


def reshape(layer: Layer, r: torch.Tensor) -> list:
    """Flatten / view / reshape: relevance takes the input's shape back."""
    return [r.reshape(layer.x.shape)]


def cat(layer: Layer, r: torch.Tensor) -> list:
    """Concatenation: each input gets its own slice of the relevance; the slice of a model
    tensor concatenated to the signal (a ViT's class token) is dropped, as a bias's share."""
    dim = layer.args[1] if len(layer.args) > 1 else layer.kwargs.get("dim", 0)
    tensors = layer.args[0] if layer.args else layer.kwargs["tensors"]
    refs = layer.node.args[0] if layer.node.args else layer.node.kwargs["tensors"]
    pieces = r.split([t.shape[dim] for t in tensors], dim=dim)
    return [p for ref, p in zip(refs, pieces) if isinstance(ref, g.Ref) and ref in layer.node.parents]


def offset(divide: Divide = safe_divide) -> Rule:
    """``y = x + c`` with ``c`` a model tensor (a ViT's position embedding), a bias: the z-rule
    ``R_in = x * divide(R, y)``; the share ``c * R / y`` of the offset is dropped.  With the
    plain quotient it is gradient x input; it conserves where ``c = 0``.  Used by every method
    (its own ``divide``)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        return [layer.x * divide(r, layer.y)]
    return rule


def index(layer: Layer, r: torch.Tensor) -> list:
    """Basic indexing ``y = x[idx]``: each entry's relevance goes back where it was read."""
    out = torch.zeros_like(layer.x)
    out[layer.args[1]] = r
    return [out]


def split_piece(layer: Layer, r: torch.Tensor) -> list:
    """Piece ``i`` of ``x.split(...)`` / ``x.chunk(...)``: its relevance in its place, zeros
    elsewhere; the pieces' relevances add up at the split, which passes them on."""
    pieces = layer.x
    i = layer.args[1] % len(pieces)
    if layer.node.stack:   # a piece of unbind: the dim it was cut along is stacked back
        return [torch.stack([r if j == i else torch.zeros_like(p) for j, p in enumerate(pieces)], dim=layer.node.dim)]
    return [torch.cat([r if j == i else torch.zeros_like(p) for j, p in enumerate(pieces)], dim=layer.node.dim)]


def permute(layer: Layer, r: torch.Tensor) -> list:
    """``transpose`` / ``permute``: relevance is permuted back."""
    if layer.node.target in ("transpose", torch.transpose):
        return [r.transpose(layer.args[1], layer.args[2])]
    dims = layer.args[1] if len(layer.args) == 2 and not isinstance(layer.args[1], int) else layer.args[1:]
    order = [d % r.ndim for d in dims]
    return [r.permute([order.index(k) for k in range(r.ndim)])]


def roll(layer: Layer, r: torch.Tensor) -> list:
    """``torch.roll`` (a Swin's cyclic shift), a permutation: each entry's relevance goes back
    where it was read, rolled by the opposite shift (README, Conventions)."""
    shifts = layer.args[1] if len(layer.args) > 1 else layer.kwargs["shifts"]
    dims = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("dims")
    back = -shifts if isinstance(shifts, int) else tuple(-s for s in shifts)
    return [torch.roll(r, back, dims)]


def pad(layer: Layer, r: torch.Tensor) -> list:
    """``F.pad`` in constant mode (a Swin's padding to whole windows, its patch merging): the
    padded entries are constants, whose relevance is dropped like a bias's share, and the
    input's entries keep theirs; a negative pad (a crop) gives the cropped entries none.  With
    zero padding every rule here already gives the padded zeros no relevance (they enter every
    rule as a factor ``x = 0``), so nothing is dropped there (README, Conventions)."""
    widths = layer.args[1] if len(layer.args) > 1 else layer.kwargs["pad"]
    return [torch.nn.functional.pad(r, [-w for w in widths])]


def proportional_add(transform=None, divide: Divide = safe_divide) -> Rule:
    """Residual add ``y = x0 + x1``: ``R_k = x_k * R / (x0 + x1)`` on transformed inputs."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        xs = [transform(x) if transform else x for x in layer.xs]
        s = divide(r, xs[0] + xs[1])
        return [x * s for x in xs]
    return rule


def abs_add(divide: Divide = safe_divide) -> Rule:
    """Residual add ``y = x0 + x1``: ``R_k = |x_k| * R / (|x0| + |x1|)``, the ratio of the
    "Relevance Splitting" of LRP for ResNet (Otsuki et al., arXiv 2407.09115; their
    ``flows_skip`` variant applies it at every add).  Both shares have the sign of ``R``, so
    nearly cancelling branches (``x0 ~ -x1``) split ``R`` about equally instead of into two
    large opposite shares.  ``R0 + R1 = R`` wherever ``|x0| + |x1| > 0``."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        xs = [x.abs() for x in layer.xs]
        s = divide(r, xs[0] + xs[1])
        return [x * s for x in xs]
    return rule


def equal_add(layer: Layer, r: torch.Tensor) -> list:
    """Residual add ``y = x0 + x1``: ``R_k = R / 2`` whatever the inputs (the "simple" split of
    the LRP-for-ResNet ablation); conserves ``R`` exactly."""
    half = r / 2
    return [half.sum_to_size(x.shape) if x.shape != r.shape else half for x in layer.xs]


ADD_RULES = ("proportional", "abs", "equal")


def add_rule(method: str, choice: str, transform=None, divide: Divide = safe_divide) -> Rule:
    """The residual-add rule ``choice`` of a method (its ``add_rule=`` parameter):

    * ``"proportional"``: the method's own rule, :func:`proportional_add` with its
      ``transform`` and ``divide`` (signed inputs for LRP, RAP, CLRP, SGLRP; ``x+ + 1e-9``
      for RSP and AE);
    * ``"abs"``: :func:`abs_add` (LRP-for-ResNet's Relevance Splitting ratio) with ``divide``;
    * ``"equal"``: :func:`equal_add`.

    A ValueError naming the method for anything else."""
    if not isinstance(choice, str) or choice not in ADD_RULES:
        raise ValueError(f"method {method!r}: add_rule must be one of {', '.join(map(repr, ADD_RULES))}, "
                         f"got {choice!r}")
    if choice == "abs":
        return abs_add(divide)
    if choice == "equal":
        return equal_add
    return proportional_add(transform, divide)


def proportional_pool(transform=None, divide: Divide = safe_divide) -> Rule:
    """Pooling as a z-rule: ``R_in = x * vjp_pool(R / pool(x))`` -- winner-take-all for max
    pooling (PyTorch's arg-max), proportional to the input for average pooling and for
    upsampling (a map with weights >= 0, like an average)."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        x = transform(layer.x) if transform else layer.x
        z = layer.recompute(x) if transform else layer.y
        s = divide(r, z)
        if not transform and not layer.x_nonneg and layer.node.kind in AVERAGES:
            report_signed_average(layer, x, z, s, r)
        return [x * vjp(layer.recompute, x, s)]
    return rule


AVERAGES = (g.AVGPOOL, g.ADAPTIVE_AVGPOOL, g.UPSAMPLE)   # maps with weights >= 0 (not a max pool)


def report_signed_average(layer: Layer, x: torch.Tensor, z: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> None:
    """Report the amplification of a proportional average over signed inputs (an n-way
    residual split): where an output's inputs nearly cancel, ``z = sum_i w_i x_i`` is small
    against ``k = sum_i w_i |x_i|``, the shares ``x_i R / z`` are large and of both signs, and
    a relative error ``u`` of the inputs becomes ``u k / |z|`` in each of them: an error
    ``u |x| * vjp(|s| k / |z|)`` of the layer's relevance, relative to ``||R||`` (as
    ``engine.split_amplification`` for a two-way add).  ReLU inputs (k = |z|) are skipped:
    their shares have one sign and amplify nothing."""
    if layer.report is None or layer.unit == 0:
        return
    xa = x.abs()
    k = safe_divide(layer.recompute(xa), z.abs())
    err = xa * vjp(layer.recompute, x, s.abs() * k)
    layer.report(layer.unit * err.flatten(1).norm(dim=1), r.flatten(1).norm(dim=1))


def winner_take_all(layer: Layer, r: torch.Tensor) -> list:
    """Max pooling as a plain gradient: each window's relevance goes to its arg-max (Zennit)."""
    return [vjp(layer.recompute, layer.x, r)]


def near_zero(layer: Layer) -> torch.Tensor | None:
    """The entries of the layer's first input within rounding of 0 (:data:`NEAR_ZERO_UNITS`),
    as a count per entry: read off the pre-activation where the input is an activation's
    output whose sign is its input's (ReLU, GELU, SiLU, ...: both sides of 0 are seen there,
    where a ReLU maps the negative side to exact zeros and a GELU's far negative tail is near 0
    without being near a crossing); off the input itself where it is signed; and where it is
    non-negative of another origin (a max pool of ReLU outputs) off its positive side, each
    counted twice for the unseen other side.  None where nothing is reported (no report, or
    exact arithmetic).  A channel that is 0 throughout has no scale and no entry near 0."""
    if layer.report is None or layer.unit == 0:
        return None
    z = layer.pre_activation() if layer.pre_activation is not None else layer.x
    one_side = layer.pre_activation is None and layer.x_nonneg
    near = near_zero_entries(z, NEAR_ZERO_UNITS * layer.unit)
    if one_side:
        near &= z > 0
    return near.to(z.dtype) * (2.0 if one_side else 1.0)


def report_zero_crossings(layer: Layer, out: torch.Tensor, near: torch.Tensor | None,
                          excess: torch.Tensor | None = None, masks_err: torch.Tensor | None = None) -> None:
    """Report to the map's estimate what inputs within rounding of 0 (``near``, from
    :func:`near_zero`) may change in a rule's result ``out``.  ``excess`` (B,): the magnitude
    (or a bound of it) of what a uniform shift over the non-zero entries takes from their sum
    (RAP, RSP, AE), so each such entry gains or loses the shift ``excess / #nonzero(out)``
    (the count changing by one moves every other entry by a share of that); ``masks_err``
    (B,) adds what else changes there (AE's ``|A - B|``)."""
    if near is None:
        return
    flat = out.flatten(1)
    norm = flat.norm(dim=1)
    err = torch.zeros_like(norm) if masks_err is None else masks_err.to(norm.dtype)
    if excess is not None:
        shift = safe_divide(excess.reshape(-1).to(norm.dtype).abs(), (flat != 0).sum(1).to(norm.dtype))
        err = err.square().add_(near.flatten(1).sum(1).to(norm.dtype) * shift.square()).sqrt_()
    layer.report(err, norm)


def maxpool_ties_shared(layer: Layer, r: torch.Tensor) -> list:
    """Gu's max-pool rule: a window's relevance is split equally among its maximal entries."""
    return [maxpool_ties_split(layer.x, r, *g.maxpool_params(layer.node, layer.args, layer.kwargs))]


def near_ties_reported(rule: Rule) -> Rule:
    """``rule`` for a 2-d max pool, which also reports the windows it cannot trust: where the
    winner is decided by rounding (:func:`relprop.ops.maxpool_near_ties`), the window's
    relevance ``r`` lands on one entry in this precision and may land on another in float64,
    a change of ``sqrt(2) |r|`` in the layer's relevance; their norm relative to ``||r||`` is
    added to the map's estimate (README, Numerics).  The max pool itself is discontinuous
    there: the map is ill-conditioned in any precision, as at an ε-rule's near-ε division."""
    def reported(layer: Layer, r: torch.Tensor) -> list:
        out = rule(layer, r)
        if layer.report is not None and layer.unit > 0 and layer.x.ndim == 4 and r.ndim == 4:
            kernel, stride, padding, dilation, _ = g.maxpool_params(layer.node, layer.args, layer.kwargs)
            near = maxpool_near_ties(layer.x, r.shape[2:], kernel, stride, padding, dilation,
                                     NEAR_TIE_UNITS * layer.unit)
            layer.report((r * near).flatten(1).norm(dim=1) * 2 ** 0.5, r.flatten(1).norm(dim=1))
        return out
    return reported


# ----------------------------------------------------------------- attention
ATTENTION_RULES = ("cp-lrp", "attnlrp")


def attention_weights(layer: Layer, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, v)`` of an attention node: for ``scaled_dot_product_attention(q, k, v)`` the
    weights ``a = softmax(logits)`` (:func:`sdpa_logits`) recomputed from ``q`` and ``k`` (in
    ``dtype`` if given), for ``softmax(...) @ v`` the product's own operands."""
    if layer.node.kind != g.ATTENTION:
        return layer.xs[0], layer.xs[1]
    q, k, v = layer.xs
    if dtype is not None:
        q, k = q.to(dtype), k.to(dtype)
    return sdpa_logits(layer, q, k)[1].softmax(-1), v


def _sdpa_scale(layer: Layer, q: torch.Tensor) -> float:
    scale = layer.kwargs.get("scale", layer.args[6] if len(layer.args) > 6 else None)
    return q.shape[-1] ** -0.5 if scale is None else scale


def sdpa_logits(layer: Layer, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q @ k^T * scale, logits)`` of ``scaled_dot_product_attention``: the logits add the
    call's constant ``attn_mask`` (a float mask is added, a boolean mask's False entries are
    -inf) or, ``is_causal``, -inf above the diagonal.  The mask is a constant like a bias
    (README, Conventions): it takes no relevance."""
    scores = q @ k.transpose(-2, -1) * _sdpa_scale(layer, q)
    mask = layer.args[3] if len(layer.args) > 3 else layer.kwargs.get("attn_mask")
    causal = layer.args[5] if len(layer.args) > 5 else layer.kwargs.get("is_causal", False)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is None:
        return scores, scores
    if mask.dtype == torch.bool:
        return scores, scores.masked_fill(~mask, float("-inf"))
    return scores, scores + mask


def constant_weights(method: str, linear: Rule | None) -> Rule:
    """CP-LRP (Ali et al. 2022): the attention weights ``a`` (the softmax output, any mask or bias
    of the logits included: README, Conventions) are held constant, so ``out = a @ v`` is a
    linear map of the values ``v`` (:class:`~relprop.ops.WeightsMap`), whose relevance the
    method's own Linear rule ``linear`` gives (for LRP-epsilon ``R_v = v * (a^T @ (R /
    stabilize(out)))``); nothing flows into ``q`` and ``k``.  Under the
    epsilon rule (epsilon -> 0) this is gradient x input with the weights detached.

    Weights below float32's smallest normal number (a Swin's shift mask adds -100 to the
    logits: weights of about ``exp(-100)``) are :func:`subnormal_weights`' case."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        if linear is None:
            raise NotImplementedError(f"method {method!r} has no Linear rule for the values of "
                                      f"{layer.node.describe()}")
        a, v = attention_weights(layer)
        # one host sync per attention layer of a float32 model (the branch needs the answer)
        if a.dtype == torch.float32 and bool(_subnormal(a).any()):
            rv = subnormal_weights(layer, linear, a, v, r)
        else:
            rv = _values_rule(layer, linear, a, v, r)
        return [None] * (len(layer.xs) - 1) + [rv]
    return rule


def _subnormal(a: torch.Tensor) -> torch.Tensor:
    """Where the weights ``a`` are below their dtype's smallest normal number (and not zero)."""
    return (a > 0) & (a < torch.finfo(a.dtype).tiny)


def _values_rule(layer: Layer, linear: Rule, a: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``linear`` on ``out = a @ v`` as a Linear over the token dim of ``v`` (transposed)."""
    z = (a @ v).transpose(-1, -2)
    sub = Layer(layer.node, [v.transpose(-1, -2)], z, (), {}, lin=WeightsMap(a), z=z, ops=reference_ops)
    return linear(sub, r.transpose(-1, -2))[0].transpose(-1, -2)


def subnormal_weights(layer: Layer, linear: Rule, a: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The values' relevance where float32 attention weights are subnormal (``0 < a < 2^-126``;
    README, Numerics).  A rule whose sign-split quotient ``R / sum_j a_ij v_j^+`` meets a sum of
    such weights alone (RAP's, SGLRP's on a Swin: the only positive values sit in masked
    windows) divides by ~1e-44 and overflows float32, and a subnormal weight carries only a few
    bits.  So the rule runs in float64 here, on weights recomputed in float64 from ``q`` and
    ``k`` for ``scaled_dot_product_attention`` (exact, as the float64 model's), or else on the
    float32 weights, each known only to within half the smallest subnormal ``u = 2^-150``: the
    map's sensitivity to that is estimated by the rule itself, once more in float64 with the
    subnormal weights moved by ``+-u`` (alternating signs), and reported per row."""
    fused = layer.node.kind == g.ATTENTION
    a64 = attention_weights(layer, torch.float64)[0] if fused else a.double()
    rv = _values_rule(layer, linear, a64, v.double(), r.double())
    if not fused and layer.report is not None:
        sub = _subnormal(a)
        i = torch.arange(a.shape[-2], device=a.device).view(-1, 1)
        j = torch.arange(a.shape[-1], device=a.device)
        sign = 1.0 - 2.0 * ((i + j) % 2).to(torch.float64)
        moved = a64 + torch.where(sub, sign * 2.0 ** -150, 0.0)
        err = (_values_rule(layer, linear, moved, v.double(), r.double()) - rv).flatten(1).norm(dim=1)
        layer.report(err.to(v.dtype), rv.flatten(1).norm(dim=1).to(v.dtype))
    return rv.to(v.dtype)


def no_relevance(layer: Layer, r: torch.Tensor) -> list:
    """CP-LRP's softmax: the attention weights are constant, their branch takes no relevance."""
    return [None]


def half_product(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, z: torch.Tensor, divide: Divide,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AttnLRP's uniform rule for ``z = scale * a @ b`` with two non-constant operands: each
    takes half, ``R_a = a * (S @ b^T) / 2``, ``R_b = b * (a^T @ S) / 2``, ``S = scale * divide(R, z)``
    (gradient x input with the gradients halved); ``R_a + R_b`` sums to ``R`` where ``divide``
    is exact."""
    s = divide(r, z) * scale
    return a * (s @ b.transpose(-1, -2)) / 2, b * (a.transpose(-1, -2) @ s) / 2


def softmax_rule(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AttnLRP's softmax rule (Achtibat et al. 2024, Prop. 3.1; LXT): ``s = softmax(x)`` over the
    last dim, ``R_in = x * (R - s * sum_j R_j)`` (the linearisation at ``x``; it does not conserve).
    A masked logit (-inf, weight 0) gets none."""
    out = x * (r - s * r.sum(-1, keepdim=True))
    return out if torch.isfinite(x).all() else torch.where(torch.isfinite(x), out, 0)


def attnlrp_layers(divide: Divide) -> dict:
    """AttnLRP's rules for the attention kinds: :func:`softmax_rule`, :func:`half_product` on
    ``q @ k^T`` and ``a @ v``; the fused attention takes them in turn."""
    def matmul(layer: Layer, r: torch.Tensor) -> list:
        return list(half_product(layer.xs[0], layer.xs[1], r, layer.y, divide))

    def softmax(layer: Layer, r: torch.Tensor) -> list:
        return [softmax_rule(layer.x, layer.y, r)]

    def fused(layer: Layer, r: torch.Tensor) -> list:
        q, k, v = layer.xs
        scale = _sdpa_scale(layer, q)
        scores, logits = sdpa_logits(layer, q, k)
        a = logits.softmax(-1)
        r_a, r_v = half_product(a, v, r, a @ v, divide)
        # the mask is an additive constant: like the offset rule, its share of the logits'
        # relevance is dropped (the quotient below divides by the logits, mask included)
        r_q, r_k_t = half_product(q, k.transpose(-2, -1), softmax_rule(logits, a, r_a), logits, divide, scale)
        return [r_q, r_k_t.transpose(-2, -1), r_v]
    return {g.SOFTMAX: softmax, g.MATMUL: matmul, g.ATTENTION: fused}


def attention_layers(method: str, choice: str, linear: Rule | None, divide: Divide = safe_divide) -> dict:
    """The attention entries of a method's table (its ``attention_rule=`` parameter):
    ``"cp-lrp"`` (default): :func:`constant_weights` with the method's Linear rule ``linear``
    and :func:`no_relevance` at the softmax; ``"attnlrp"``: :func:`attnlrp_layers` with the
    method's quotient ``divide``.  A ValueError naming the method for anything else."""
    if not isinstance(choice, str) or choice not in ATTENTION_RULES:
        raise ValueError(f"method {method!r}: attention_rule must be one of "
                         f"{', '.join(map(repr, ATTENTION_RULES))}, got {choice!r}")
    if choice == "attnlrp":
        return attnlrp_layers(divide)
    cp = constant_weights(method, linear)
    return {g.SOFTMAX: no_relevance, g.MATMUL: cp, g.ATTENTION: cp}


def shared_layers(pool: Rule, add: Rule, maxpool: Rule | None = None, bn: Rule = batchnorm_authors,
                  norm: Divide | None = safe_divide) -> dict:
    """The rule table entries every method shares, with its own pooling and add rules and the
    quotient ``norm`` its normalisation and offset rules divide with (their z-rules), or with
    ``norm=None`` the identity there (:func:`norm_identity`: AE, RSP and RAP)."""
    identity = norm is None
    return {g.OFFSET: norm_identity if identity else offset(norm), g.RELU: passthrough,
            g.LEAKY_RELU: passthrough, g.ACTIVATION: passthrough, g.GATE: signal_take_all, g.SCALE: scale,
            g.LAYERNORM: norm_identity if identity else layernorm(norm),
            g.RMS_NORM: norm_identity if identity else rms_norm(norm),
            g.RESPONSE_NORM: norm_identity if identity else response_norm(norm), g.PASS: passthrough,
            g.INDEX: index, g.SPLIT: passthrough,
            g.PIECE: split_piece, g.PERMUTE: permute, g.ROLL: roll, g.PAD: pad, g.BN: bn, g.RESHAPE: reshape,
            g.CAT: cat, g.ADD: add, g.MAXPOOL: near_ties_reported(maxpool or pool), g.AVGPOOL: pool, g.ADAPTIVE_AVGPOOL: pool,
            g.UPSAMPLE: pool}


# ----------------------------------------------------------------- input-layer rules
def image_bounds(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample global min / max of the input (the wjNam repositories' z^B bounds)."""
    dims = tuple(range(1, x.ndim))
    return x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)


def zbox(bounds="image", divide: Divide = safe_divide) -> Rule:
    """z^B: ``Z = fwd(x,W) - fwd(L,W+) - fwd(H,W-)``,
    ``R_in = x*bwd(S,W) - L*bwd(S,W+) - H*bwd(S,W-)`` with ``S = divide(R, Z)`` (methods.md §1.4, §2.6).

    Computed in the equal, cancellation-free form ``Z = fwd(x-L, W+) + fwd(x-H, W-)`` and
    ``R_in = (x-L)*bwd(S,W+) + (x-H)*bwd(S,W-)``: within the bounds every product is >= 0,
    where the textbook form subtracts sums of the size of the activations to get a small
    ``Z`` (float32 kept only a few digits of it).  Zero padding pads ``x-L`` and ``x-H``
    with zeros, as it pads ``x``, ``L`` and ``H`` in the textbook form, so the two agree
    at the borders too.

    ``bounds`` is ``"image"`` (per-sample min/max) or ``(low, high)``: numbers or
    per-channel sequences/tensors.
    """
    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin, x = layer.lin, layer.x
        if bounds == "image":
            lo, hi = image_bounds(x)
        else:
            lo, hi = (_channel_tensor(b, x) for b in bounds)
        above, below = x - lo, x - hi          # >= 0 and <= 0 inside the bounds
        wp, wn = lin.pos, lin.neg
        s = divide(r, lin.fwd(above, wp) + lin.fwd(below, wn))
        return [above * lin.bwd(s, wp, x.shape) + below * lin.bwd(s, wn, x.shape)]
    return rule


def _channel_tensor(b, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(b, dtype=x.dtype, device=x.device)
    if t.ndim == 1 and x.ndim > 2:
        if t.numel() not in (1, x.shape[1]):
            raise ValueError(f"zb_bounds has {t.numel()} per-channel values, but the input has {x.shape[1]} channels")
        return t.reshape(1, -1, *([1] * (x.ndim - 2)))
    return t


def flat(eps: float = 1e-6) -> Rule:
    """Flat: all inputs and weights set to one, ``R_in = bwd(R / stabilize(fwd(1, 1)), 1)``."""
    def rule(layer: Layer, r: torch.Tensor) -> list:
        lin, x = layer.lin, layer.x
        ones_w = lin.derived(torch.ones_like)   # per block of rows for a large Linear, as its splits
        z = lin.fwd(torch.ones_like(x), ones_w)
        return [lin.bwd(r / stabilize(z, eps), ones_w, x.shape)]
    return rule
