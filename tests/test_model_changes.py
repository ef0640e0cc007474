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


def _replace_classifier(model):
    torch.manual_seed(11)
    name, old = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Linear(old.in_features, old.out_features))


def _replace_first_conv(model):
    torch.manual_seed(12)
    name, old = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][0]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size,
                                                       old.stride, old.padding, bias=old.bias is not None))


@pytest.mark.parametrize("replace", [_replace_classifier, _replace_first_conv], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("method", ["lrp-epsilon", "rap", "gradient", "rsp"])
def test_replaced_modules_are_seen(method, replace):
    """A submodule *replaced* after the explainer was built (``model.fc = nn.Linear(...)``,
    fine-tuning's new head) is explained, not the old one the graph was captured from: the
    module tree is compared before every call and captured again where it changed."""
    model = _models()["resnet"]
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    explainer = relprop.Explainer(model, method)
    before = explainer(x, 1)
    replace(model)
    after = explainer(x, 1)
    torch.testing.assert_close(after, relprop.Explainer(model, method)(x, 1), rtol=0, atol=0)
    assert not torch.allclose(after, before)


def test_a_module_replaced_by_an_unsupported_one_is_refused_at_the_next_call():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    explainer = relprop.Explainer(model, "lrp-epsilon")
    explainer(torch.randn(1, 3, 8, 8), 0)
    model[1] = nn.Softsign()
    with pytest.raises(relprop.UnsupportedModelError, match=r"Softsign"):
        explainer(torch.randn(1, 3, 8, 8), 0)


def test_hooks_registered_after_the_explainer_was_built_are_warned_about_once():
    """Hooks are never run (test_api): one registered after the explainer was built is named
    at the next call, in a warning of its own, and not again at the calls after."""
    import warnings
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    explainer = relprop.Explainer(model, "lrp-epsilon")
    x = torch.randn(1, 3, 8, 8)
    want = explainer(x, 0)

    def doubles(module, args, out):
        return out * 2

    model[0].register_forward_hook(doubles)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = explainer(x, 0)
        again = explainer(x, 0)
    assert [str(m.message) for m in w] == [
        "relprop never runs the hooks of Sequential registered since the explainer was built: it computes each "
        "layer from its parameters and never calls the model or its modules, so what these hooks do (change an "
        "input or output, record activations or gradients) is not part of the explanation:\n"
        "  0 (Conv2d): forward hook test_hooks_registered_after_the_explainer_was_built_are_warned_about_once."
        "<locals>.doubles"]
    assert w[0].filename == __file__
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
