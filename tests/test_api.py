"""Public API behaviour: targets, seeds, batching, diagnostics, and that the user's model
is never changed."""
import copy
import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import relprop

ALL_METHODS = sorted(relprop.available_methods())


def small_vgg(golden_models, bn=False, classes=5):
    return golden_models.build({"family": "vgg", "cfg": [6, "M", 8, "M", 8, "M"], "batch_norm": bn,
                                "hidden": [12, 12], "num_classes": classes, "avgpool": [3, 3]})


def small_resnet(golden_models):
    return golden_models.build({"family": "resnet", "block": "bottleneck", "layers": [1, 1, 1, 1],
                                "stem_width": 8, "planes": [4, 4, 8, 8], "expansion": 2, "num_classes": 6})


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
            {n: m.training for n, m in model.named_modules()},
            {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


@pytest.mark.parametrize("method", ALL_METHODS)
def test_model_is_never_changed(golden_models, method):
    """Parameters, buffers (BN statistics), hooks, flags: bit for bit identical, even for a
    model left in training mode; the model's own forward is never called."""
    model = small_resnet(golden_models).train()
    calls = []
    model.layer1[0].conv1.register_forward_hook(lambda *a: calls.append(1))
    before = snapshot(model)
    with pytest.warns(relprop.HooksNotRunWarning, match=r"\n  layer1\.0\.conv1 \(Conv2d\): forward hook "):
        relprop.explain(model, torch.randn(2, 3, 40, 40), method=method)
    after = snapshot(model)
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]
    assert calls == []


class StatefulNet(nn.Module):
    """A forward with Python side effects: a counter buffer and a stored activation."""

    def __init__(self, update: str):
        super().__init__()
        self.update = update
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.feats = None

    def forward(self, x):
        if self.update == "reassign":
            self.calls = self.calls + 1
        elif self.update == "augmented":
            self.calls += 1
        elif self.update == "in place":
            self.calls.add_(1)
        elif self.update == "in place, read":
            x = x + self.calls.add_(1)
        h = torch.relu(self.conv(x))
        self.feats = h
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("update", ["reassign", "augmented"])
def test_capture_leaves_a_stateful_forward_unwritten(update):
    """The trace runs the forward's Python (on proxies): what it assigns to the model (a
    stored activation, a buffer counter) is put back, the buffer is never updated, and
    the explainer does not take its own trace for a change of the model (re-capturing,
    and writing, at every call).  Before: the counter went up at capture, ``feats`` held
    a torch.fx Proxy, and every call re-captured."""
    torch.manual_seed(0)
    model = StatefulNet(update).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    calls, feats = model.calls.clone(), model.feats
    explainer = relprop.Explainer(model, "lrp-epsilon")
    assert model.feats is feats and torch.equal(model.calls, calls)
    key = explainer._key
    first = explainer(x)
    assert explainer._key is key, "the explainer captured the model again"
    torch.testing.assert_close(explainer(x), first, rtol=0, atol=0)
    assert model.feats is feats and torch.equal(model.calls, calls)
    assert sorted(vars(model)) == sorted(vars(StatefulNet(update)))   # nothing added (fx's _tensor_constant<i>)


@pytest.mark.parametrize("update", ["in place", "in place, read"])
def test_a_forward_writing_into_a_buffer_is_refused(update):
    model = StatefulNet(update).eval()
    with pytest.raises(relprop.UnsupportedModelError,
                       match=r"add_ \(call_method add_\): writes into the model's tensor 'calls' in place: relprop "
                             r"reads the model and never writes it"):
        relprop.Explainer(model, "rap")
    assert model.calls.item() == 0


def test_assigning_into_a_tensor_is_refused_with_the_remedy():
    class Assigns(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x[:, 0] = 0
            return self.conv(x).mean((2, 3))

    with pytest.raises(relprop.UnsupportedModelError, match=r"must not assign into tensors \(x\[\.\.\.\] = v"):
        relprop.Explainer(Assigns(), "rap")


def test_a_constant_tensor_made_in_forward_is_held_by_the_explainer():
    """``torch.tensor(...)`` in forward: fx keeps it as an attribute ``_tensor_constant0`` of
    the model; relprop keeps it in its graph instead and leaves the model as it was."""
    class MakesConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            x = x * torch.tensor([2.0, 1.0, 0.5]).view(1, 3, 1, 1)
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = MakesConstant().eval()
    x = torch.randn(2, 3, 8, 8)
    got = relprop.explain(model, x, method="gradient-x-input", target=1)
    assert not any(k.startswith("_tensor_constant") for k in vars(model))
    xr = x.clone().requires_grad_()
    model(xr)[:, 1].sum().backward()
    torch.testing.assert_close(got, xr.grad * x)


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class Normalize(nn.Module):
    """The usual input normalisation in front of a classifier, in one of its spellings."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x):
        if self.form == "added":       # accepted before: the offset added
            return (x + (-self.mean)) / self.std
        if self.form == "subtract":
            return (x - self.mean) / self.std
        if self.form == "sub method":
            return x.sub(self.mean).div(self.std)
        if self.form == "torch.sub":
            return torch.sub(x, self.mean) / self.std
        return (x - 0.45) / 0.226     # numbers


@pytest.mark.parametrize("form", ["subtract", "sub method", "torch.sub", "numbers"])
@pytest.mark.parametrize("method", ["lrp-epsilon", "lrp-epsilon-plus-flat", "rap", "rsp"])
def test_an_input_normalisation_wrapper_is_an_offset(form, method):
    """``nn.Sequential(Normalize, model)`` with ``(x - mean) / std``: the subtraction of a
    constant is an offset (a bias, its share dropped) as ``x + c`` is, so the map is that of
    the same normalisation written ``(x + (-mean)) / std``, which relprop already took.  It
    was refused ("compares or computes with tensor values"; a buffer named ``mean`` was even
    called a mean over the batch)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.rand(2, 3, 12, 12)
    expected = Normalize("added")
    if form == "numbers":
        expected.mean.fill_(0.45), expected.std.fill_(0.226)
    want = relprop.explain(nn.Sequential(expected, net), x, method=method, target=2)
    got = relprop.explain(nn.Sequential(Normalize(form), net), x, method=method, target=2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert got.abs().sum() > 0


@pytest.mark.parametrize("method", ["lrp-epsilon-plus-flat", "rap"])
def test_torchvision_normalize_in_front_of_the_model(method):
    """``nn.Sequential(torchvision.transforms.Normalize(mean, std), model)``: traced as
    ``(x - mean) / std`` (its functional form's type checks fail on fx proxies), in the
    input's dtype; the model is left as it was."""
    transforms = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5)).eval()
    x = torch.rand(2, 3, 12, 12)
    want = relprop.explain(nn.Sequential(Normalize("added"), net), x, method=method, target=2)
    model = nn.Sequential(transforms.Normalize(MEAN, STD), net)
    torch.testing.assert_close(relprop.explain(model, x, method=method, target=2), want, rtol=1e-6, atol=1e-9)
    got64 = relprop.explain(model.double(), x.double(), method=method, target=2)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64.float(), want, rtol=1e-4, atol=1e-6)


class Centred(nn.Module):
    """``fc(centre(self, x).mean((2, 3)))`` with a buffer named ``mean``."""

    def __init__(self, centre=lambda self, x: x - self.mean):
        super().__init__()
        self.centre = centre
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.centre(self, x).mean((2, 3)))


def test_a_buffer_named_mean_is_not_a_mean():
    """The model's own buffer ``mean`` (fx: ``get_attr mean``) was taken for ``x.mean()`` over
    the batch and refused."""
    torch.manual_seed(0)
    model, x = Centred().eval(), torch.rand(2, 3, 4, 4)
    got = relprop.explain(model, x, method="gradient-x-input", target=1)
    xr = x.clone().requires_grad_()
    model(xr)[:, 1].sum().backward()
    torch.testing.assert_close(got, xr.grad * x)


@pytest.mark.parametrize("centre", [lambda self, x: self.mean - x, lambda self, x: x - x.flip(3),
                                    lambda self, x: 1.0 - x])
def test_a_subtraction_without_a_constant_to_subtract_is_refused(centre):
    with pytest.raises(relprop.UnsupportedModelError,
                       match=r"sub \(call_function sub\): a subtraction has a rule only as x - c, with c a parameter, "
                             r"a buffer or a number"):
        relprop.Explainer(Centred(centre), "rap")


@pytest.mark.parametrize("method", ["gradcam", "lrp-epsilon", "rap"])
def test_an_output_that_overflows_is_reported(method):
    """float16 logits past 65504 are inf: the predicted class is an argmax among infinities
    (class 0 here, where the float32 model predicts 1) and the map means nothing.  Such a
    sample's error is inf and a warning names it (Grad-CAM returned it with error 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    with torch.no_grad():
        model[-1].bias.copy_(torch.tensor([7e4, 9e4, 0.0, 0.0]))
    x = torch.randn(3, 3, 8, 8)
    x[2] = 0                                      # only the bias: still 7e4 / 9e4
    with pytest.warns(RuntimeWarning, match=r"the model's output for sample\(s\) \[0, 1, 2\] is not finite \(inf "
                                            r"or NaN\) in float16: its predicted class and its map mean nothing"):
        att = relprop.Explainer(copy.deepcopy(model).half(), method).attribute(x.half())
    assert torch.isinf(att.error).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # float32: finite, nothing to say
        assert torch.isfinite(relprop.Explainer(model.float(), "gradcam").attribute(x).error).all()


def test_training_mode_explains_with_inference_semantics(golden_models):
    model = small_vgg(golden_models, bn=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32)
    r_eval = relprop.explain(model.eval(), x, method="rap")
    r_train = relprop.explain(model.train(), x, method="rap")
    torch.testing.assert_close(r_train, r_eval, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["rap", "rsp", "gradient", "lrp-epsilon"])
def test_works_under_no_grad(golden_models, method):
    model = small_vgg(golden_models)
    x = torch.randn(2, 3, 32, 32)
    expected = relprop.explain(model, x, method=method)
    with torch.no_grad():
        got = relprop.explain(model, x, method=method)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_works_under_inference_mode(golden_models, method):
    """torch.inference_mode() around the call (and an inference-mode input) gives the same
    maps as no_grad, as a normal tensor."""
    model = small_vgg(golden_models, bn=True)
    x = torch.randn(2, 3, 32, 32)
    expected = relprop.explain(model, x, method=method)
    with torch.inference_mode():
        xi = x.clone()
        got = relprop.explain(model, xi, method=method)
    assert xi.is_inference() and not got.is_inference()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_batch_equals_samples_one_by_one(golden_models, method):
    """One batched pass gives each sample the map it gets alone (per-sample sums, shifts,
    normalisations and RSP kernels)."""
    model = small_resnet(golden_models).double()
    x = torch.randn(3, 3, 40, 40, dtype=torch.float64)
    targets = [1, 4, 0]
    ex = relprop.Explainer(model, method)
    batched = ex(x, targets)
    for i, t in enumerate(targets):
        torch.testing.assert_close(batched[i:i + 1], ex(x[i:i + 1], t), rtol=1e-7, atol=1e-9)


def test_target_forms_agree(golden_models):
    model = small_vgg(golden_models)
    x = torch.randn(3, 3, 32, 32)
    ex = relprop.Explainer(model, "rap")
    att = ex.attribute(x)
    assert torch.equal(att.target, att.logits.argmax(1))
    torch.testing.assert_close(ex(x, att.target.tolist()), att.relevance)
    torch.testing.assert_close(ex(x, att.target), att.relevance)
    all_two = ex(x, 2)
    torch.testing.assert_close(all_two, ex(x, [2, 2, 2]))
    torch.testing.assert_close(ex.heatmap(x, 2), all_two.sum(1))


@pytest.mark.parametrize("method", ["lrp-epsilon-plus-flat", "lrp-zplus", "rap", "rap-split", "lrp-rap-repo"])
def test_initial_relevance_is_the_output_relevance_for_every_propagating_method(golden_models, method):
    """One meaning for a caller's seed: the relevance of the output.  ``target=t`` is the
    seed ``logit_t * onehot(t)`` for every relevance-propagating method (RAP included: its
    first propagation takes the seed as the weight R / z), and a seed's map scales with it."""
    model = small_vgg(golden_models).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ex = relprop.Explainer(model, method)
    att = ex.attribute(x, [1, 3])
    onehot = torch.nn.functional.one_hot(torch.tensor([1, 3]), 5).double()
    torch.testing.assert_close(ex(x, initial_relevance=att.logits * onehot), att.relevance)
    torch.testing.assert_close(ex(x, initial_relevance=2.5 * att.logits * onehot), 2.5 * att.relevance)
    if method.startswith("rap"):   # RAP conserves, from any seed: the map sums to the seed's sum
        seed = torch.randn(2, 5, dtype=torch.float64)
        torch.testing.assert_close(ex(x, initial_relevance=seed).sum((1, 2, 3)), seed.sum(1))


def test_initial_relevance_seeds_the_output(golden_models):
    """LRP is linear in the output seed: seeding logit*onehot is the default, and the map of
    a sum of seeds is the sum of the maps."""
    model = small_vgg(golden_models).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ex = relprop.Explainer(model, "lrp-epsilon", first_layer="same")
    att = ex.attribute(x, 1)
    onehot = torch.nn.functional.one_hot(torch.tensor([1, 1]), 5).double()
    torch.testing.assert_close(ex(x, initial_relevance=att.logits * onehot), att.relevance)
    a, b = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(ex(x, initial_relevance=a + b),
                               ex(x, initial_relevance=a) + ex(x, initial_relevance=b))
    # the one-call form takes the seed too
    torch.testing.assert_close(relprop.explain(model, x, method="lrp-epsilon", first_layer="same",
                                               initial_relevance=a), ex(x, initial_relevance=a))


def test_the_target_reported_for_an_initial_relevance_is_the_seeded_class(golden_models):
    """``Attribution.target`` is the class the map explains: with a seed, the class carrying
    most of its weight (it was the predicted class)."""
    model = small_vgg(golden_models).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    seed = torch.zeros(3, 5, dtype=torch.float64)
    seed[0, 2], seed[1, 4], seed[2] = 1.0, -3.0, torch.tensor([0.1, 0.2, -0.9, 0.5, 0.0])
    att = relprop.Explainer(model, "rap").attribute(x, initial_relevance=seed)
    assert att.target.tolist() == [2, 4, 2]


def test_layer_sums_report_conservation(golden_models):
    model = small_vgg(golden_models).double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    att = relprop.Explainer(model, "lrp-rap-repo").attribute(x, layer_sums=True)
    z_t = att.logits.gather(1, att.target[:, None])[:, 0]
    for name in ("classifier.6", "classifier.0", "features.0"):
        assert name in att.layer_sums
    torch.testing.assert_close(att.layer_sums["classifier.6"], z_t)
    torch.testing.assert_close(att.layer_sums["features.3"], z_t)
    assert att.layer_sums["features.3"].shape == (2,)


def test_inplace_and_functional_relus_are_captured():
    """Module, in-place and functional ReLUs, each right after its own conv so that it
    clips: the graph computes like the model without writing into its input, and each
    counts as non-negative (the RAP repository's LRP doubles the sum behind a signed input)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            # no biases behind: a bias-only output (all inputs 0) would take relevance with it
            self.conv2, self.conv3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            x = self.act(self.conv1(x))
            x = torch.relu_(self.conv2(x))
            x = torch.nn.functional.relu(self.conv3(x), inplace=True)
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    net = Net().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a1 = net.conv1(x).clamp(min=0)
        a2 = net.conv2(a1).clamp(min=0)
        assert (net.conv2(a1) < 0).any() and (net.conv3(a2) < 0).any()
    x0 = x.clone()
    att = relprop.Explainer(net, "lrp-rap-repo").attribute(x, layer_sums=True)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    torch.testing.assert_close(att.logits, net(x.clone()), rtol=0, atol=0)
    z_t = att.logits.gather(1, att.target[:, None])[:, 0]
    for layer in ("fc", "conv3", "conv2"):
        torch.testing.assert_close(att.layer_sums[layer], z_t, msg=f"{layer}: relevance not conserved")
    torch.testing.assert_close(att.relevance.sum((1, 2, 3)), z_t)


class _SpatialMean(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x):
        if self.form == "function":
            return torch.mean(x, dim=(-1, -2), keepdim=True).flatten(1)
        return x.mean((2, 3))


def test_relu6_leaky_relu_and_spatial_means_compute_like_the_model():
    """The captured graph evaluates ReLU6 (clipping at 6), LeakyReLU (its slope) and spatial
    means exactly like the model, module, functional and in-place forms alike, and never
    writes into the input."""
    F = torch.nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 1)
            self.conv3, self.conv4 = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 3, padding=1)
            self.six, self.leaky = nn.ReLU6(inplace=True), nn.LeakyReLU(0.1, inplace=True)
            self.fc = nn.Linear(18, 3)

        def forward(self, x):
            a = self.six(self.conv1(x))
            b = self.leaky(self.conv2(a))
            c = F.leaky_relu(self.conv3(a), 0.3)
            d = F.relu6(self.conv4(a), inplace=True)
            return self.fc(torch.cat([b.mean((2, 3)), torch.mean(c, dim=(-2, -1)), d.mean(-1).mean(-1)], 1))

    torch.manual_seed(0)
    net = Net().double().eval()
    net.conv4.weight.data *= 4
    x = 8 * torch.randn(2, 3, 6, 6, dtype=torch.float64)
    x0 = x.clone()
    att = relprop.Explainer(net, "rap").attribute(x)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    torch.testing.assert_close(att.logits, net(x.clone()), rtol=0, atol=0)
    with torch.no_grad():  # the clips and the slopes all matter here
        a = net.conv1(x).clamp(0, 6)
        assert (net.conv1(x) > 6).any() and (net.conv4(a) > 6).any()
        assert (net.conv2(a) < 0).any() and (net.conv3(a) < 0).any()


def _clipped_net(six: bool, mean: str | None):
    act = nn.ReLU6 if six else nn.ReLU
    pool = [_SpatialMean(mean), nn.Identity()] if mean else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3, padding=1),
                         nn.BatchNorm2d(5), act(inplace=True), *pool, nn.Linear(5, 4))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_relu6_and_spatial_mean_explain_like_relu_and_global_average_pool(method):
    """ReLU6 is ReLU for relevance (inputs below 6 give bit-identical maps), and a spatial
    ``mean`` is AdaptiveAvgPool2d(1) + Flatten (the same maps up to summation order)."""
    torch.manual_seed(2)
    reference = _clipped_net(six=False, mean=None).double().eval()
    reference[4].running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    params = {"init_layer": "3"} if method in ("rsp", "ae") else {}
    want = relprop.explain(reference, x, method=method, **params)
    assert want.abs().sum() > 0
    for six, mean in ((True, None), (False, "method"), (True, "function")):
        net = _clipped_net(six, mean).double().eval()
        net.load_state_dict(reference.state_dict())
        torch.testing.assert_close(net(x), reference(x))
        got = relprop.explain(net, x, method=method, **params)
        exact = {"rtol": 0, "atol": 0} if not mean else {}
        torch.testing.assert_close(got, want, **exact, msg=f"ReLU6={six} mean={mean}")


def test_leaky_relu_lrp0_is_gradient_times_input():
    """Without biases a LeakyReLU net is positively homogeneous, so LRP-0 (epsilon 0, on every
    layer) equals gradient x input; a LeakyReLU passed as ReLU would not."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.LeakyReLU(0.2), nn.Conv2d(5, 6, 3, stride=2, bias=False),
                        nn.LeakyReLU(0.05, inplace=True), nn.Flatten(), nn.Linear(6 * 2 * 2, 4, bias=False)).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    lrp0 = relprop.explain(net, x, method="lrp-epsilon", epsilon=0.0, first_layer="same")
    torch.testing.assert_close(lrp0, relprop.explain(net, x, method="gradient-x-input"))
    as_relu = nn.Sequential(*[nn.ReLU() if isinstance(m, nn.LeakyReLU) else m for m in net])
    assert not torch.allclose(lrp0, relprop.explain(as_relu, x, method="gradient-x-input"))


class _SqueezeExcite(nn.Module):
    """A squeeze-excitation block with the gate reshaped and expanded, Hu et al. style."""

    def __init__(self, c, gate):
        super().__init__()
        self.fc1, self.fc2, self.act, self.gate = nn.Linear(c, 3), nn.Linear(3, c), nn.GELU(), gate

    def forward(self, x):
        g = self.gate(self.fc2(self.act(self.fc1(x.mean((2, 3))))))
        return x * g.view(x.size(0), x.size(1), 1, 1).expand_as(x)


def _gated_net(gate_kind: str):
    """conv-SiLU-conv-BN-Hardswish, a squeeze-excitation gate (torchvision style: broadcast
    product, or Hu et al.'s reshaped and expanded one), pool, linear; or, for ``"diagonal"``,
    a bias-free depthwise 1x1 conv in the gate's place."""
    head = [nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5),
            nn.Hardswish(inplace=True)]
    if gate_kind == "torchvision":
        from torchvision.ops import SqueezeExcitation
        gate = SqueezeExcitation(5, 3, scale_activation=nn.Hardsigmoid)
    elif gate_kind == "expanded":
        gate = _SqueezeExcite(5, nn.Sigmoid())
    else:
        gate = nn.Conv2d(5, 5, 1, groups=5, bias=False)
    return nn.Sequential(*head, gate, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(20, 3))


@pytest.mark.parametrize("gate_kind", ["torchvision", "expanded"])
def test_squeeze_excitation_gate_gives_the_signal_all_relevance(gate_kind):
    """SiLU, Hardswish, GELU, Sigmoid and Hardsigmoid compute like the model; a gate
    ``x * g(x)`` passes all its relevance to ``x`` and none into its branch: for one image, the
    map is that of the net with the gate frozen into a diagonal (depthwise 1x1) conv, whose
    LRP-epsilon rule is the identity up to epsilon."""
    pytest.importorskip("torchvision")
    torch.manual_seed(5)
    net = _gated_net(gate_kind).double().eval()
    net[3].running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    ex = relprop.Explainer(net, "lrp-epsilon", epsilon=1e-12, first_layer="same")
    att = ex.attribute(x, layer_sums=True)
    torch.testing.assert_close(att.logits, net(x), rtol=0, atol=0)
    gate_branch = [n.name for n in ex.graph.nodes if n.name.startswith("5.") or n.kind == "gate_activation"]
    assert gate_branch and not set(gate_branch) & set(att.layer_sums)   # never visited
    with torch.no_grad():
        before = net[:5](x)
        g = net[5](before) / before
    frozen = _gated_net("diagonal").double().eval()
    frozen.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("5.")}, strict=False)
    frozen[5].weight.data = g[0, :, :1, :1].reshape(5, 1, 1, 1).clone()
    torch.testing.assert_close(frozen(x), net(x))
    want = relprop.explain(frozen, x, method="lrp-epsilon", epsilon=1e-12, first_layer="same")
    torch.testing.assert_close(att.relevance, want, rtol=1e-8, atol=1e-12)


class _TracedBatchNormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass that torch.fx traces through, like timm's BatchNormAct2d: a shape
    assertion, the functional batch norm on its own tensors, then its activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4-d input")
        y = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                           self.training, 0.1, self.eps)
        return self.act(y)


class _TracedLinear(nn.Linear):
    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _bn_act_net(traced: bool):
    if traced:
        layers = [nn.Conv2d(3, 4, 3, padding=1), _TracedBatchNormAct(4), nn.Conv2d(4, 5, 3, padding=1),
                  _TracedBatchNormAct(5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), _TracedLinear(5, 3)]
    else:
        layers = [nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 5, 3, padding=1),
                  nn.BatchNorm2d(5), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double().eval()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_modules_that_trace_through_explain_like_their_plain_twins(method):
    """BatchNorm2d / Linear subclasses that call the functional op on their own tensors (timm's
    BatchNormAct2d, Linear), with shape assertions, give the maps of plain BatchNorm2d + SiLU
    and Linear; the BatchNorm is named after its module."""
    torch.manual_seed(6)
    plain, traced = _bn_act_net(False), _bn_act_net(True)
    for bn in (plain[1], plain[4]):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
    state = plain.state_dict()
    where = {"0": "0", "1": "1", "3": "2", "4": "3", "8": "6"}    # plain layer -> traced layer
    traced.load_state_dict({where[k.split(".")[0]] + k[k.index("."):]: v for k, v in state.items()}, strict=True)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(traced(x), plain(x), rtol=0, atol=0)
    ex = relprop.Explainer(traced, method)
    assert [n.name for n in ex.graph.nodes if n.kind == "bn"] == ["1", "3"]
    want = relprop.explain(plain, x, method=method)
    assert want.abs().sum() > 0
    torch.testing.assert_close(ex(x), want, rtol=0, atol=0)


def _scaled_net(scale_nodes: bool):
    """conv *4, ReLU, conv /2, ReLU, pool, linear: as constant scales, or folded into the convs."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.conv1(x)
            y = torch.relu(4 * y if scale_nodes else y)
            y = self.conv2(y)
            y = torch.relu(y / 2 if scale_nodes else y)
            return self.fc(y.mean((2, 3)))
    return Net().double().eval()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_constant_scales_explain_like_scaled_weights(method):
    """``4 * y`` and ``y / 2`` pass relevance unchanged: the maps are those of the net with
    the factors folded into the preceding convs (every rule is homogeneous in a layer's W, b,
    up to its additive stabiliser, eps 1e-6 or 1e-9, hence a relative L2 tolerance; passing
    the relevance scaled would be off by 2 or 4)."""
    torch.manual_seed(7)
    scaled, folded = _scaled_net(True), _scaled_net(False)
    folded.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        for conv, c in ((folded.conv1, 4.0), (folded.conv2, 0.5)):
            conv.weight.mul_(c)
            conv.bias.mul_(c)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(scaled(x), folded(x), rtol=0, atol=0)
    want = relprop.explain(folded, x, method=method)
    assert want.abs().sum() > 0
    got = relprop.explain(scaled, x, method=method)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


class _Rearranged(nn.Module):
    """Channel splits, slices, shuffles and permutations (Res2Net, GhostNet, ShuffleNet style)
    that together are the identity or a narrower conv; ``plain=True`` is the net without them."""

    def __init__(self, plain: bool):
        super().__init__()
        self.plain = plain
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4 if plain else 6, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        if not self.plain:
            a, b = y.chunk(2, dim=1)                              # pieces back together: the identity
            y = torch.cat([a, b], 1)
            c1, c2, c3 = torch.split(y, [1, 2, 3], dim=1)
            y = torch.cat((c1, c2, c3), dim=1)
            n, c, h, w = y.shape                                  # a channel shuffle and its inverse
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
            y = y.view(n, c // 2, 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
            y = y.permute(0, 2, 3, 1).permute((0, 3, 1, 2))
        y = self.conv2(y)
        if not self.plain:
            y = y[:, :4]                                          # = the conv's first 4 output channels
        y = torch.relu(y)
        return self.fc(torch.flatten(torch.nn.functional.max_pool2d(y, 2), 1))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_splits_slices_and_permutations_explain_like_the_plain_net(method):
    """Relevance through chunk/split + cat, a channel shuffle and its inverse, permutations and
    a channel slice comes back exactly where it was read: the maps are those of the net
    without them (the slice: a conv with only the kept output channels)."""
    torch.manual_seed(8)
    rearranged, plain = _Rearranged(False).double().eval(), _Rearranged(True).double().eval()
    state = rearranged.state_dict()
    plain.load_state_dict({k: v[:4] if k.startswith("conv2") else v for k, v in state.items()})
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(rearranged(x), plain(x), rtol=0, atol=0)
    want = relprop.explain(plain, x, method=method)
    assert want.abs().sum() > 0
    torch.testing.assert_close(relprop.explain(rearranged, x, method=method), want)


def _upsampled_net(up: bool):
    """conv, ReLU, [nearest upsampling x2 (module), bilinear up and down (functional), 2x2
    average pool: the identity on the nearest copy], conv, pool, linear."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3), nn.Linear(4, 3)
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            if up:
                y = torch.nn.functional.avg_pool2d(self.up(y), 2)
            return self.fc(torch.relu(self.conv2(y)).mean((2, 3)))
    return Net().double().eval()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_upsampling_is_split_in_proportion(method):
    """Nearest upsampling then 2x2 average pooling is the identity, and so is its relevance
    (each copy takes a quarter, the upsampling adds them back): the plain net's maps."""
    torch.manual_seed(9)
    upsampled, plain = _upsampled_net(True), _upsampled_net(False)
    plain.load_state_dict(upsampled.state_dict())
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(upsampled(x), plain(x), rtol=0, atol=0)
    want = relprop.explain(plain, x, method=method)
    assert want.abs().sum() > 0
    torch.testing.assert_close(relprop.explain(upsampled, x, method=method), want)


def test_bilinear_interpolation_computes_like_the_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 7 * 9, 2)

        def forward(self, x):
            y = torch.nn.functional.interpolate(torch.relu(self.conv(x)), size=(7, 9), mode="bilinear",
                                                align_corners=False)
            return self.fc(y.flatten(1))

    net = Net().double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    att = relprop.Explainer(net, "lrp-epsilon-plus").attribute(x)
    torch.testing.assert_close(att.logits, net(x), rtol=0, atol=0)
    assert torch.isfinite(att.relevance).all() and att.relevance.abs().sum() > 0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_string_paddings_explain_like_their_integer_padding(method):
    """padding="same" (odd kernels, dilation too) and "valid" give exactly the maps of the
    same convs with integer padding; the user's convs keep their string padding."""
    def net(same, valid):
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=same), nn.ReLU(),
                             nn.Conv2d(4, 5, 3, padding=same, dilation=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(5, 6, 3, padding=valid), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 4))
    torch.manual_seed(1)
    strings = net("same", "valid").double().eval()
    ints = net((1, 1), 0).double().eval()
    ints[2].padding = (2, 2)
    ints.load_state_dict(strings.state_dict())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(strings(x), ints(x), rtol=0, atol=0)
    params = {"init_layer": "5"} if method in ("rsp", "ae") else {}
    got = relprop.explain(strings, x, method=method, **params)
    torch.testing.assert_close(got, relprop.explain(ints, x, method=method, **params), rtol=0, atol=0)
    assert got.abs().sum() > 0
    assert [strings[i].padding for i in (0, 2, 5)] == ["same", "same", "valid"]


def test_import_is_light():
    """``import relprop`` needs only torch: Triton, matplotlib, torchvision stay unloaded."""
    code = ("import sys, relprop; heavy = [m for m in ('triton', 'matplotlib', 'torchvision', 'relprop.kernels') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_kernels_is_not_a_top_level_module(tmp_path):
    """The Triton kernels import as ``relprop.kernels`` (where Triton is installed), never as a
    top-level ``kernels``."""
    top = subprocess.run([sys.executable, "-c", "import kernels"], cwd=tmp_path, capture_output=True, text=True)
    assert top.returncode != 0 and "No module named 'kernels'" in top.stderr
    if importlib.util.find_spec("triton") is not None:
        sub = subprocess.run([sys.executable, "-c", "import relprop.kernels"], cwd=tmp_path,
                             capture_output=True, text=True)
        assert sub.returncode == 0, sub.stderr


def test_backends_report_reasons():
    info = relprop.backends()
    assert info["torch"] == {"available": True, "reason": "ok", "self_check": {}}
    for name in ("triton", "cuda"):
        if not info[name]["available"]:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable: .+"):
                relprop.Explainer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "rap", backend=name)


@pytest.mark.parametrize("params", [{}, {"variant": "clrp2"}])
def test_clrp_of_a_zero_logit_is_a_zero_map(params):
    """A zero-initialised head (torchvision's ViT) gives logits of 0: Gu's CLRP divides each map
    by its own sum, 0 there; the map is 0, as every other method's safe division gives, not NaN
    with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        att = relprop.Explainer(model, "clrp", **params).attribute(x, [0, 2])
    assert torch.equal(att.relevance, torch.zeros_like(att.relevance))


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


def test_hooks_are_never_run_and_named_in_one_warning():
    """Forward hooks and pre-hooks, on a layer, a container, the model or all modules, are not
    part of the explained function (not even traced at capture); each is named, at the line
    building the explainer."""
    x = torch.randn(2, 3, 8, 8)
    expected = relprop.Explainer(_convnet(), "lrp-epsilon")(x)
    model, calls = _convnet(), []

    def doubles(module, args, out):
        calls.append(type(out).__name__)
        return out * 2

    model[2].register_forward_hook(doubles)
    model[0].register_forward_hook(doubles)
    model[0].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    model.register_forward_hook(doubles)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ex = relprop.Explainer(model, "lrp-epsilon")
    finally:
        handle.remove()
    assert [x.category for x in w] == [relprop.HooksNotRunWarning]
    assert w[0].filename == __file__
    assert str(w[0].message) == (
        "relprop never runs the hooks of Sequential: it computes each layer from its parameters and never calls "
        "the model or its modules, so what these hooks do (change an input or output, record activations or "
        "gradients) is not part of the explanation:\n"
        "  <model> (Sequential): forward hook test_hooks_are_never_run_and_named_in_one_warning.<locals>.doubles\n"
        "  0 (Sequential): forward pre-hook test_hooks_are_never_run_and_named_in_one_warning.<locals>.<lambda>\n"
        "  0 (Sequential): forward hook test_hooks_are_never_run_and_named_in_one_warning.<locals>.doubles\n"
        "  2 (ReLU): forward hook test_hooks_are_never_run_and_named_in_one_warning.<locals>.doubles\n"
        "  <all modules>: global forward hook test_hooks_are_never_run_and_named_in_one_warning.<locals>.<lambda>")
    torch.testing.assert_close(ex(x), expected, rtol=0, atol=0)
    assert calls == []


def test_backward_hooks_are_named_for_the_methods_that_differentiate():
    """The gradient methods differentiate relprop's captured graph, which never calls a module,
    so a module backward hook does not change their gradient; the other methods take none."""
    model = _convnet()
    model[1].register_full_backward_hook(lambda module, gin, gout: (gin[0] * 0,))
    with pytest.warns(relprop.HooksNotRunWarning, match=r"\n  1 \(Conv2d\): backward hook "
                                                        r"test_backward_hooks_are_named_for_the_methods"):
        grad = relprop.Explainer(model, "gradient")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(grad(x, 1), relprop.Explainer(_convnet(), "gradient")(x, 1), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relprop.Explainer(model, "lrp-epsilon")


def test_a_model_without_hooks_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relprop.Explainer(_convnet(), "gradcam")


def test_data_parallel_and_compiled_models_are_explained_as_the_module_they_wrap():
    """Read through, never changed: the wrapped module's maps, its layer names with or without
    the wrapper's prefix."""
    x = torch.randn(2, 3, 8, 8)
    model = _convnet()
    expected = relprop.Explainer(model, "gradcam", init_layer="1")(x, 3)
    compiled = torch.compile(model)
    for wrapped, prefix in [(nn.DataParallel(model), "module."), (compiled, "_orig_mod."),
                            (nn.DataParallel(compiled), "module._orig_mod.")]:
        before = snapshot(wrapped)
        for layer in ("1", prefix + "1"):
            got = relprop.Explainer(wrapped, "gradcam", init_layer=layer)(x, 3)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert relprop.graph.unwrap(wrapped) == (model, prefix)
        after = snapshot(wrapped)
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]
    inner = nn.Sequential(torch.compile(_convnet()[:2]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 5))
    torch.testing.assert_close(relprop.Explainer(inner, "rap")(x), relprop.Explainer(nn.Sequential(
        inner[0]._orig_mod, *inner[1:]), "rap")(x), rtol=0, atol=0)


def test_distributed_data_parallel_is_explained_as_its_module(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _convnet()
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(relprop.Explainer(ddp, "rap")(x), relprop.Explainer(model, "rap")(x),
                                   rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_warnings_point_at_the_callers_line(monkeypatch):
    """Whichever entry is used, a warning about the maps names the line that called relprop."""
    model = _convnet()
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(relprop.explainer, "trusted_error", lambda dtype: -1.0)   # every map reported
    ex = relprop.Explainer(model, "rap")
    entries = [lambda: ex(x), lambda: ex.heatmap(x), lambda: ex.attribute(x), lambda: relprop.explain(model, x)]
    for entry in entries:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            entry()
        assert [(x.category, x.filename) for x in w] == [(RuntimeWarning, __file__)]
        assert "may be off by up to" in str(w[0].message)
    try:   # Captum calls the adapter from inside its own attribute(): still the caller's line
        from relprop.adapters.captum import RelProp
    except ImportError:
        pass
    else:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            RelProp(model, "rap").attribute(x, target=1)
        assert [(x.category, x.filename) for x in w] == [(RuntimeWarning, __file__)]
    monkeypatch.undo()
    run = ex.method.run
    monkeypatch.setattr(ex.method, "run", lambda ctx: run(ctx) * float("nan"))
    for entry in entries[:3]:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            entry()
        assert [(x.category, x.filename) for x in w] == [(RuntimeWarning, __file__)]
        assert "gave NaN or Inf relevance" in str(w[0].message)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m not in ("sglrp", "clrp")])
def test_a_zero_seed_gives_a_zero_map_without_a_report(method):
    """initial_relevance of zeros: the map is 0 and so is its error (a step's error of 0 on a
    relevance of 0 counted as a relative error of 1: "may be off by up to ~2e+00")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        att = relprop.Explainer(model, method).attribute(torch.randn(2, 3, 16, 16), initial_relevance=torch.zeros(2, 4))
    assert (att.relevance == 0).all() and (att.error == 0).all()
