"""Every supported torchvision architecture runs every method at 224x224 and at one other
input size, with random weights: finite relevance shaped like the input, the model's logits."""
import pytest
import torch

import relprop

torchvision = pytest.importorskip("torchvision")

ARCHS = {  # name -> the other (non-square) input size it is tested at
    "vgg11": (48, 80), "vgg13": (48, 80), "vgg16": (64, 96), "vgg19": (48, 80),
    "vgg11_bn": (48, 80), "vgg13_bn": (48, 80), "vgg16_bn": (64, 96), "vgg19_bn": (48, 80),
    "resnet18": (64, 96), "resnet34": (48, 80), "resnet50": (64, 96), "resnet101": (48, 80), "resnet152": (48, 80),
    "resnext50_32x4d": (48, 80), "densenet121": (64, 96), "inception_v3": (107, 139), "googlenet": (64, 96),
    "alexnet": (127, 160), "squeezenet1_1": (64, 96), "mobilenet_v2": (64, 96), "mnasnet0_5": (48, 80),
    "mobilenet_v3_small": (64, 96), "efficientnet_b0": (64, 96), "regnet_y_400mf": (48, 80),
    "shufflenet_v2_x0_5": (64, 96), "convnext_tiny": (64, 96), "swin_t": (96, 160),
    "swin_v2_t": (96, 160),
}
# Swin runs in float64: its shift mask's -100 gives attention weights near exp(-100), which RAP's
# unstabilised quotients divide by; in float32 RAP's maps overflow there (relprop warns; README, Conventions).
FLOAT64 = {"swin_t", "swin_v2_t"}
METHODS = sorted(relprop.available_methods())


def build(name):
    kwargs = {"weights": None}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
    model = getattr(torchvision.models, name)(**kwargs).eval()
    for m in model.modules():  # realistic BatchNorm statistics instead of the identity init
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
        if isinstance(m, torch.nn.LayerNorm):   # ConvNeXt: random affines and layer scales (init: 1, 0, 1e-6)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
        if hasattr(m, "layer_scale"):
            m.layer_scale.data.uniform_(0.1, 1.0)
        if hasattr(m, "relative_position_bias_table"):   # Swin (init: std 0.02)
            m.relative_position_bias_table.data.normal_(0, 0.5)
    return model.double() if name in FLOAT64 else model


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    torch.manual_seed(0)
    return request.param, build(request.param)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(arch, method):
    name, model = arch
    explainer = relprop.Explainer(model, method)
    for size in ((224, 224), ARCHS[name]):
        x = torch.randn(1, 3, *size, dtype=torch.float64 if name in FLOAT64 else torch.float32)
        attribution = explainer.attribute(x)
        rel = attribution.relevance
        with torch.no_grad():
            torch.testing.assert_close(attribution.logits, model(x), msg=f"{name} {method} at {size}: logits")
        assert rel.shape == x.shape
        assert torch.isfinite(rel).all(), f"{name} {method} at {size}: non-finite relevance"
        assert rel.abs().sum() > 0, f"{name} {method} at {size}: all-zero relevance"


# the module whose output is RSP's and AE's default Grad-CAM layer: the last convolutional block
DEFAULT_LAYERS = {"vgg16": "features.29", "resnet50": "layer4", "inception_v3": "Mixed_7c", "alexnet": "features.11",
                  "shufflenet_v2_x0_5": "conv5", "mobilenet_v2": "features", "efficientnet_b0": "features",
                  "convnext_tiny": "features"}


@pytest.mark.parametrize("name", list(DEFAULT_LAYERS))
def test_default_cam_layer_is_the_last_convolutional_block(name):
    """Not a channel shuffle's reshape early in ShuffleNet: only a flatten ends the search."""
    from relprop.graph import capture
    from relprop.methods.cam import default_layer
    graph = capture(build(name))
    assert default_layer(graph) is graph.node(DEFAULT_LAYERS[name])


# torchvision's ViT-B/16 at its only input size (its forward asserts 224x224): a few methods (LRP, RAP,
# contrastive, RSP), since a full-size relevance pass takes seconds on CPU; every method runs on timm's
# full-size ViT and DeiT (tests/test_transformers.py) and on toy torchvision ViTs.
VIT_METHODS = ["lrp-epsilon", "rap", "sglrp", "rsp"]


@pytest.fixture(scope="module")
def vit_b_16():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.05)   # torchvision's init: a zero head
    return model


@pytest.mark.slow
@pytest.mark.parametrize("method", VIT_METHODS)
def test_vit_b_16(vit_b_16, method):
    x = torch.randn(1, 3, 224, 224)
    attribution = relprop.Explainer(vit_b_16, method).attribute(x)
    with torch.no_grad():
        torch.testing.assert_close(attribution.logits, vit_b_16(x), msg=f"vit_b_16 {method}: logits")
    rel = attribution.relevance
    assert rel.shape == x.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0, method


# torchvision's segmentation models (README, Dense outputs): dict outputs explained at "out"
# (FCN's auxiliary head ignored), a region of one class as the target.
SEGMENTATION = ["fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"]


@pytest.fixture(scope="module", params=SEGMENTATION)
def segmentation(request):
    from torchvision.models import segmentation as seg
    torch.manual_seed(0)
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 4}
    if request.param == "fcn_resnet50":
        kwargs["aux_loss"] = True
    model = getattr(seg, request.param)(**kwargs).eval()
    for m in model.modules():  # realistic BatchNorm statistics, as build() does
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return request.param, model


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_segmentation_models(segmentation, method):
    import warnings
    name, model = segmentation
    explainer = relprop.Explainer(model, method)
    for size in ((64, 64), (48, 80)):
        x = torch.randn(1, 3, *size)
        mask = torch.zeros(size, dtype=torch.bool)
        mask[size[0] // 4:size[0] // 2, size[1] // 3:size[1] // 2] = True
        with warnings.catch_warnings():   # random-weight ResNets trip the numerical-trust warning (test_numerics)
            warnings.filterwarnings("ignore", r"method '.*': the map\(s\) of sample\(s\)", RuntimeWarning)
            attribution = explainer.attribute(x, relprop.SegmentationTarget(1, mask))
        rel = attribution.relevance
        with torch.no_grad():
            torch.testing.assert_close(attribution.logits, model(x)["out"], msg=f"{name} {method} at {size}: output")
        assert rel.shape == x.shape
        assert torch.isfinite(rel).all(), f"{name} {method} at {size}: non-finite relevance"
        assert method == "gradcam" or rel.abs().sum() > 0, f"{name} {method} at {size}: all-zero relevance"
