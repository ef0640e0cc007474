"""Targets decoupled from the explainer (relprop.targets), callable targets, and metrics on
maps from anywhere: NumPy maps and custom explain callables."""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import relprop
from relprop import metrics as M
from relprop.evaluate import explain_function


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()


class ClassifierOutputTarget:
    """pytorch-grad-cam's target, verbatim in behaviour: one class's score of one sample or a batch."""

    def __init__(self, category):
        self.category = category

    def __call__(self, model_output):
        if len(model_output.shape) == 1:
            return model_output[self.category]
        return model_output[:, self.category]


@pytest.fixture
def data():
    model = tiny_cnn()
    torch.manual_seed(1)
    return model, torch.randn(2, 3, 12, 12, dtype=torch.float64)


# --------------------------------------------------------------------------- callable targets

@pytest.mark.parametrize("method", ["rap", "lrp-epsilon", "gradient", "clrp", "sglrp", "rsp"])
def test_classifier_output_target_equals_the_class_index(data, method):
    """A callable selecting class c (batched, or one per sample) gives exactly target=c."""
    model, x = data
    e = relprop.Explainer(model, method)
    want = e.attribute(x, [2, 0])
    batched = e.attribute(x, lambda z: z[:, 2] * (torch.arange(2) == 0) + z[:, 0] * (torch.arange(2) == 1))
    per_sample = e.attribute(x, [ClassifierOutputTarget(2), ClassifierOutputTarget(0)])
    single = e.attribute(x, ClassifierOutputTarget(1))
    for got in (batched, per_sample):
        assert torch.equal(got.target, want.target)
        torch.testing.assert_close(got.relevance, want.relevance, rtol=0, atol=0)
    torch.testing.assert_close(single.relevance, e.attribute(x, 1).relevance, rtol=0, atol=0)


def test_a_weighted_target_is_linearised_at_the_output(data):
    """score = 2 z_1 - z_0: the gradient method back-propagates w = (-1, 2, 0) (its seed);
    the LRP family starts from w * logits; the reported class is arg-max w."""
    model, x = data
    w = torch.tensor([-1.0, 2.0, 0.0], dtype=torch.float64)

    def target(z):
        return 2 * z[:, 1] - z[:, 0]

    grad = relprop.Explainer(model, "gradient")
    got = grad.attribute(x, target)
    assert got.target.tolist() == [1, 1]
    torch.testing.assert_close(got.relevance, grad(x, initial_relevance=w))
    xg = x.clone().requires_grad_(True)
    target(model(xg)).sum().backward()
    torch.testing.assert_close(got.relevance, xg.grad)           # the autograd oracle
    lrp = relprop.Explainer(model, "lrp-epsilon")
    got = lrp.attribute(x, target)
    torch.testing.assert_close(got.relevance, lrp(x, initial_relevance=w * got.logits))
    # the weighted score's map, not that of the reported class alone
    assert not torch.allclose(got.relevance, lrp(x, 1))


@pytest.mark.parametrize("target, error, message", [
    (lambda z: z, ValueError, "a callable target must return one score per sample, shape (2,); got (2, 3)"),
    (lambda z: torch.ones(2), ValueError, "a callable target's scores must depend on the model output "
                                           "(they carry no gradient)"),
    (lambda z: z[:, 0] * torch.tensor([1.0, 0.0], dtype=z.dtype), ValueError,
     "a callable target's scores do not depend on the output of sample(s) [1] (zero gradient)"),
    (lambda z: 3, TypeError, "a callable target must return a tensor of scores, got int"),
    ([ClassifierOutputTarget(0)] * 3, ValueError, "got 3 target callables for a batch of 2"),
])
def test_bad_callable_targets(data, target, error, message):
    model, x = data
    with pytest.raises(error) as err:
        relprop.Explainer(model, "rap")(x, target)
    assert str(err.value) == message


def test_contrastive_methods_need_a_one_class_callable(data):
    model, x = data
    with pytest.raises(ValueError) as err:
        relprop.Explainer(model, "clrp")(x, lambda z: z[:, 0] + z[:, 1])
    assert str(err.value) == ("method 'clrp' builds its contrastive duals from one class per sample: a callable "
                              "target must select one class (its gradient with respect to the output must be "
                              "one-hot)")


def test_region_perturbation_scores_callable_targets(data):
    model, x = data
    heat = torch.randn(2, 12, 12, dtype=torch.float64)
    kw = dict(patch=4, steps=4, replace="mean")
    want = M.region_perturbation(model, x, heat, torch.tensor([2, 0]), **kw)
    got = M.region_perturbation(model, x, heat, [ClassifierOutputTarget(2), ClassifierOutputTarget(0)], **kw)
    torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=0)
    weighted = M.region_perturbation(model, x, heat, lambda z: z[:, 0] - z[:, 1], **kw)
    a, b = (M.region_perturbation(model, x, heat, c, **kw)["scores"] for c in (0, 1))
    torch.testing.assert_close(weighted["scores"], a - b)


def test_metrics_do_not_import_the_explainer():
    import relprop.metrics.perturbation as P
    import relprop.metrics.sensitivity as S
    for mod in (P, S):
        source = open(mod.__file__).read()
        assert "explainer" not in source.replace("relprop.evaluate.explain_function", ""), mod.__name__


# --------------------------------------------------------------------------- NumPy maps

def test_localisation_metrics_take_numpy_maps_and_masks():
    torch.manual_seed(0)
    maps, masks = torch.randn(3, 10, 10), torch.rand(3, 10, 10) > 0.6
    for f in (M.pointing_game, M.outside_inside_ratio, M.relevance_mass_accuracy):
        torch.testing.assert_close(f(maps.numpy(), masks.numpy()), f(maps, masks), equal_nan=True)
    got, want = M.segmentation_scores(maps.numpy(), masks.numpy()), M.segmentation_scores(maps, masks)
    for key in want:
        torch.testing.assert_close(got[key], want[key], equal_nan=True)
    with pytest.raises(TypeError, match=re.escape("maps must hold real numbers, got a NumPy array of <U1")):
        M.pointing_game(np.full((1, 2, 2), "a"), masks[:1, :2, :2])


def test_region_perturbation_takes_numpy_maps(data):
    model, x = data
    heat = torch.randn(2, 12, 12, dtype=torch.float64)
    kw = dict(patch=4, steps=3, replace="blur")
    got, want = (M.region_perturbation(model, x, h, None, **kw) for h in (heat.numpy(), heat))
    for key in want:
        torch.testing.assert_close(got[key], want[key])


# --------------------------------------------------------------------------- custom explain callables

def test_cascading_randomization_with_a_custom_numpy_explain(data):
    """A hand-written gradient returning NumPy gives relprop's gradient numbers; a map that
    ignores the model (the input's magnitude) stays perfectly correlated at every step."""
    model, x = data

    def numpy_gradient(m, inputs, targets):
        xg = inputs.clone().requires_grad_(True)
        m(xg).gather(1, torch.as_tensor(targets)[:, None]).sum().backward()
        return xg.grad.sum(1).numpy()

    ours = M.cascading_randomization(model, x, None, explain_function("gradient"), seed=3)
    theirs = M.cascading_randomization(model, x, None, numpy_gradient, seed=3)
    assert [s["layer"] for s in theirs] == [s["layer"] for s in ours] == ["6", "2", "0"]
    for a, b in zip(ours, theirs):
        for key in ("spearman", "spearman_signed", "ssim", "ssim_signed"):
            torch.testing.assert_close(a[key], b[key])
    blind = M.cascading_randomization(model, x, None, lambda m, i, t: i.abs().sum(1), seed=3)
    for step in blind:
        torch.testing.assert_close(step["spearman"], torch.ones(2, dtype=torch.float64))


def test_cascading_randomization_passes_callable_targets_through(data):
    model, x = data
    seen = []

    def explain(m, inputs, targets):
        seen.append(targets)
        return relprop.Explainer(m, "gradient").heatmap(inputs, targets)

    target = ClassifierOutputTarget(1)
    res = M.cascading_randomization(model, x, target, explain, seed=0)
    assert all(t is target for t in seen) and len(seen) == 4
    want = M.cascading_randomization(model, x, 1, explain_function("gradient"), seed=0)
    for a, b in zip(res, want):
        torch.testing.assert_close(a["spearman"], b["spearman"])


def test_bad_explain_callables(data):
    model, x = data
    with pytest.raises(TypeError) as err:
        M.cascading_randomization(model, x, None, "gradient")
    assert str(err.value) == ("explain must be a callable explain(model, x, targets) -> (B, H, W) maps, got str "
                              "'gradient'; for a relprop method use relprop.evaluate.explain_function('gradient')")
    with pytest.raises(ValueError) as err:
        M.cascading_randomization(model, x, None, lambda m, i, t: i)
    assert str(err.value) == ("explain(model, x, targets) must return (B, H, W) maps with B = 2 (reference map), "
                              "got (2, 3, 12, 12)")
    with pytest.raises(TypeError, match=re.escape("method 'ae': ratio must be a number")):
        explain_function("ae", ratio="2")
