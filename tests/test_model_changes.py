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


def _small(act=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), act or nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


_X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_a_model_that_cannot_be_captured_is_refused_at_every_call_until_it_can():
    """A failed capture is not the explainer's: the next call tries again and is refused
    again (it returned the old model's map), and once the model is capturable again the map
    is the fresh explainer's."""
    model = _small()
    explainer = relprop.Explainer(model, "rap")
    explainer(_X)
    model[2] = nn.Softsign()
    for _ in range(2):
        with pytest.raises(relprop.UnsupportedModelError, match=r"Softsign"):
            explainer(_X)
    model[2] = nn.ReLU6()
    torch.testing.assert_close(explainer(_X), relprop.Explainer(model, "rap")(_X), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["gradcam", "rsp"])
def test_an_init_layer_removed_is_refused_alike_at_every_call(method):
    from collections import OrderedDict
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv1=nn.Conv2d(3, 8, 3, padding=1), relu1=nn.ReLU(),
                                      conv2=nn.Conv2d(8, 8, 3, padding=1), relu2=nn.ReLU(),
                                      pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 5))).eval()
    explainer = relprop.Explainer(model, method, init_layer="conv2")
    explainer(_X)
    del model.conv2
    errors = []
    for _ in range(2):
        with pytest.raises(ValueError) as info:
            explainer(_X)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1] and errors[0][1].startswith(f"method {method!r}: no layer named 'conv2'"), errors


def _slope(model):
    model[4].negative_slope = 0.3


def _gelu_tanh(model):
    model[4].approximate = "tanh"


def _dilation(model):
    model[3].dilation = (2, 2)
    model[3].padding = (2, 2)


@pytest.mark.parametrize("change, act", [(_slope, lambda: nn.LeakyReLU(0.01)), (_gelu_tanh, nn.GELU), (_dilation, None)],
                         ids=["leaky-relu-slope", "gelu-approximate", "conv-dilation"])
@pytest.mark.parametrize("method", ["lrp-epsilon", "rap", "gradient"])
def test_changed_module_settings_are_followed(method, change, act):
    """A module setting the capture reads once (an activation's slope or approximation, a
    conv's dilation) changed after the explainer was built: the next call captures again."""
    model = _small(act and act())
    explainer = relprop.Explainer(model, method)
    before = explainer.attribute(_X, 1)
    change(model)
    after = explainer.attribute(_X, 1)
    torch.testing.assert_close(after.logits, model(_X), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after.relevance, relprop.Explainer(model, method)(_X, 1), rtol=0, atol=0)
    assert not torch.equal(after.relevance, before.relevance)


def _reflect(model):
    model[3].padding_mode = "reflect"


def _negative_slope(model):
    model[4].negative_slope = -0.5


def _no_running_stats(model):
    model[1].track_running_stats = False
    model[1].running_mean = model[1].running_var = None


@pytest.mark.parametrize("change, act, match", [
    (_reflect, None, r"padding_mode='reflect'"),
    (_negative_slope, lambda: nn.LeakyReLU(0.01), r"negative_slope=-0\.5"),
    (_no_running_stats, None, r"track_running_stats=False")], ids=["padding-mode", "negative-slope", "batch-stats"])
def test_a_setting_a_fresh_explainer_refuses_is_refused_at_the_next_call(change, act, match):
    model = _small(act and act())
    explainer = relprop.Explainer(model, "lrp-epsilon")
    explainer(_X, 1)
    change(model)
    with pytest.raises(relprop.UnsupportedModelError, match=match):
        relprop.Explainer(model, "lrp-epsilon")
    with pytest.raises(relprop.UnsupportedModelError, match=match):
        explainer(_X, 1)


def test_a_hook_swapped_for_another_of_the_same_name_is_warned_about():
    """Hooks are told apart by identity, not by their names; one registered together with a
    module replacement is named as registered since the build."""
    import warnings
    model = _small()
    explainer = relprop.Explainer(model, "lrp-epsilon")
    handle = model[0].register_forward_hook(lambda m, i, o: o)
    with pytest.warns(relprop.HooksNotRunWarning):
        explainer(_X, 1)
    handle.remove()
    model[0].register_forward_hook(lambda m, i, o: o * 100)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        explainer(_X, 1)
        model[7] = nn.Linear(8, 5)
        model[7].register_forward_hook(lambda m, i, o: o)
        explainer(_X, 1)
        explainer(_X, 1)
    assert [str(x.message).split(":\n")[1] for x in w] == [
        "  0 (Conv2d): forward hook test_a_hook_swapped_for_another_of_the_same_name_is_warned_about.<locals>.<lambda>",
        "  7 (Linear): forward hook test_a_hook_swapped_for_another_of_the_same_name_is_warned_about.<locals>.<lambda>"]
    assert all("registered since the explainer was built" in str(x.message) for x in w)
