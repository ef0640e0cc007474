"""Zennit parity: relprop's Zennit-compatible LRP methods reproduce Zennit 0.5.1 on
torchvision VGG16 and ResNet50 (random weights, BatchNorm with random running
statistics), float64, relative L2 error < 1e-5."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")

from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus,  # noqa: E402
                               EpsilonPlusFlat, SpecialFirstLayerMapComposite, layer_map_base)
from zennit.rules import Epsilon, ZBox  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402
from zennit.types import Convolution  # noqa: E402

import relprop  # noqa: E402

pytestmark = pytest.mark.slow   # Zennit's alpha-beta takes 10-25 s per 224x224 image on CPU

TOL = 1e-5
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
LOW, HIGH = -MEAN / STD, (1 - MEAN) / STD          # [0, 1] pixels after ImageNet normalisation
ZB = {"first_layer": "zb", "zb_bounds": (LOW, HIGH)}
TARGETS = (417, 3)
FULL, SMALL = (1, 224), (2, 64)                     # (batch, side) of the input


def zbox_first():
    """Zennit first-layer map: ZBox with the normalised [0, 1] pixel bounds on the first conv."""
    return [(Convolution, ZBox(LOW.view(1, 3, 1, 1), HIGH.view(1, 3, 1, 1)))]


# case id -> (relprop method, its params, Zennit composite for a canonizer, input (batch, side))
CASES = {
    "epsilon-plus-flat": ("lrp-epsilon-plus-flat", {}, lambda c: EpsilonPlusFlat(canonizers=[c]), FULL),
    "epsilon-alpha2beta1-flat": ("lrp-epsilon-alpha2beta1-flat", {},
                                 lambda c: EpsilonAlpha2Beta1Flat(canonizers=[c]), FULL),
    "epsilon-plus-zbox": ("lrp-epsilon-plus", ZB, lambda c: SpecialFirstLayerMapComposite(
        EpsilonPlus().layer_map, zbox_first(), canonizers=[c]), FULL),
    "epsilon-alpha2beta1-zbox": ("lrp-epsilon-alpha2beta1", ZB, lambda c: SpecialFirstLayerMapComposite(
        EpsilonAlpha2Beta1().layer_map, zbox_first(), canonizers=[c]), FULL),
    # Epsilon on every conv and linear layer; batch of two at 64x64 to keep the run short
    # (VGG16's adaptive average pool then upsamples 2x2 to 7x7 instead of being the identity).
    "epsilon-zbox": ("lrp-epsilon", ZB, lambda c: SpecialFirstLayerMapComposite(
        layer_map_base() + [(Convolution, Epsilon()), (nn.Linear, Epsilon())], zbox_first(), canonizers=[c]),
        SMALL),
    # the defaults of the methods named after Zennit's composites (no special input layer for
    # EpsilonPlus / EpsilonAlpha2Beta1), and EpsilonGammaBox with the same pixel bounds
    "epsilon-plus": ("lrp-epsilon-plus", {}, lambda c: EpsilonPlus(canonizers=[c]), SMALL),
    "epsilon-alpha2beta1": ("lrp-epsilon-alpha2beta1", {}, lambda c: EpsilonAlpha2Beta1(canonizers=[c]), SMALL),
    "epsilon-gamma-box": ("lrp-epsilon-gamma-box", {"zb_bounds": (LOW, HIGH)}, lambda c: EpsilonGammaBox(
        LOW.view(1, 3, 1, 1), HIGH.view(1, 3, 1, 1), canonizers=[c]), SMALL),
}


def build(arch: str) -> nn.Module:
    """torchvision ``arch`` with random weights in float64; every BatchNorm gets random running
    statistics and affine parameters, so that folding it into its conv matters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = getattr(torchvision.models, arch)(weights=None).double().eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", params=[("vgg16", VGGCanonizer), ("resnet50", ResNetCanonizer)],
                ids=["vgg16", "resnet50"])
def net(request):
    arch, canonizer = request.param
    return build(arch), canonizer


def images(batch: int, side: int) -> torch.Tensor:
    """Smooth random [0, 1] images (bilinearly upsampled noise), ImageNet-normalised."""
    gen = torch.Generator().manual_seed(batch * 1000 + side)
    x = F.interpolate(torch.rand(batch, 3, side // 16, side // 16, generator=gen, dtype=torch.float64),
                      size=side, mode="bilinear", align_corners=False)
    return (x - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)


def zennit_lrp(model: nn.Module, composite, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zennit's relevance for ``output * onehot(target)``, on a copy of ``model``."""
    model = copy.deepcopy(model)
    with Gradient(model, composite) as attributor:
        # Zennit's BatchNorm merge resets a BN to mean 0, var 1, weight 1, bias 0 but keeps
        # its eps, so the "identity" BN still scales by 1/sqrt(1 + eps); over ResNet50's 53
        # BNs that alone moves Zennit's relevance by ~1e-4 (1e-2 for LRP-epsilon).  The
        # smallest positive eps (1 + eps == 1 exactly; torch <= 2.11 rejects eps = 0) makes
        # the merged BNs the exact identity the merge intends; the weights were already
        # folded with the real eps, which relprop must reproduce.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = torch.finfo(torch.float64).tiny
        _, rel = attributor(x, lambda out: out * F.one_hot(target, out.shape[1]).to(x.dtype))
    return rel


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_matches_zennit(net, case):
    """relprop's method equals the corresponding Zennit composite + canonizer (rel. L2 < 1e-5)."""
    model, canonizer = net
    method, params, composite, (batch, side) = CASES[case]
    x, target = images(batch, side), torch.tensor(TARGETS[:batch])
    ours = relprop.explain(model, x, target, method=method, **params)
    ref = zennit_lrp(model, composite(canonizer()), x, target)
    assert ours.shape == ref.shape
    assert ref.norm() > 0
    assert rel_error(ours, ref) < TOL


def test_comparison_is_sensitive(net):
    """A different method (EpsilonPlusFlat vs Zennit's EpsilonAlpha2Beta1Flat) is far from Zennit,
    so the parity checks cannot pass vacuously."""
    model, canonizer = net
    x, target = images(*SMALL), torch.tensor(TARGETS)
    ours = relprop.explain(model, x, target, method="lrp-epsilon-plus-flat")
    ref = zennit_lrp(model, EpsilonAlpha2Beta1Flat(canonizers=[canonizer()]), x, target)
    assert rel_error(ours, ref) > 1e-3


class SpatialMean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


@pytest.mark.parametrize("case", ["epsilon-plus-flat", "epsilon-alpha2beta1-flat"])
def test_relu6_leaky_relu_and_mean_match_zennit(case):
    """ReLU6 and LeakyReLU (Zennit's Pass rule for activations; LeakyReLU feeds signed inputs to
    the next conv) and a spatial ``mean`` in relprop's copy where Zennit's has
    AdaptiveAvgPool2d(1) + Flatten (its Norm rule) give Zennit's relevance."""
    torch.manual_seed(4)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True), nn.MaxPool2d(2),
              nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.Conv2d(8, 6, 3, padding=1),
              nn.LeakyReLU(0.3, inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)]
    zennit_net = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        zennit_net[0].weight.mul_(6)  # the first ReLU6 clips
        for bn in (zennit_net[1], zennit_net[5]):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    ours_net = copy.deepcopy(zennit_net)
    ours_net[9], ours_net[10] = SpatialMean(), nn.Identity()
    # pixel noise, not images(): their flat borders tie in max-pool windows, and the tie then
    # goes by the last bit of BatchNorm-merged (Zennit) vs. folded (relprop) convs
    x = (torch.rand(2, 3, 32, 32, dtype=torch.float64) - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    target = torch.tensor([1, 3])
    assert (zennit_net[:2](x) > 6).any() and (zennit_net[:6](x) < 0).any()
    method, params, composite, _ = CASES[case]
    ours = relprop.explain(ours_net, x, target, method=method, **params)
    ref = zennit_lrp(zennit_net, composite(VGGCanonizer()), x, target)
    assert ref.norm() > 0
    assert rel_error(ours, ref) < TOL
