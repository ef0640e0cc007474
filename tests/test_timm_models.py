"""timm models (an optional dependency: ``pip install timm``; skipped without it) run every
method: the captured graph computes the model's logits, and the maps are finite, non-zero
and shaped like the input.  timm's BatchNormAct2d and Linear trace through to functional
calls on their own tensors, with shape assertions; Res2Net, GhostNet, MixNet and DPN split,
slice and concatenate channels: that is what this exercises."""
import pytest
import torch

import relprop

timm = pytest.importorskip("timm")

MODELS = ["resnet50", "seresnet50", "resnext50_32x4d", "densenet121", "inception_v3", "inception_resnet_v2",
          "xception41", "efficientnet_b0", "mobilenetv3_large_100", "regnety_008", "dla34", "res2net50_26w_4s",
          "ghostnet_100", "mixnet_s", "dpn68", "hrnet_w18_small"]
METHODS = sorted(relprop.available_methods())


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    torch.manual_seed(0)
    m = timm.create_model(request.param, pretrained=False).eval()
    for mod in m.modules():  # realistic BatchNorm statistics instead of the identity init
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
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
