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
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonPlus, EpsilonPlusFlat,  # noqa: E402
                               SpecialFirstLayerMapComposite, layer_map_base)
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
    onehot = F.one_hot(target, 1000).to(x.dtype)
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
        _, rel = attributor(x, lambda out: out * onehot)
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
