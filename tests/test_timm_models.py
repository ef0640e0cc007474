"""timm models (an optional dependency: ``pip install timm``; skipped without it) run every
method: the captured graph computes the model's logits, and the maps are finite, non-zero
and shaped like the input.  timm's BatchNormAct2d and Linear trace through to functional
calls on their own tensors, with shape assertions; Res2Net, GhostNet, MixNet and DPN split,
slice and concatenate channels: that is what this exercises.  ConvNeXt adds timm's
LayerNorm2d, channels-last LayerNorm and Linears (``convnext_tiny``) or 1x1-conv MLPs
(``convnext_atto``) and a layer scale reshaped at the call; its float64 LRP-epsilon map is
checked against the gradient x input oracle of tests/test_layernorm.py."""
import pytest
import torch

import relprop

timm = pytest.importorskip("timm")

MODELS = ["resnet50", "seresnet50", "resnext50_32x4d", "densenet121", "inception_v3", "inception_resnet_v2",
          "xception41", "efficientnet_b0", "mobilenetv3_large_100", "regnety_008", "dla34", "res2net50_26w_4s",
          "ghostnet_100", "mixnet_s", "dpn68", "hrnet_w18_small", "convnext_atto", "convnext_tiny"]
METHODS = sorted(relprop.available_methods())


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    return create(request.param)


def create(name: str) -> torch.nn.Module:
    m = timm.create_model(name, pretrained=False).eval()
    for mod in m.modules():  # realistic BatchNorm statistics instead of the identity init
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
        if isinstance(mod, torch.nn.LayerNorm):   # ConvNeXt: random affines and layer scales (init 1, 0, 1e-6)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    for name, p in m.named_parameters():
        if name.endswith("gamma"):
            p.data.uniform_(0.1, 1.0)
    return m


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_timm_models(model, method):
    x = torch.randn(2, 3, 96, 96)
    att = relprop.Explainer(model, method).attribute(x)
    with torch.no_grad():
        torch.testing.assert_close(att.logits, model(x), rtol=1e-4, atol=1e-5)
    assert att.relevance.shape == x.shape
    assert torch.isfinite(att.relevance).all()
    assert att.relevance.abs().sum() > 0


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny"])
def test_timm_convnext_epsilon_lrp_is_gradient_x_input_with_detached_statistics(name):
    """The LayerNorm / GELU / layer-scale conventions hold on timm's ConvNeXt as on
    torchvision's (float64, epsilon and stabiliser 0: 1e-12 already moves the deep net's map
    by ~1e-7 of its maximum)."""
    from test_layernorm import gradient_x_input
    torch.manual_seed(0)
    model = create(name).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same").attribute(x)
    expected, logits = gradient_x_input(model, x, a.target)
    torch.testing.assert_close(a.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.relevance, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())


def test_timm_convnext_v2_global_response_norm_is_refused_in_one_error():
    """ConvNeXt V2's GlobalResponseNorm (an L2 norm over space, divided by its channel mean)
    has no rule yet: one error names its operations, and nothing else."""
    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(timm.create_model("convnextv2_atto", pretrained=False), "lrp-epsilon")
    listed = str(err.value).splitlines()[1:]
    assert any(line.strip().startswith("norm (call_method norm)") for line in listed)
    assert all("grn" in line or line.split(" (")[0].strip().split("_")[0] in ("norm", "add", "truediv", "mul", "addcmul")
               for line in listed)
