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
          "ghostnet_100", "mixnet_s", "dpn68", "hrnet_w18_small", "convnext_atto", "convnext_tiny",
          "convnextv2_atto", "swin_tiny_patch4_window7_224"]
# Built at the test's input size (timm's Swin takes the size it was built for) and run in float64:
# its shift mask's -100 gives attention weights near exp(-100), which RAP's unstabilised quotients
# divide by; in float32 RAP's maps overflow there (relprop warns; README, Conventions).
KWARGS = {"swin_tiny_patch4_window7_224": {"img_size": 96}}
FLOAT64 = {"swin_tiny_patch4_window7_224"}
METHODS = sorted(relprop.available_methods())


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    return create(request.param)


def create(name: str) -> torch.nn.Module:
    m = timm.create_model(name, pretrained=False, **KWARGS.get(name, {})).eval()
    for mod in m.modules():  # realistic BatchNorm statistics instead of the identity init
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
        if isinstance(mod, torch.nn.LayerNorm):   # ConvNeXt: random affines and layer scales (init 1, 0, 1e-6)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
        if type(mod).__name__ == "GlobalResponseNorm":   # ConvNeXt V2 (init 0, 0: the identity)
            mod.weight.data.normal_(0, 0.5)
            mod.bias.data.normal_(0, 0.1)
    for pname, p in m.named_parameters():
        if pname.endswith("gamma"):
            p.data.uniform_(0.1, 1.0)
        if pname.endswith("relative_position_bias_table"):   # Swin (init: std 0.02)
            p.data.normal_(0, 0.5)
    return m.double() if name in FLOAT64 else m


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_timm_models(model, method):
    x = torch.randn(2, 3, 96, 96, dtype=next(model.parameters()).dtype)
    att = relprop.Explainer(model, method).attribute(x)
    with torch.no_grad():
        torch.testing.assert_close(att.logits, model(x), rtol=1e-4, atol=1e-5)
    assert att.relevance.shape == x.shape
    assert torch.isfinite(att.relevance).all()
    assert att.relevance.abs().sum() > 0


def _detached_response_norm(self, x):
    """timm's GlobalResponseNorm with its response ``n(x)`` detached (the oracle's convention)."""
    x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
    x_n = (x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)).detach()
    return x + torch.addcmul(self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * x_n)


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny", "convnextv2_atto", "convnextv2_tiny"])
def test_timm_convnext_epsilon_lrp_is_gradient_x_input_with_detached_statistics(name, monkeypatch):
    """The LayerNorm / GELU / layer-scale conventions hold on timm's ConvNeXt as on
    torchvision's, and GlobalResponseNorm's (ConvNeXt V2, 1x1-conv and channels-last MLPs) by
    the same identity with its response detached (float64, epsilon and stabiliser 0:
    1e-12 already moves the deep net's map by ~1e-7 of its maximum)."""
    from test_layernorm import gradient_x_input
    from timm.layers.grn import GlobalResponseNorm
    torch.manual_seed(0)
    model = create(name).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same").attribute(x)
    monkeypatch.setattr(GlobalResponseNorm, "forward", _detached_response_norm)
    expected, logits = gradient_x_input(model, x, a.target)
    torch.testing.assert_close(a.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.relevance, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    monkeypatch.undo()
    plain, _ = gradient_x_input(model, x, a.target, detached=False)
    assert (a.relevance - plain).abs().max() > 1e-3 * plain.abs().max()
