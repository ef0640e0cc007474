"""LayerNorm CNNs (ConvNeXt): channels-last ``nn.LayerNorm`` after a permute, torchvision's
``LayerNorm2d``, layer scale, stochastic depth, GELU, a Linear over channels-last positions.

The LayerNorm rule (README, Conventions; ``relprop.rules.layernorm``) holds the mean and the
standard deviation fixed and takes the z-rule of the elementwise affine map that remains;
GELU passes relevance unchanged like ReLU.  Under these conventions the epsilon-rule
relevance (epsilon -> 0) is gradient x input of the same network with the LayerNorm
statistics detached and every activation's derivative replaced by ``g(z) / z``: that
identity is the float64 oracle here, written with autograd and a custom autograd Function.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
import relprop.graph as g

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlockConfig, ConvNeXt  # noqa: E402

D = torch.float64
METHODS = sorted(relprop.available_methods())
_layer_norm, _gelu = F.layer_norm, F.gelu


def small_convnext(seed: int = 0) -> nn.Module:
    """torchvision's ConvNeXt at toy size (both LayerNorm forms, layer scale, stochastic
    depth, GELU, channels-last Linears), float64, with every LayerNorm affine, layer scale and
    bias random: the torchvision init (weight 1, bias 0, layer scale 1e-6) would hide them."""
    torch.manual_seed(seed)
    model = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.2,
                     num_classes=5).to(D).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.2, 1.0)
            elif p.ndim == 1 and name.endswith("weight"):   # LayerNorm scales
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


class _SecantGelu(torch.autograd.Function):
    """GELU whose derivative is replaced by ``gelu(z) / z`` (the activation as LRP sees it)."""

    @staticmethod
    def forward(ctx, z, approximate):
        ctx.save_for_backward(z)
        ctx.approximate = approximate
        return _gelu(z, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * _gelu(z, approximate=ctx.approximate) / z, None


def _detached_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True).detach()
    std = (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt().detach()
    y = (x - mean) / std
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _secant_gelu(z, approximate="none"):
    return _SecantGelu.apply(z, approximate)


def gradient_x_input(model, x, target, detached: bool = True):
    """``x * d logit_target / dx`` and the logits; ``detached``: of the network with the
    LayerNorm statistics detached and GELU's derivative replaced by ``gelu(z) / z`` (the
    model's own forward, with the functional LayerNorm and GELU it calls swapped for the
    test's while it runs)."""
    x = x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        if detached:
            mp.setattr(F, "layer_norm", _detached_layer_norm)
            mp.setattr(F, "gelu", _secant_gelu)
        out = model(x)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return (x * grad).detach(), out.detach()


def test_epsilon_lrp_is_gradient_x_input_with_detached_statistics():
    """lrp-epsilon (epsilon and stabiliser 0, epsilon rule at the input layer too) on a
    ConvNeXt equals the oracle to float64 precision; plain gradient x input (statistics not
    detached, true GELU derivative) does not, so the oracle tells the conventions apart."""
    model = small_convnext()
    x = torch.randn(3, 3, 32, 40, dtype=D)
    attribution = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same").attribute(x)
    expected, logits = gradient_x_input(model, x, attribution.target)
    torch.testing.assert_close(attribution.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attribution.relevance, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    plain, _ = gradient_x_input(model, x, attribution.target, detached=False)
    assert (attribution.relevance - plain).abs().max() > 1e-3 * plain.abs().max()


class ChannelsLastBlock(nn.Module):
    """A ConvNeXt-style block written the other ways models write it: ``x.permute``, a
    bias-free ``nn.LayerNorm``, functional GELU, a layer scale reshaped at the call
    (timm's ``x.mul(gamma.reshape(1, -1, 1, 1))``), bias-free Linears; then a residual add,
    pooling and a bias-free head."""

    def __init__(self, c: int = 6, classes: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(c, bias=False)
        self.fc1, self.fc2 = nn.Linear(c, 3 * c, bias=False), nn.Linear(3 * c, c, bias=False)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(c, classes, bias=False)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        h = h.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(self.pool(x + h).flatten(1))


def test_conservation_where_the_layer_norm_offset_vanishes():
    """Bias-free layers and a LayerNorm whose input has zero mean (its offset ``b - mean * a``
    is 0): relevance is conserved at every layer, the branch's share through the LayerNorm,
    GELU, the channels-last Linears, permutes and the layer scale, the logit at the input.
    (lrp-epsilon: z+ loses relevance wherever a denominator has no positive term, which a
    6-input Linear over signed inputs has by chance.)"""
    torch.manual_seed(1)
    model = ChannelsLastBlock().to(D).eval()
    x = torch.randn(2, 6, 5, 7, dtype=D)
    x = x - x.mean(1, keepdim=True)            # zero mean over the channels LayerNorm normalises
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12).attribute(x, layer_sums=True)
    logit = a.logits.gather(1, a.target[:, None])[:, 0]
    branch = a.layer_sums["mul"]   # the residual branch's share of the add
    assert (branch.abs() > 1e-2 * logit.abs()).all()
    sums = {"head": logit, "flatten": logit, "pool": logit, "add": logit, "mul": branch, "permute_1": branch,
            "fc2": branch, "gelu": branch, "fc1": branch, "norm": branch, "permute": branch}
    for name, expected in sums.items():
        torch.testing.assert_close(a.layer_sums[name], expected, rtol=1e-9, atol=0,
                                   msg=f"relevance not conserved at {name}")
    torch.testing.assert_close(a.relevance.flatten(1).sum(1), logit, rtol=1e-9, atol=0)


def test_layer_norm_loses_exactly_its_offsets_share():
    """With a mean that does not vanish the LayerNorm does not conserve: the relevance it
    loses is exactly the share ``sum(c * R / y)`` of its offset ``c = -mean * w / std`` (no
    LayerNorm bias here), ``R / y`` read off the oracle (the gradient at its output)."""
    torch.manual_seed(2)
    model = ChannelsLastBlock().to(D).eval()
    x = torch.randn(2, 6, 5, 7, dtype=D) + 0.5
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12).attribute(x, layer_sums=True)
    h = x.permute(0, 2, 3, 1)
    offset = -h.mean(-1, keepdim=True) * model.norm.weight.detach() / (
        h.var(-1, unbiased=False, keepdim=True) + model.norm.eps).sqrt()
    y = model.norm(h).detach().requires_grad_(True)
    logits = model.head(model.pool(x + model.fc2(_secant_gelu(model.fc1(y))).permute(0, 3, 1, 2).mul(
        model.gamma.reshape(1, -1, 1, 1))).flatten(1))
    (r_over_y,) = torch.autograd.grad(logits.gather(1, a.target[:, None]).sum(), y)
    lost = a.layer_sums["fc1"] - a.layer_sums["norm"]     # at the LayerNorm's output minus at its input
    assert (lost.abs() > 1e-3 * a.layer_sums["fc1"].abs()).all()
    torch.testing.assert_close(lost, (offset * r_over_y).flatten(1).sum(1), rtol=1e-8, atol=0)


@pytest.mark.parametrize("method", ["ae", "rsp", "rap", "rap-split"])
def test_ae_rsp_and_rap_pass_relevance_through_a_layer_norm_unchanged(method):
    """AE, RSP and RAP take the identity at a LayerNorm (rules.norm_identity), as at their
    authors' BatchNorm: the relevance at its input is the relevance at its output, however
    large its offset (the z-rule's R * (1 - c / y) made AE's float32 maps on shapes-convnext up
    to 0.29 off float64, RAP's up to 0.12, with the float64 maps as unstable)."""
    torch.manual_seed(2)
    model = ChannelsLastBlock().to(D).eval()
    x = torch.randn(2, 6, 5, 7, dtype=D) + 0.5
    params = {"init_layer": "fc2"} if method in ("ae", "rsp") else {}
    a = relprop.Explainer(model, method, **params).attribute(x, layer_sums=True)
    assert (a.layer_sums["fc1"].abs() > 0).all()
    torch.testing.assert_close(a.layer_sums["norm"], a.layer_sums["fc1"], rtol=1e-12, atol=0)


class PermutedLinear(nn.Module):
    def __init__(self, linear_as_conv: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Conv2d(6, 10, 1) if linear_as_conv else nn.Linear(6, 10)
        self.conv, self.head = nn.Conv2d(10, 8, 3, padding=1), nn.Linear(8, 5)
        self.linear_as_conv = linear_as_conv

    def forward(self, x):
        h = self.stem(x)
        h = F.gelu(self.mix(h)) if self.linear_as_conv else F.gelu(self.mix(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.conv(h)), 1).flatten(1))


@pytest.mark.parametrize("method", METHODS)
def test_a_linear_over_channels_last_positions_is_explained_as_a_1x1_conv(method):
    """Every method gives the Linear over (B, H, W, C) (between permutes) the map it gives the
    equal 1x1 conv on (B, C, H, W)."""
    torch.manual_seed(3)
    as_linear, as_conv = PermutedLinear(False).to(D).eval(), PermutedLinear(True).to(D).eval()
    as_conv.load_state_dict({k: v.reshape(v.shape + (1, 1)) if k == "mix.weight" else v
                             for k, v in as_linear.state_dict().items()})
    x = torch.randn(2, 3, 9, 11, dtype=D)
    # RSP's, AE's and Grad-CAM's default layer search stops at the first Linear outside a residual
    # block (ConvNeXt's are inside one): start both nets at the same layer
    params = {"init_layer": "relu"} if method in ("rsp", "ae", "gradcam") else {}
    a = relprop.Explainer(as_linear, method, **params).attribute(x)
    b = relprop.Explainer(as_conv, method, **params).attribute(x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-9, atol=1e-12)
    assert a.relevance.abs().sum() > 0


def test_capture_kinds_of_a_convnext():
    """Both LayerNorm forms are layer norms, the layer scale a scale whose parameter is read
    at every forward (a helper), stochastic depth the identity."""
    graph = g.capture(small_convnext())
    assert graph.node("features.1.0.block.2").kind == g.LAYERNORM          # channels-last nn.LayerNorm
    stem_norm = next(n for n in graph.nodes if n.name == "features.0.1")    # LayerNorm2d's functional call
    assert stem_norm.kind == g.LAYERNORM and stem_norm.op == "call_function" and len(stem_norm.parents) == 1
    assert graph.node("features.1.0.stochastic_depth").kind == g.PASS
    scales = [n for n in graph.nodes if n.kind == g.SCALE]
    assert len(scales) == 3 and all(len(n.parents) == 1 for n in scales)
    assert not any(n.nonneg for n in scales)


def test_layer_scale_changes_in_place_are_seen():
    """Nothing derived from the layer scale or the LayerNorm weight is kept across calls."""
    model = small_convnext()
    x = torch.randn(1, 3, 32, 32, dtype=D)
    explainer = relprop.Explainer(model, "lrp-epsilon")
    before = explainer(x, target=0)
    with torch.no_grad():
        model.features[1][0].layer_scale.mul_(-2)
        model.features[1][0].block[2].weight.mul_(0.5)
    after = explainer(x, target=0)
    fresh = relprop.Explainer(model, "lrp-epsilon")(x, target=0)
    torch.testing.assert_close(after, fresh)
    assert not torch.allclose(before, after)


def test_a_product_of_two_signals_is_still_refused_with_the_others():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.act = nn.LayerNorm(3), nn.Tanh()

        def forward(self, x):
            h = self.norm(x.permute(0, 2, 3, 1))
            return (self.act(h) * h).flatten(1)

    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(Net(), "lrp-epsilon")
    listed = str(err.value).splitlines()[1:]
    assert [line.split(" (")[0].strip() for line in listed] == ["act", "mul"]
    assert "only a signal times" in listed[1]


def test_a_functional_layer_norm_on_foreign_tensors_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            return F.layer_norm(x.permute(0, 2, 3, 1), (3,), self.scale).flatten(1)

    with pytest.raises(relprop.UnsupportedModelError,
                       match=r"layer_norm \(call_function layer_norm\): a functional layer_norm must read the "
                             r"tensors of one LayerNorm of the model"):
        relprop.Explainer(Net(), "lrp-epsilon")


class RMSNormBlock(nn.Module):
    """A residual block normalised by ``nn.RMSNorm`` over channels-last positions, bias-free
    Linears and head (so the only offsets are none: an RMS norm has no mean to subtract)."""

    def __init__(self, c: int = 6, classes: int = 4):
        super().__init__()
        self.norm = nn.RMSNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 3 * c, bias=False), nn.Linear(3 * c, c, bias=False)
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(c, classes, bias=False)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head(self.pool(x + h).flatten(1))


def _detached_rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * (x.pow(2).mean(dims, keepdim=True) + eps).rsqrt().detach()
    return y if weight is None else y * weight


def test_rms_norm_conserves_and_is_gradient_x_input_with_its_statistic_detached():
    """``nn.RMSNorm`` (rules.rms_norm): ``y = a * x`` with the root mean square held fixed has no
    offset, so relevance is conserved through it at every layer; and the float64 epsilon map
    (epsilon 0) is gradient x input with the statistic detached, which plain gradient x input
    is not."""
    torch.manual_seed(4)
    model = RMSNormBlock().to(D).eval()
    assert g.capture(model).node("norm").kind == g.RMS_NORM
    x = torch.randn(2, 6, 5, 7, dtype=D)
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12).attribute(x, layer_sums=True)
    logit = a.logits.gather(1, a.target[:, None])[:, 0]
    branch = a.layer_sums["permute_1"]
    assert (branch.abs() > 1e-2 * logit.abs()).all()
    for name in ("fc2", "gelu", "fc1", "norm", "permute"):
        torch.testing.assert_close(a.layer_sums[name], branch, rtol=1e-9, atol=0, msg=f"not conserved at {name}")
    torch.testing.assert_close(a.relevance.flatten(1).sum(1), logit, rtol=1e-9, atol=0)

    exact = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same").attribute(x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "rms_norm", _detached_rms_norm)
        expected, logits = gradient_x_input(model, x, exact.target)
    torch.testing.assert_close(exact.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact.relevance, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    plain, _ = gradient_x_input(model, x, exact.target, detached=False)
    assert (exact.relevance - plain).abs().max() > 1e-3 * plain.abs().max()


def test_rms_norm_weight_changes_in_place_are_seen():
    torch.manual_seed(5)
    model = RMSNormBlock().to(D).eval()
    x = torch.randn(1, 6, 4, 4, dtype=D)
    explainer = relprop.Explainer(model, "lrp-epsilon-plus")
    before = explainer(x, target=0)
    with torch.no_grad():
        model.norm.weight.mul_(-1.5)
    after = explainer(x, target=0)
    torch.testing.assert_close(after, relprop.Explainer(model, "lrp-epsilon-plus")(x, target=0))
    assert not torch.allclose(before, after)
