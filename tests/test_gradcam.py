"""The gradcam baseline against Grad-CAM computed by hand with autograd (Selvaraju et al.,
ICCV 2017; TorchRay's bilinear resize), and usable by relprop evaluate."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
from relprop import evaluate


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 4)).double().eval()


def hand_gradcam(model, x, target, layer):
    """Forward with the feature map of ``model[:layer + 1]`` kept, gradient of the target
    logits, channel weights = spatial mean of the gradient, ReLU of the weighted sum,
    bilinear resize (align_corners=False) to the input."""
    a = model[:layer + 1](x)
    a.retain_grad()
    model[layer + 1:](a).gather(1, target[:, None]).sum().backward()
    cam = (a * a.grad.mean(dim=(2, 3), keepdim=True)).sum(1, keepdim=True).clamp(min=0)
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()


@pytest.mark.parametrize("init_layer, index", [(None, 4), ("3", 3)])
def test_gradcam_equals_a_hand_computed_grad_cam(init_layer, index):
    model = net()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    params = {} if init_layer is None else {"init_layer": init_layer}
    e = relprop.Explainer(model, "gradcam", **params)
    relevance = e(x, target)
    assert relevance.shape == x.shape
    torch.testing.assert_close(relevance[:, 0], relevance[:, 2])          # spread equally over channels
    want = hand_gradcam(model, x, target, index)
    assert want.abs().amax() > 0 and (want == 0).any()                   # the ReLU matters here
    torch.testing.assert_close(e.heatmap(x, target), want)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_gradcam_in_evaluate_methods():
    assert evaluate.check_methods("rap,gradcam") == ["rap", "gradcam"]
    assert "gradcam" in evaluate.check_methods("all")
    with pytest.raises(TypeError, match="method 'gradcam': init_layer must be a layer name"):
        relprop.Explainer(net(), "gradcam", init_layer=3)
