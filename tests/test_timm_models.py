"""timm models (an optional dependency: ``pip install timm``; skipped without it) run every
method: the captured graph computes the model's logits, and the maps are finite, non-zero
and shaped like the input.  timm's BatchNormAct2d and Linear trace through to functional
calls on their own tensors, with shape assertions; Res2Net, GhostNet, MixNet and DPN split,
slice and concatenate channels: that is what this exercises.  ConvNeXt adds timm's
LayerNorm2d, channels-last LayerNorm and Linears (``convnext_tiny``) or 1x1-conv MLPs
(``convnext_atto``) and a layer scale reshaped at the call, ``*_rms`` its RmsNorm2d or
SimpleNorm2d; its float64 LRP-epsilon map is checked against the gradient x input oracle of
tests/test_layernorm.py."""
import pytest
import torch

import relprop

timm = pytest.importorskip("timm")

MODELS = ["resnet50", "seresnet50", "resnext50_32x4d", "densenet121", "inception_v3", "inception_resnet_v2",
          "xception41", "efficientnet_b0", "mobilenetv3_large_100", "regnety_008", "dla34", "res2net50_26w_4s",
          "ghostnet_100", "mixnet_s", "dpn68", "hrnet_w18_small", "convnext_atto", "convnext_tiny",
          "convnextv2_atto", "convnext_atto_rms", "convnext_zepto_rms", "swin_tiny_patch4_window7_224"]
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
        if type(mod).__name__.startswith(("RmsNorm", "SimpleNorm")):   # *_rms ConvNeXts (init 1)
            mod.weight.data.uniform_(0.5, 1.5)
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


def _detached_statistic(norm, centred_var: bool = False):
    """timm's ``rms_norm`` / ``rms_norm2d`` / ``simple_norm`` with the statistic detached."""
    def f(x, normalized_shape, weight=None, eps=1e-5):
        dims = (1,) if norm == "2d" else tuple(range(-len(normalized_shape), 0))
        stat = x.var(dims, keepdim=True) if centred_var else x.pow(2).mean(dims, keepdim=True)
        y = x * (stat + eps).rsqrt().detach()
        if weight is not None:
            y = y * (weight.reshape(1, -1, 1, 1) if norm == "2d" else weight)
        return y
    return f


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_tiny", "convnextv2_atto", "convnextv2_tiny",
                                  "convnext_atto_rms", "convnext_zepto_rms"])
def test_timm_convnext_epsilon_lrp_is_gradient_x_input_with_detached_statistics(name, monkeypatch):
    """The LayerNorm / GELU / layer-scale conventions hold on timm's ConvNeXt as on
    torchvision's, and GlobalResponseNorm's (ConvNeXt V2, 1x1-conv and channels-last MLPs) and
    the RMS norms' (``*_rms``: RmsNorm2d, SimpleNorm2d) by the same identity with their
    response or statistic detached (float64, epsilon and stabiliser 0: 1e-12 already moves the
    deep net's map by ~1e-7 of its maximum)."""
    import timm.layers.norm as timm_norm
    from test_layernorm import gradient_x_input
    from timm.layers.grn import GlobalResponseNorm
    torch.manual_seed(0)
    model = create(name).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same").attribute(x)
    monkeypatch.setattr(GlobalResponseNorm, "forward", _detached_response_norm)
    monkeypatch.setattr(timm_norm, "rms_norm", _detached_statistic("last"))
    monkeypatch.setattr(timm_norm, "rms_norm2d", _detached_statistic("2d"))
    monkeypatch.setattr(timm_norm, "simple_norm", _detached_statistic("last", centred_var=True))
    expected, logits = gradient_x_input(model, x, a.target)
    torch.testing.assert_close(a.logits, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.relevance, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())
    monkeypatch.undo()
    plain, _ = gradient_x_input(model, x, a.target, detached=False)
    assert (a.relevance - plain).abs().max() > 1e-3 * plain.abs().max()


def _toy_distilled_deit(dtype=torch.float64) -> torch.nn.Module:
    """timm's DeiT with a distillation token at toy size, randomised like the ViTs of
    tests/test_transformers.py; in inference mode it returns the mean of its two heads."""
    from test_transformers import _randomise
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    with torch.no_grad():
        model.dist_token.normal_(0, 0.5)
        model.head_dist.weight.normal_(0, 0.5)
    return _randomise(model).to(dtype).eval()


def test_distilled_deit_epsilon_lrp_is_gradient_x_input_with_detached_attention():
    """DeiT's distillation token and second head (averaged with the class token's head at
    inference): the ViT oracle of tests/test_transformers.py holds, relevance reaching the
    input through both tokens."""
    from test_transformers import gradient_x_input as transformer_oracle
    model = _toy_distilled_deit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same").attribute(x)
    expected, logits = transformer_oracle(model, x, a.target)
    torch.testing.assert_close(a.logits, logits, rtol=1e-12, atol=1e-12)
    assert (a.relevance - expected).norm() / expected.norm() < 1e-8
    with torch.no_grad():   # the distillation head really contributes to the logits explained
        model.head_dist.weight.zero_()
    assert (relprop.Explainer(model, "lrp-epsilon")(x, a.target) - a.relevance).norm() > 1e-3 * a.relevance.norm()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_a_distilled_deit(method):
    model = _toy_distilled_deit(torch.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    att = relprop.Explainer(model, method).attribute(x)
    with torch.no_grad():
        torch.testing.assert_close(att.logits, model(x), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(att.relevance).all() and (att.relevance.flatten(1).abs().sum(1) > 0).all()
