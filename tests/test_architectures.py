"""Every supported torchvision architecture runs every method at 224x224 and at one other
input size, with random weights: finite relevance shaped like the input."""
import pytest
import torch

import relprop

torchvision = pytest.importorskip("torchvision")

ARCHS = {  # name -> the other input size it is tested at
    "vgg11": 96, "vgg13": 96, "vgg16": 160, "vgg19": 96,
    "vgg11_bn": 96, "vgg13_bn": 96, "vgg16_bn": 160, "vgg19_bn": 96,
    "resnet18": 128, "resnet34": 96, "resnet50": 160, "resnet101": 96, "resnet152": 96,
    "densenet121": 128, "inception_v3": 299, "alexnet": 160,
}
METHODS = sorted(relprop.available_methods())


def build(name):
    kwargs = {"weights": None}
    if name == "inception_v3":
        kwargs.update(aux_logits=False, init_weights=False)
    model = getattr(torchvision.models, name)(**kwargs).eval()
    for m in model.modules():  # realistic BatchNorm statistics instead of the identity init
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    torch.manual_seed(0)
    return request.param, build(request.param)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(arch, method):
    name, model = arch
    explainer = relprop.Explainer(model, method)
    for size, batch in ((224, 1), (ARCHS[name], 2)):
        x = torch.randn(batch, 3, size, size)
        rel = explainer(x)
        assert rel.shape == x.shape
        assert torch.isfinite(rel).all(), f"{name} {method} at {size}: non-finite relevance"
        assert rel.abs().sum() > 0, f"{name} {method} at {size}: all-zero relevance"
