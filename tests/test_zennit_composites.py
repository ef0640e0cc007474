"""The methods named after Zennit's composites and rules equal Zennit 0.5 by default, in
float64 to 1e-8 relative L2, on a small VGG-style net and on small ResNets of torchvision's
BasicBlock and Bottleneck blocks (which Zennit's ResNetCanonizer rewrites), all with
BatchNorm (random running statistics and affine parameters, so that folding it matters).

Zennit's BatchNorm merge canonizer folds each BatchNorm into the conv before it with the
BatchNorm's real ``eps``, then resets it to mean 0, var 1, weight 1, bias 0 but keeps its
``eps``: the "identity" BatchNorm left behind still scales by ``1/sqrt(1 + eps)`` (about
``eps/2`` per BatchNorm; 6e-5 relative L2 on the BasicBlock net here).  To compare with the merge Zennit
intends, ``zennit_relevance`` sets the merged BatchNorms' ``eps`` to the smallest positive
float64 inside Zennit's context (after the merge, so the folded weights keep the real
``eps``, which relprop must reproduce): ``1 + eps == 1`` exactly, and the merged BatchNorm is
the identity.  Nothing else of Zennit is changed.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")

from torchvision.models.resnet import BasicBlock, Bottleneck  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, LayerMapComposite,  # noqa: E402
                               SpecialFirstLayerMapComposite, layer_map_base)
from zennit.rules import Gamma, ZBox  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402
from zennit.types import Convolution  # noqa: E402

import relprop  # noqa: E402

TOL = 1e-8
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
LOW, HIGH = -MEAN / STD, (1 - MEAN) / STD          # [0, 1] pixels after ImageNet normalisation
BOUNDS = (LOW.view(1, 3, 1, 1), HIGH.view(1, 3, 1, 1))


def gamma_layers(gamma: float = 0.25):
    """Zennit's Gamma rule on every conv and linear layer (Zennit has no composite for it)."""
    return layer_map_base() + [(Convolution, Gamma(gamma=gamma)), (nn.Linear, Gamma(gamma=gamma))]


# case id -> (relprop method, its params, Zennit composite for a list of canonizers)
CASES = {
    # Zennit's composites with no special input layer: relprop's defaults
    "epsilon-plus": ("lrp-epsilon-plus", {}, lambda c: EpsilonPlus(canonizers=c)),
    "epsilon-alpha2beta1": ("lrp-epsilon-alpha2beta1", {}, lambda c: EpsilonAlpha2Beta1(canonizers=c)),
    # EpsilonGammaBox: the defaults (but Zennit's bounds are required) and other parameters
    "epsilon-gamma-box": ("lrp-epsilon-gamma-box", {"zb_bounds": BOUNDS},
                          lambda c: EpsilonGammaBox(*BOUNDS, canonizers=c)),
    "epsilon-gamma-box-params": ("lrp-epsilon-gamma-box", {"zb_bounds": BOUNDS, "gamma": 1.5, "epsilon": 0.1,
                                                           "stabilizer": 1e-4},
                                 lambda c: EpsilonGammaBox(*BOUNDS, gamma=1.5, epsilon=0.1, stabilizer=1e-4,
                                                           canonizers=c)),
    # lrp-gamma: z^B input layer by default, or gamma on the input layer too
    "gamma": ("lrp-gamma", {"zb_bounds": BOUNDS}, lambda c: SpecialFirstLayerMapComposite(
        gamma_layers(), [(Convolution, ZBox(*BOUNDS))], canonizers=c)),
    "gamma-same": ("lrp-gamma", {"gamma": 0.5, "first_layer": "same"},
                   lambda c: LayerMapComposite(gamma_layers(0.5), canonizers=c)),
}


def _random_batchnorms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def vgg_style() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(32, 10))


def _down(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class SmallResNet(nn.Module):
    """torchvision's ResNet layout (conv-BN-ReLU-maxpool stem, residual stages, global average
    pool, fc) with 8-32 channels instead of 64-2048, so that Zennit runs in a second."""

    def __init__(self, bottleneck: bool):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(2)
        if bottleneck:   # expansion 4: planes 4 -> 16 channels, 8 -> 32
            self.layer1 = Bottleneck(8, 4, downsample=_down(8, 16, 1))
            self.layer2 = Bottleneck(16, 8, stride=2, downsample=_down(16, 32, 2))
        else:
            self.layer1 = BasicBlock(8, 8)
            self.layer2 = BasicBlock(8, 32, stride=2, downsample=_down(8, 32, 2))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(arch: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = vgg_style() if arch == "vgg" else SmallResNet(bottleneck=arch == "resnet-bottleneck")
        return _random_batchnorms(model.double().eval())


CANONIZERS = {"vgg": VGGCanonizer, "resnet-basic": ResNetCanonizer, "resnet-bottleneck": ResNetCanonizer}


@pytest.fixture(scope="module", params=list(CANONIZERS))
def net(request):
    return build(request.param), CANONIZERS[request.param]


def images(batch: int = 2, side: int = 32) -> torch.Tensor:
    """Pixel noise in [0, 1], ImageNet-normalised (noise, not smooth images: flat regions tie in
    max-pool windows, and a tie then goes by the last bit of merged vs. folded convs)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(batch, 3, side, side, generator=gen, dtype=torch.float64)
    return (x - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def zennit_relevance(model: nn.Module, composite, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zennit's relevance for ``output * onehot(target)`` on a copy of ``model``, with the
    merged BatchNorms made the exact identity (see the module docstring)."""
    model = copy.deepcopy(model)
    with Gradient(model, composite) as attributor:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = torch.finfo(torch.float64).tiny
        _, rel = attributor(x, lambda out: out * F.one_hot(target, out.shape[1]).to(x.dtype))
    return rel


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_matches_zennit(net, case):
    """relprop's method equals Zennit's composite + canonizer (float64, rel. L2 < 1e-8)."""
    model, canonizer = net
    method, params, composite = CASES[case]
    x, target = images(), torch.tensor([3, 7])
    ours = relprop.explain(model, x, target, method=method, **params)
    ref = zennit_relevance(model, composite([canonizer()]), x, target)
    assert ours.shape == ref.shape
    assert ref.norm() > 0
    assert rel_error(ours, ref) < TOL


@pytest.mark.parametrize("method, params, composite", [
    # the z^B input layer the composites' defaults used to have
    ("lrp-epsilon-plus", {"first_layer": "zb"}, lambda c: EpsilonPlus(canonizers=c)),
    ("lrp-epsilon-alpha2beta1", {"first_layer": "zb"}, lambda c: EpsilonAlpha2Beta1(canonizers=c)),
    # another gamma, and image bounds instead of Zennit's
    ("lrp-epsilon-gamma-box", {"zb_bounds": BOUNDS, "gamma": 0.5}, lambda c: EpsilonGammaBox(*BOUNDS, canonizers=c)),
    ("lrp-epsilon-gamma-box", {}, lambda c: EpsilonGammaBox(*BOUNDS, canonizers=c)),
], ids=["epsilon-plus-zb", "epsilon-alpha2beta1-zb", "gamma-box-gamma", "gamma-box-image-bounds"])
def test_comparison_is_sensitive(method, params, composite):
    """A different input layer, gamma or bounds is far from Zennit's composite, so the parity
    checks above cannot pass vacuously."""
    model = build("resnet-basic")
    x, target = images(), torch.tensor([3, 7])
    ours = relprop.explain(model, x, target, method=method, **params)
    ref = zennit_relevance(model, composite([ResNetCanonizer()]), x, target)
    assert rel_error(ours, ref) > 1e-3


def test_zennit_merge_drift_is_what_the_docstring_says():
    """Without the exact merge, Zennit's relevance moves by far more than the tolerance (so the
    eps patch is needed, and is the only thing that differs)."""
    model = build("resnet-basic")
    x, target = images(), torch.tensor([3, 7])
    exact = zennit_relevance(model, EpsilonPlus(canonizers=[ResNetCanonizer()]), x, target)
    with Gradient(copy.deepcopy(model), EpsilonPlus(canonizers=[ResNetCanonizer()])) as attributor:
        _, drifted = attributor(x, lambda out: out * F.one_hot(target, out.shape[1]).to(x.dtype))
    assert rel_error(drifted, exact) > 100 * TOL


def test_gamma_zero_is_epsilon():
    """gamma = 0 is LRP-0 with the stabiliser: lrp-epsilon with epsilon = stabilizer (no z == 0
    here), on a net with negative inputs to convs (LeakyReLU) and biases."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(6, 6, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(6 * 6 * 6, 4)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got = relprop.explain(model, x, method="lrp-gamma", gamma=0.0, stabilizer=1e-3, first_layer="same")
    want = relprop.explain(model, x, method="lrp-epsilon", epsilon=1e-3, first_layer="same")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(got, relprop.explain(model, x, method="lrp-gamma", gamma=0.25, first_layer="same"))


def test_gamma_box_on_an_mlp_keeps_epsilon_on_the_input_linear():
    """Zennit's EpsilonGammaBox puts z^B on the first *convolution* only: an MLP's input Linear
    keeps epsilon, in relprop as in Zennit."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x, target = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.tensor([0, 2])
    ours = relprop.explain(model, x, target, method="lrp-epsilon-gamma-box", zb_bounds=(-3, 3))
    ref = zennit_relevance(model, EpsilonGammaBox(-3.0, 3.0), x, target)
    assert rel_error(ours, ref) < TOL
    zb = relprop.explain(model, x, target, method="lrp-epsilon", zb_bounds=(-3, 3))
    assert rel_error(zb, ref) > 1e-3


@pytest.mark.parametrize("gamma", [0.0, 0.25, 3.0])
def test_gamma_conserves_relevance_without_biases(gamma):
    """Without biases and stabiliser, each gamma layer passes on exactly the relevance it gets
    (``sum_i x_i U_ij / Z_j = 1``), so the input relevance sums to the target logit; on a
    bias-free net with signed (LeakyReLU) and non-negative inputs, max-pool and average pool.
    (The stabiliser 1e-300 changes no non-zero denominator; it only keeps the average pool's
    0/0 at all-zero windows at 0.)"""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.LeakyReLU(0.1),
                          nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 5, bias=False)).double().eval()
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64)
    target = torch.tensor([0, 2, 4])
    rel = relprop.explain(model, x, target, method="lrp-gamma", gamma=gamma, stabilizer=1e-300,
                          first_layer="same")
    logits = model(x).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(rel.sum((1, 2, 3)), logits, rtol=1e-10, atol=0)
