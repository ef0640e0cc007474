"""Dense outputs (issue 15): segmentation models explained for "class c over a region".

Small random-weight versions of torchvision's FCN, DeepLabV3 (ASPP: dilated convs, the
image-pooling branch upsampled with ``F.interpolate(size=...)``) and LR-ASPP (Hardswish,
squeeze-excitation gates, the sigmoid branch ``x * s``) run every method; a bias-free dense
net checks conservation, linearity in the region and the region's locality exactly; a
``(B, C, 1, 1)`` output gives the classifier's maps for every method.  The full-size
``fcn_resnet50`` / ``deeplabv3_resnet50`` / ``lraspp_mobilenet_v3_large`` are in the slow
architecture sweep (tests/test_architectures.py).
"""
import collections
import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
from relprop import SegmentationTarget

torchvision = pytest.importorskip("torchvision")
from torchvision.models._utils import IntermediateLayerGetter  # noqa: E402
from torchvision.models.resnet import BasicBlock  # noqa: E402
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3  # noqa: E402
from torchvision.models.segmentation.fcn import FCN, FCNHead  # noqa: E402

METHODS = sorted(relprop.available_methods())
CLASSES = 3
SIZE = 32


@pytest.fixture(autouse=True)
def _quiet_numerics():
    """Random-weight ResNet-style nets trip the numerical-trust warning of the signed rules;
    that warning has its own tests (test_numerics)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"method '.*': the map\(s\) of sample\(s\)", RuntimeWarning)
        yield


def _randomise_bn(model):
    for m in model.modules():   # realistic BatchNorm statistics instead of the identity init
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def _backbone():
    """A small dilated ResNet-like backbone (stride 4, a residual block, a dilated conv),
    with "out" and "aux" features as torchvision's segmentation backbones have."""
    body = nn.Sequential(collections.OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)),
        layer1=nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                             BasicBlock(32, 32)),
        layer2=nn.Sequential(nn.Conv2d(32, 64, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(64),
                             nn.ReLU(inplace=True))))
    return IntermediateLayerGetter(body, {"layer2": "out", "layer1": "aux"})


def tiny_fcn():
    torch.manual_seed(0)
    return _randomise_bn(FCN(_backbone(), FCNHead(64, CLASSES), FCNHead(32, CLASSES))).eval()   # with aux head


def tiny_deeplab():
    torch.manual_seed(1)
    return _randomise_bn(DeepLabV3(_backbone(), DeepLabHead(64, CLASSES), None)).eval()


def tiny_lraspp():
    torch.manual_seed(2)
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large
    return _randomise_bn(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=CLASSES)).eval()


MODELS = {"fcn": tiny_fcn, "deeplabv3": tiny_deeplab, "lraspp": tiny_lraspp}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in MODELS.items()}


def _region_target(batch=2, size=SIZE):
    mask = torch.zeros(batch, size, size, dtype=torch.bool)
    mask[0, 4:16, 8:24] = True
    mask[-1, 10:30, 2:12] = True
    return SegmentationTarget([1, 2][:batch] if batch > 1 else 1, mask)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_explains_a_region_of_each_segmentation_model(models, name, method):
    model = models[name]
    torch.manual_seed(3)
    x = torch.randn(2, 3, SIZE, SIZE)
    att = relprop.Explainer(model, method).attribute(x, target=_region_target())
    with torch.no_grad():
        out = model(x)["out"]
    torch.testing.assert_close(att.logits, out)          # the "out" entry, aux ignored
    assert att.relevance.shape == x.shape
    assert torch.isfinite(att.relevance).all()
    if method == "gradcam":   # ReLU of the channel sum: all-zero where the random class map is negative
        assert (att.relevance >= 0).all()
    else:
        assert (att.relevance.flatten(1).abs().sum(1) > 0).all()
    assert att.target.tolist() == [1, 2]


def test_lraspp_gate_and_bilinear_upsampling_are_captured(models):
    """LR-ASPP's ``x * s`` (s: the Sigmoid of a pooled branch) is a gate, and its bilinear
    ``F.interpolate`` calls are upsampling nodes (a linear map, the z-rule)."""
    graph = relprop.Explainer(models["lraspp"], "lrp-epsilon").graph
    kinds = collections.Counter(n.kind for n in graph.nodes)
    assert kinds["gate"] >= 1 + 8          # the head's x * s, and the backbone's squeeze-excitation blocks
    ups = [n for n in graph.nodes if n.kind == "upsample"]
    assert len(ups) == 2 and all(n.param("mode", 3, "nearest") == "bilinear" for n in ups)
    gates = [graph.nodes[n.parents[n.gate]].name for n in graph.nodes if n.kind == "gate"]
    assert gates.count("classifier.scale.2") == 1      # the head's Sigmoid


def test_default_cam_layer_of_segmentation_models(models):
    """RSP, AE and Grad-CAM start before the classifier conv(s), not at the output."""
    from relprop.methods.cam import default_layer
    names = {name: default_layer(relprop.Explainer(m, "gradcam").graph).name for name, m in models.items()}
    assert names["fcn"] == "classifier.2" and names["deeplabv3"] == "classifier.3"
    assert names["lraspp"].startswith("backbone.")


# ----------------------------------------------------------------------------- a bias-free dense net
class DenseNet(nn.Module):
    """Bias-free conv net with a class map upsampled bilinearly to the input size."""

    def __init__(self, classes=CLASSES, as_dict=False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.ReLU())
        self.classifier = nn.Conv2d(8, classes, 1, bias=False)
        self.as_dict = as_dict

    def forward(self, x):
        size = x.shape[-2:]
        y = F.interpolate(self.classifier(self.features(x)), size=size, mode="bilinear", align_corners=False)
        return {"out": y} if self.as_dict else y


def _dense_net(as_dict=False):
    torch.manual_seed(4)
    return DenseNet(as_dict=as_dict).double().eval()


def test_epsilon_conserves_the_selected_output():
    """LRP-epsilon (tiny epsilon) on a bias-free net: the input relevance sums to the
    selected output, ``sum(output * mask)`` on the target class (a float mask too)."""
    model = _dense_net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12, first_layer="same")
    soft = torch.rand(2, 16, 16, dtype=torch.float64)
    for target in (SegmentationTarget([0, 2], soft), (1, soft > 0.5), 2):
        w = relprop.targets.resolve(target, model(x))[1]
        r = explainer(x, target)
        torch.testing.assert_close(r.flatten(1).sum(1), (model(x) * w).flatten(1).sum(1), rtol=1e-9, atol=1e-9)


def test_region_relevance_is_the_sum_of_its_pixels():
    """LRP-epsilon is linear in the initial relevance: a region's map is the weighted sum of
    its pixels' single-pixel maps (a real decomposition, not a rescaling)."""
    model = _dense_net()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    explainer = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-3)
    pixels = [(2, 3, 0.5), (2, 4, 1.0), (9, 11, 2.0), (15, 0, 1.5)]
    mask = torch.zeros(16, 16, dtype=torch.float64)
    total = torch.zeros_like(x)
    for i, j, w in pixels:
        one = torch.zeros(16, 16, dtype=torch.float64)
        one[i, j] = 1
        mask[i, j] = w
        total += w * explainer(x, SegmentationTarget(1, one))
    torch.testing.assert_close(explainer(x, SegmentationTarget(1, mask)), total, rtol=1e-10, atol=1e-12)


def test_the_mask_restricts_relevance_to_the_region_and_its_receptive_field():
    """Relevance of a region lands only within the region's receptive field (3x3, stride-2
    3x3, bilinear: a few pixels around it), and equals the map of the seed ``output * W``."""
    model = _dense_net()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:8, 4:8] = True
    explainer = relprop.Explainer(model, "lrp-epsilon-plus")
    r = explainer.heatmap(x, (0, mask))[0]
    assert r[:12, :12].abs().sum() > 0
    far = torch.ones(32, 32, dtype=torch.bool)
    far[:14, :14] = False
    assert (r[far] == 0).all()
    out = model(x)
    seed = out * SegmentationTarget(0, mask).weights(out)
    torch.testing.assert_close(explainer.heatmap(x, initial_relevance=seed)[0], r)


@pytest.mark.parametrize("method", ["lrp-epsilon-plus", "rap", "sglrp", "clrp", "ae", "gradcam"])
def test_batch_equals_single_samples(models, method):
    """Per-sample classes and masks in one batch give each sample's own map (float64: RAP's
    signed splits amplify float32 rounding on random weights)."""
    model = copy.deepcopy(models["deeplabv3"]).double()
    torch.manual_seed(5)
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    target = _region_target()
    explainer = relprop.Explainer(model, method)
    batch = explainer(x, target)
    for b in range(2):
        single = explainer(x[b:b + 1], SegmentationTarget(target.category[b].item(), target.mask[b]))
        torch.testing.assert_close(batch[b:b + 1], single, rtol=1e-7, atol=1e-9 * single.abs().max().item())


def test_target_forms_agree():
    """SegmentationTarget, the tuple (category, mask), a (B, C, H, W) mask, a callable on the
    output and pytorch-grad-cam style per-sample callables give the same map; an int is
    its class over the whole map; an integer mask is its non-zero region (a uint8 0/255 mask
    was weights of 255)."""
    model = _dense_net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    mask = torch.rand(2, 16, 16, dtype=torch.float64) > 0.6
    explainer = relprop.Explainer(model, "lrp-epsilon-plus")
    ref = explainer(x, SegmentationTarget(2, mask))
    full = torch.zeros(2, CLASSES, 16, 16, dtype=torch.bool)
    full[:, 2] = mask
    per_sample = [SegmentationTarget(2, mask[b]) for b in range(2)]    # called with (C, H, W)
    png = mask.to(torch.uint8) * 255                                   # a 0/255 mask read from a PNG: a region
    for target in ((2, mask), (2, mask.numpy()), (2, png), (2, png.numpy()), full, full.double(),
                   SegmentationTarget(2, mask),
                   lambda out: (out[:, 2] * mask).sum((1, 2)), per_sample, (torch.tensor(2), mask)):
        torch.testing.assert_close(explainer(x, target), ref)
    whole = explainer(x, 1)
    torch.testing.assert_close(whole, explainer(x, SegmentationTarget(1, torch.ones(16, 16))))
    torch.testing.assert_close(whole, explainer(x, SegmentationTarget(1)))
    torch.testing.assert_close(whole, explainer(x, (1, None)))     # the tuple with no mask, as documented
    torch.testing.assert_close(explainer.attribute(x, [0, 2]).target, torch.tensor([0, 2]))


def test_dict_output_entry_and_output_key():
    """A dict output is explained at "out" (aux ignored) or at ``output_key``."""
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    plain, wrapped = _dense_net(), _dense_net(as_dict=True)
    torch.testing.assert_close(relprop.Explainer(wrapped, "rap")(x, 1), relprop.Explainer(plain, "rap")(x, 1))
    torch.testing.assert_close(relprop.Explainer(wrapped, "rap", output_key="out")(x, 1),
                               relprop.Explainer(plain, "rap")(x, 1))

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _dense_net()

        def forward(self, x):
            y = self.net(x)
            return {"seg": y, "edges": y[:, :1] * 2}

    two = TwoHeads()
    with pytest.raises(relprop.UnsupportedModelError, match=re.escape(
            "the model returns a dict with keys ['seg', 'edges']; relprop explains one tensor entry: pass "
            "output_key= (relprop.Explainer, relprop.explain) to choose the entry to explain")):
        relprop.Explainer(two, "rap")
    with pytest.raises(relprop.UnsupportedModelError, match=re.escape(
            "the model returns a dict with keys ['seg', 'edges']; relprop explains one tensor entry: "
            "output_key='out' is not one of them")):
        relprop.Explainer(two, "rap", output_key="out")
    torch.testing.assert_close(relprop.Explainer(two, "rap", output_key="seg")(x, 1),
                               relprop.Explainer(plain, "rap")(x, 1))
    edges = relprop.Explainer(two, "lrp-epsilon", output_key="edges").attribute(x, 0)
    torch.testing.assert_close(edges.logits, two(x)["edges"])
    with pytest.raises(ValueError, match=re.escape(
            "output_key='out' selects an entry of a dict output, but the model returns a single tensor")):
        relprop.Explainer(plain, "rap", output_key="out")
    with pytest.raises(TypeError, match=re.escape(
            "output_key must be a str (a key of the model's dict output) or None, got int 0")):
        relprop.Explainer(wrapped, "rap", output_key=0)


def test_a_1x1_dense_output_is_a_classifier_for_every_method():
    """The per-position definitions (CLRP's dual classes, SGLRP's softmax, the Grad-CAM
    start) reduce to the classifier's: a (B, C, 1, 1) output explained over its one
    position gives the maps of the same net with the output flattened to (B, C)."""
    torch.manual_seed(6)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1))
    dense = features.eval()
    flat = nn.Sequential(features, nn.Flatten()).eval()
    x = torch.randn(2, 3, 12, 12)
    for method in METHODS:
        for params in ([{"variant": "clrp2"}, {"style": "agf"}, {}] if method == "clrp" else [{}]):
            want = relprop.Explainer(flat, method, **params)(x, [1, 3])
            got = relprop.Explainer(dense, method, **params)(x, [1, 3])
            torch.testing.assert_close(got, want, msg=f"{method} {params}")


# ----------------------------------------------------------------------------- errors
def _raises(exc, message, fn):
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value) == message


def test_bad_dense_targets_raise_clear_errors():
    model = _dense_net()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = relprop.Explainer(model, "lrp-epsilon")
    mask = torch.ones(16, 16, dtype=torch.bool)
    _raises(relprop.DenseOutputError,
            "the model's output has shape (2, 3, 16, 16), a dense (per-position) map, not (B, classes) scores: "
            "target=None (the predicted class) is defined for classifiers only; give "
            "relprop.SegmentationTarget(category, mask), a tuple (category, mask), a class index (that class over "
            "the whole map), a (B, C, H, W) boolean or float mask of the output, or a callable on the output",
            lambda: explainer(x))
    _raises(ValueError, "target mask of shape (8, 8) does not fit the output of shape (2, 3, 16, 16): give "
            "(H, W) = (16, 16) or (B, H, W) = (2, 16, 16)", lambda: explainer(x, (1, torch.ones(8, 8))))
    _raises(ValueError, "target mask of shape (3, 16, 16) does not fit the output of shape (2, 3, 16, 16): give "
            "(H, W) = (16, 16) or (B, H, W) = (2, 16, 16)", lambda: explainer(x, (1, torch.ones(3, 16, 16))))
    _raises(ValueError, "target class 3 out of range for an output with 3 classes", lambda: explainer(x, (3, mask)))
    _raises(ValueError, "target class -1 out of range for an output with 3 classes", lambda: explainer(x, -1))
    _raises(ValueError, "target class 5 out of range for an output with 3 classes", lambda: explainer(x, [0, 5]))
    _raises(ValueError, "got 3 target classes for a batch of 2",
            lambda: explainer(x, SegmentationTarget([0, 1, 2], mask)))
    _raises(ValueError, "a mask target must have the output's shape (2, 3, 16, 16) (or a batch of 1), got "
            "(2, 16, 16); for a region of one class give (category, mask) with an (H, W) or (B, H, W) mask",
            lambda: explainer(x, torch.ones(2, 16, 16, dtype=torch.bool)))
    _raises(TypeError, "a mask target must be boolean or float, got torch.int64 (integer tensors are class "
            "indices)", lambda: explainer(x, torch.ones(2, 3, 16, 16, dtype=torch.long)))
    _raises(ValueError, "the target selects nothing in sample(s) [1] (an empty mask or all-zero weights)",
            lambda: explainer(x, (0, torch.stack([mask, ~mask]))))
    _raises(ValueError, "SegmentationTarget: mask must have shape (H, W) or (B, H, W), got (16,)",
            lambda: SegmentationTarget(0, torch.ones(16)))
    _raises(TypeError, "SegmentationTarget: category must be an int class index (or one per sample), got 1.5",
            lambda: SegmentationTarget(1.5, mask))
    _raises(TypeError, "SegmentationTarget: mask must be a torch.Tensor or NumPy array, got list",
            lambda: SegmentationTarget(0, [[1, 0], [0, 1]]))
    _raises(ValueError, "SegmentationTarget: mask contains NaN or Inf",
            lambda: SegmentationTarget(0, torch.full((4, 4), float("nan"))))
    _raises(ValueError, "initial_relevance must have shape (2, 3, 16, 16), got (3,)",
            lambda: explainer(x, initial_relevance=torch.ones(3)))
    two_classes = torch.zeros(2, 3, 16, 16, dtype=torch.bool)
    two_classes[:, 0, :4] = two_classes[:, 1, 8:] = True
    for method in ("clrp", "sglrp"):
        _raises(ValueError, f"method {method!r} builds its contrastive duals from one class per sample: a dense "
                "target must put its weights on one class channel per sample",
                lambda: relprop.Explainer(model, method)(x, two_classes))
    relprop.Explainer(model, "lrp-epsilon")(x, two_classes)     # fine where there is no dual


def test_clrp2_needs_an_output_layer_to_negate(models):
    """LR-ASPP's output is the sum of two classifiers, upsampled: no single layer to negate."""
    x = torch.randn(1, 3, SIZE, SIZE)
    _raises(ValueError, "method 'clrp': variant 'clrp2' negates the output layer, but the output of LRASPP is not "
            "computed by one conv or Linear layer (through reshapes or upsampling); use variant='clrp1'",
            lambda: relprop.Explainer(models["lraspp"], "clrp", variant="clrp2")(x, 1))
    r = relprop.Explainer(models["fcn"], "clrp", variant="clrp2")(x, 1)     # FCN: the 1x1 classifier, upsampled
    assert torch.isfinite(r).all() and r.abs().sum() > 0


def test_segmentation_target_is_a_grad_cam_style_callable():
    out = torch.randn(2, CLASSES, 4, 4)
    mask = np.zeros((4, 4), dtype=np.float32)
    mask[1:3, 1:3] = 1
    t = SegmentationTarget(2, mask)
    assert t(out[0]).item() == pytest.approx((out[0, 2] * torch.from_numpy(mask)).sum().item())
    torch.testing.assert_close(t(out), (out[:, 2] * torch.from_numpy(mask)).sum((1, 2)))
    assert repr(t) == "SegmentationTarget(2, <mask (4, 4)>)"


# ----------------------------------------------------------------------------- command line
def tiny_dense_model():
    """For ``relprop explain --model test_dense:tiny_dense_model``."""
    torch.manual_seed(7)
    return DenseNet(as_dict=True).eval()


def test_cli_refuses_a_dense_output_model(tmp_path, capsys):
    from PIL import Image

    from relprop import cli
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as info:
        cli.main(["explain", str(img), "--model", "test_dense:tiny_dense_model", "--size", "16", "--resize", "16",
                  "-o", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert ("relprop explain explains classifiers, whose output is (B, classes) scores; this model's output has "
            "shape (1, 3, 16, 16) (a dense map, e.g. segmentation). Explain it from Python with a region target: "
            "relprop.Explainer(model, method)(x, target=relprop.SegmentationTarget(category, mask)) "
            "(README, Dense outputs)") in err
    assert not out.exists()
    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(data / "b.png")
    code = cli.main(["attribute", "--data", str(data), "--model", "test_dense:tiny_dense_model", "--size", "16",
                     "--resize", "16", "--out", str(tmp_path / "att"), "--quiet"])
    assert code == 2
    assert "relprop attribute explains classifiers, whose output is (B, classes) scores" in capsys.readouterr().err
