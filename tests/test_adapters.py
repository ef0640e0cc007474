"""relprop.adapters against the real packages: Captum (GradientAttribution, NoiseTunnel,
sensitivity_max), Quantus (explain_func, in-place model randomisation) and Zennit's
Attributor convention.  Each part skips when its package is not installed."""
import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import relprop


def small_net(bn: bool = True, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=bias), nn.ReLU(),
               nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5, bias=bias)]
    model = nn.Sequential(*layers).double().eval()
    if bn:
        with torch.no_grad():
            model[1].running_mean.normal_(0, 0.1)
            model[1].running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def net():
    model = small_net()
    torch.manual_seed(1)
    return model, torch.randn(3, 3, 10, 10, dtype=torch.float64), torch.tensor([4, 0, 2])


def test_import_relprop_does_not_import_the_adapters():
    code = ("import sys, relprop; bad = [m for m in sys.modules if m.startswith(('relprop.adapters', 'captum', "
            "'quantus'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- Captum

def test_captum_attribute_delta_and_flags(net):
    pytest.importorskip("captum")
    from captum.attr import GradientAttribution

    from relprop.adapters.captum import RelProp
    model, x, t = net
    rap = RelProp(model, method="rap")
    assert isinstance(rap, GradientAttribution)
    assert rap.multiplies_by_inputs and not RelProp(model, "gradient").multiplies_by_inputs
    assert rap.has_convergence_delta()
    want = relprop.Explainer(model, "rap").attribute(x, t)
    attr, delta = rap.attribute(x, target=t, return_convergence_delta=True)
    torch.testing.assert_close(attr, want.relevance, rtol=0, atol=0)
    score = want.logits.gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(delta, score - want.relevance.flatten(1).sum(1))
    (as_tuple,) = rap.attribute((x,), target=1)
    torch.testing.assert_close(as_tuple, relprop.Explainer(model, "rap")(x, 1), rtol=0, atol=0)
    # conservation: a bias-free ReLU net under LRP-epsilon (tiny epsilon) loses no relevance
    plain = small_net(bn=False, bias=False)
    _, delta = RelProp(plain, "lrp-epsilon", epsilon=1e-9).attribute(x, target=t, return_convergence_delta=True)
    assert delta.abs().max() < 1e-6


def test_captum_noise_tunnel_and_sensitivity_max_match_captums_own_input_x_gradient(net):
    """relprop's gradient-x-input inside NoiseTunnel and sensitivity_max gives Captum's own
    InputXGradient numbers when the noise is drawn from the same seed."""
    pytest.importorskip("captum")
    from captum.attr import InputXGradient, NoiseTunnel
    from captum.metrics import sensitivity_max

    from relprop.adapters.captum import RelProp
    model, x, t = net
    ours, theirs = RelProp(model, "gradient-x-input"), InputXGradient(model)
    results = []
    for method in (ours, theirs):
        torch.manual_seed(5)
        results.append(NoiseTunnel(method).attribute(x, nt_type="smoothgrad", nt_samples=4, stdevs=0.2, target=t))
    torch.testing.assert_close(results[0], results[1])
    attr, delta = NoiseTunnel(RelProp(model, "rap")).attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.0,
                                                               target=t, return_convergence_delta=True)
    torch.testing.assert_close(attr, relprop.Explainer(model, "rap")(x, t))
    assert delta.shape == (9,)
    sens = []
    for method in (ours, theirs):
        torch.manual_seed(6)
        sens.append(sensitivity_max(method.attribute, x, target=t, n_perturb_samples=3))
    assert sens[0].shape == (3,)
    torch.testing.assert_close(sens[0], sens[1])


def test_captum_bad_arguments(net):
    pytest.importorskip("captum")
    from relprop.adapters.captum import RelProp
    model, x, t = net
    rap = RelProp(model)
    with pytest.raises(ValueError, match=re.escape("additional_forward_args must be None")):
        rap.attribute(x, target=t, additional_forward_args=(1,))
    with pytest.raises(ValueError, match=re.escape("not Captum's tuple targets; got (1, 2)")):
        rap.attribute(x, target=(1, 2))
    with pytest.raises(ValueError, match="got a tuple of 2 inputs"):
        rap.attribute((x, x), target=t)


# --------------------------------------------------------------------------- Quantus

def test_quantus_explain_func_shape_values_and_errors(net):
    from relprop.adapters.quantus import explain_func
    model, x, t = net
    f = explain_func("rap")
    got = f(model, x.numpy(), t.numpy())
    assert isinstance(got, np.ndarray) and got.shape == (3, 1, 10, 10)
    np.testing.assert_allclose(got[:, 0], relprop.Explainer(model, "rap").heatmap(x, t).numpy(), rtol=1e-6)
    assert f(model, x.numpy(), None, device="cpu").shape == (3, 1, 10, 10)
    with pytest.raises(TypeError, match=re.escape("unexpected keyword argument(s) xai_lib")):
        f(model, x.numpy(), t.numpy(), xai_lib="captum")
    with pytest.raises(TypeError, match="method 'ae': ratio must be a number"):
        explain_func("ae", ratio="x")


def test_quantus_explain_func_takes_the_keywords_quantus_passes(net):
    """Quantus calls explain_func(model=, inputs=, targets=, **explain_func_kwargs) with device (a
    metric's device=), method (quantus.evaluate: the xai_methods key) and the user's kwargs."""
    from relprop.adapters.quantus import explain_func
    model, x, t = net
    f = explain_func("rap")
    expected = f(model, x.numpy(), t.numpy())
    same = f(model=model, inputs=x.numpy(), targets=t.numpy(), device="cpu", method="relprop RAP", softmax=False,
             channel_first=True)
    assert np.array_equal(same, expected)
    assert np.array_equal(f(model, x.numpy(), t.numpy(), method="rap", softmax=None), expected)
    with pytest.raises(ValueError, match=re.escape("explain_func('rap') computes 'rap' but was called with "
                                                   "method='lrp-epsilon'; use explain_func('lrp-epsilon')")):
        f(model, x.numpy(), t.numpy(), method="lrp-epsilon")
    with pytest.raises(ValueError, match=re.escape("softmax=True is not supported")):
        f(model, x.numpy(), t.numpy(), softmax=True)
    with pytest.raises(ValueError, match=re.escape("channel_first=False is not supported")):
        f(model, x.numpy(), t.numpy(), channel_first=False)


def test_quantus_evaluate_and_metric_kwargs(net):
    quantus = pytest.importorskip("quantus")
    from relprop.adapters.quantus import explain_func
    model, x, t = net
    model = model.float()
    xs, ts = x.float().numpy(), t.numpy()
    f = explain_func("gradient")

    def sparseness():
        return quantus.Sparseness(disable_warnings=True, display_progressbar=False)

    direct = np.asarray(sparseness()(model=model, x_batch=xs, y_batch=ts, explain_func=f, device="cpu",
                                     explain_func_kwargs={"softmax": False}), dtype=float)
    results = quantus.evaluate(metrics={"sparseness": sparseness()}, xai_methods={"relprop-gradient": f},
                               model=model, x_batch=xs, y_batch=ts, explain_func_kwargs={},
                               call_kwargs={"0": {"device": "cpu"}})
    assert direct.shape == (3,) and np.isfinite(direct).all()
    via_evaluate = np.asarray(results["relprop-gradient"]["sparseness"], dtype=float).reshape(-1)
    np.testing.assert_allclose(via_evaluate, direct, rtol=1e-6)


def test_quantus_in_place_randomisation_changes_the_maps(net):
    """Quantus randomises the model object it is given in place: after reset_parameters,
    load_state_dict into the same tensors, or new BatchNorm running statistics, the same
    function on the same module gives the maps of an independent copy of the changed model."""
    from relprop.adapters.quantus import explain_func
    model, x, t = net
    f = explain_func("rap")
    xs, ts = x.numpy(), t.numpy()

    def check_changed(before):
        now = f(model, xs, ts)
        assert np.abs(now - before).max() > 1e-3 * np.abs(before).max()
        np.testing.assert_allclose(now, f(copy.deepcopy(model), xs, ts), rtol=1e-10, atol=1e-12)
        return now

    maps = f(model, xs, ts)
    torch.manual_seed(3)
    model[4].reset_parameters()
    maps = check_changed(maps)
    other = small_net()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.5)
    tensors = [p.data_ptr() for p in model.parameters()]
    model.load_state_dict(other.state_dict())
    assert [p.data_ptr() for p in model.parameters()] == tensors           # the same tensors, new values
    maps = check_changed(maps)
    np.testing.assert_allclose(maps, f(other, xs, ts), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        model[1].running_mean.add_(0.5)
        model[1].running_var.mul_(3.0)
    check_changed(maps)


@pytest.mark.slow
def test_quantus_metric_end_to_end(net):
    quantus = pytest.importorskip("quantus")
    from relprop.adapters.quantus import explain_func
    model, x, t = net
    model = model.float()
    xs = x.float().numpy()
    metric = quantus.MPRT(layer_order="top_down", return_last_correlation=True, disable_warnings=True,
                          display_progressbar=False)
    scores = metric(model=model, x_batch=xs, y_batch=t.numpy(), explain_func=explain_func("rap"), device="cpu")
    values = np.asarray(scores, dtype=float).reshape(-1)
    assert values.size == 3 and np.isfinite(values).all() and (np.abs(values) <= 1).all()


# --------------------------------------------------------------------------- Zennit convention

def test_attributor_equals_zennit_gradient(net):
    pytest.importorskip("zennit")
    from zennit.attribution import Gradient

    from relprop.adapters.zennit import Attributor
    model, x, _ = net
    onehot = torch.eye(5, dtype=torch.float64)[[3, 3, 3]]
    out, rel = Attributor(model, "gradient")(x, onehot)
    z_out, z_rel = Gradient(model)(x.clone().requires_grad_(True), onehot)
    torch.testing.assert_close(out, z_out.detach())
    torch.testing.assert_close(rel, z_rel)
    # Zennit's default attr_output is the output itself
    _, rel_default = Attributor(model, "gradient")(x)
    _, z_default = Gradient(model)(x.clone().requires_grad_(True))
    torch.testing.assert_close(rel_default, z_default)


def test_attributor_equals_zennit_epsilon_plus_flat():
    pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    from relprop.adapters.zennit import Attributor
    model = small_net(bn=False)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    onehot = torch.eye(5, dtype=torch.float64)[[1, 4]]
    with Attributor(model, "lrp-epsilon-plus-flat", attr_output=onehot) as attributor:
        _, rel = attributor(x)
    with Gradient(model, EpsilonPlusFlat()) as zennit_attributor:
        _, z_rel = zennit_attributor(x.clone().requires_grad_(True), onehot)
    torch.testing.assert_close(rel, z_rel)
    assert not model._forward_hooks and not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_attributor_takes_zennit_composites_as_zennit_does(net):
    """Attributor(model, composite) / Attributor(model, composite=...) as zennit.attribution.Gradient:
    the composite object, class or name gives the equal relprop method and Zennit's numbers."""
    pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import (EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat, ExcitationBackprop,
                                   GuidedBackprop)

    from relprop.adapters.zennit import Attributor
    _, x, t = net
    model = small_net(bn=False)
    onehot = torch.nn.functional.one_hot(t, 5).double()
    low, high = torch.full((1, 3, 1, 1), -3.0, dtype=torch.float64), torch.full((1, 3, 1, 1), 3.0,
                                                                                  dtype=torch.float64)
    for make in (EpsilonPlusFlat, EpsilonAlpha2Beta1, lambda **k: EpsilonGammaBox(low, high, **k)):
        with Gradient(model, make(canonizers=[SequentialMergeBatchNorm()])) as zennit_attributor:
            _, expected = zennit_attributor(x.clone().requires_grad_(True), onehot)
        for attributor in (Attributor(model, make()), Attributor(model, composite=make()),
                           Attributor(model, composite=make(canonizers=[SequentialMergeBatchNorm()]))):
            with attributor:
                _, rel = attributor(x, onehot)
            torch.testing.assert_close(rel, expected)
    for spelling in (EpsilonPlusFlat, "EpsilonPlusFlat", "epsilon_plus_flat"):
        assert Attributor(model, composite=spelling).explainer.method.name == "lrp-epsilon-plus-flat"
        assert Attributor(model, spelling).explainer.method.name == "lrp-epsilon-plus-flat"   # positional too
    named = Attributor(model, composite="EpsilonGammaBox", zb_bounds=(low, high), gamma=0.5)
    with Gradient(model, EpsilonGammaBox(low, high, gamma=0.5, canonizers=[SequentialMergeBatchNorm()])) as z:
        torch.testing.assert_close(named(x, onehot)[1], z(x.clone().requires_grad_(True), onehot)[1])
    _, plain = Attributor(model, composite=None)(x, onehot)       # Gradient(model, None): the plain gradient
    torch.testing.assert_close(plain, Gradient(model)(x.clone().requires_grad_(True), onehot)[1])
    # what cannot be mapped exactly is refused, never explained with other settings
    with pytest.raises(ValueError, match=r"cannot read the arguments of this EpsilonPlusFlat object: it was built "
                                         r"with other arguments than the defaults"):
        Attributor(model, composite=EpsilonPlusFlat(epsilon=0.1))
    with pytest.raises(ValueError, match=r"cannot read the arguments of this EpsilonGammaBox object"):
        Attributor(model, EpsilonGammaBox(low, high, gamma=0.5))
    for other in (GuidedBackprop(), ExcitationBackprop, "guided_backprop"):
        with pytest.raises(ValueError, match=r"relprop has no method equal to the Zennit composite .*supported: "
                                             r"EpsilonPlus, EpsilonPlusFlat"):
            Attributor(model, composite=other)
    with pytest.raises(TypeError, match="composite must be a Zennit composite"):
        Attributor(model, composite=3)
    for method in ("rsp", "rap"):   # "rap", the default, given explicitly too
        with pytest.raises(TypeError, match="either a method or a Zennit composite"):
            Attributor(model, method, composite=EpsilonPlusFlat())
    with pytest.raises(TypeError, match="zb_bounds is given twice"):
        Attributor(model, EpsilonGammaBox(low, high), zb_bounds=(low, high))
    with pytest.raises(ValueError, match="create_graph=True is not supported"):
        Attributor(model, composite=EpsilonPlusFlat(), create_graph=True)
    Attributor(model, composite=EpsilonPlusFlat(), create_graph=False, retain_graph=True)   # Zennit's defaults


def test_attributor_seeds_and_contrastive_methods(net):
    from relprop.adapters.zennit import Attributor
    model, x, t = net
    onehot = torch.nn.functional.one_hot(t, 5).double()
    lrp = relprop.Explainer(model, "lrp-epsilon")
    out, rel = Attributor(model, "lrp-epsilon")(x, lambda output: output * onehot)      # zennit-crp style
    torch.testing.assert_close(rel, lrp(x, t))                                 # = LRP's own seed, logit x one-hot
    torch.testing.assert_close(out, lrp.attribute(x).logits)
    e = relprop.Explainer(model, "rap")
    _, rel = Attributor(model, "rap", attr_output=onehot)(x)
    torch.testing.assert_close(rel, e(x, initial_relevance=onehot))
    _, rel = Attributor(model, "clrp")(x, onehot)
    torch.testing.assert_close(rel, relprop.Explainer(model, "clrp")(x, t), rtol=0, atol=0)
    for seed in (None, 3 * onehot):                                             # the output; a scaled one-hot
        with pytest.raises(ValueError, match=r"^method 'clrp' builds its contrastive duals from one class per "
                                             r"sample: attr_output must be one-hot per sample \(it selects that class\)$"):
            Attributor(model, "clrp")(x, seed)
    with pytest.raises(TypeError, match="attr_output must be None, a tensor or a callable"):
        Attributor(model, "rap", attr_output=[0, 1])
