"""An Explainer reused after the model changes in place explains the changed model.

Nothing derived from a parameter or buffer (a folded BatchNorm, a sign-split weight) may
outlive a call: every method, after each kind of in-place change, must give exactly the
maps of a fresh Explainer built on the changed model -- and they must differ from the
maps before the change, or the test would prove nothing.
"""
import copy

import pytest
import torch
import torch.nn as nn

import relprop
from relprop.benchmark.models import ShapesResNet, small_vgg

ALL_METHODS = sorted(relprop.available_methods())


def _bn_statistics(model, seed):
    """Give every BatchNorm realistic, non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
            m.running_mean.data = 0.2 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var.data = 0.5 + torch.rand(m.running_var.shape, generator=g)
    return model.eval()


def _models():
    torch.manual_seed(0)
    return {"vgg": _bn_statistics(small_vgg(4, 5), 1), "resnet": _bn_statistics(ShapesResNet(5, (4, 6, 8)), 2)}


def load_other_weights(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.7).add_(0.05)
    _bn_statistics(other, 7)
    model.load_state_dict(other.state_dict())      # copies into the same tensors


def reset_parameters(model):
    torch.manual_seed(123)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
        elif isinstance(m, nn.BatchNorm2d):        # running stats to 0/1, then new affine values
            m.reset_parameters()
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


def optimiser_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    model.eval()
    loss = model(x).logsumexp(1).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def new_batchnorm_statistics(model):
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.9
        model(2.0 + 3 * torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(9)))
    model.eval()


CHANGES = [load_other_weights, reset_parameters, optimiser_step, new_batchnorm_statistics]


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_reused_explainer_sees_in_place_changes(method, change, arch):
    model = _models()[arch]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 2, 4])
    explainer = relprop.Explainer(model, method)
    before = explainer(x, target)
    change(model)
    after = explainer(x, target)
    fresh = relprop.Explainer(model, method)(x, target)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert not torch.allclose(after, before), "the change did not change the maps: the test proves nothing"


@pytest.mark.parametrize("method", ["lrp-epsilon", "lrp-epsilon-plus", "rap"])
def test_replaced_parameter_objects_are_seen(method):
    """A parameter *replaced* by a new tensor (``module.weight = Parameter(...)``,
    ``load_state_dict(assign=True)``) is seen too: nothing is keyed on a tensor's identity."""
    model = _models()["vgg"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    explainer = relprop.Explainer(model, method)
    before = explainer(x, 1)
    state = {k: (v * 0.5 if v.is_floating_point() and "running_var" not in k else v).clone()
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    after = explainer(x, 1)
    torch.testing.assert_close(after, relprop.Explainer(model, method)(x, 1), rtol=0, atol=0)
    assert not torch.allclose(after, before)
