"""Other libraries' methods in relprop evaluate (relprop.external): captum:<Attribution>
and zennit:<Composite> give those libraries' maps, checked against relprop's equivalents,
without touching the model; clear errors for unusable names."""
import re

import pytest
import torch
import torch.nn as nn

import relprop
from relprop import evaluate, external


def vgg_like():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 4)).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


@pytest.fixture
def data():
    torch.manual_seed(1)
    return vgg_like(), torch.randn(3, 3, 12, 12, dtype=torch.float64), torch.tensor([1, 3, 0])


def test_captum_input_x_gradient_equals_relprops(data):
    pytest.importorskip("captum")
    model, x, t = data
    model.train()                                           # the copy is put in eval mode, the model is not
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heat = external.explain_function("captum:InputXGradient")(model, x, t)
    torch.testing.assert_close(heat, relprop.Explainer(model, "gradient-x-input").heatmap(x, t))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_zennit_epsilon_plus_flat_equals_relprops_with_batchnorm_merged(data):
    """Zennit's seed is the one-hot vector, relprop's LRP seed the target logit times it: the
    maps agree up to that factor once every conv -> BatchNorm pair is merged."""
    pytest.importorskip("zennit")
    model, x, t = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heat = external.explain_function("zennit:EpsilonPlusFlat")(model, x, t)
    att = relprop.Explainer(model, "lrp-epsilon-plus-flat").attribute(x, t)
    want = att.relevance.sum(1) / att.logits.gather(1, t[:, None])[:, :, None]
    err = (heat - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1)
    assert (err < 1e-4).all(), err
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    box = external.explain_function("zennit:EpsilonGammaBox")(model, x, t)        # z^B bounds per image
    assert box.shape == (3, 12, 12) and torch.isfinite(box).all()


@pytest.mark.parametrize("method, message", [
    ("foo:bar", "unknown library 'foo' in method 'foo:bar'; external methods are captum:<Attribution> or "
                "zennit:<Composite>"),
    ("captum:Nope", "captum has no attribution 'Nope'; e.g. IntegratedGradients, Saliency, InputXGradient, "
                    "GuidedBackprop, DeepLift"),
    ("captum:Occlusion", "method 'captum:Occlusion' needs arguments (sliding_window_shapes) that relprop evaluate "
                         "cannot give"),
    ("captum:LayerGradCam", "method 'captum:LayerGradCam' needs constructor arguments (layer) that relprop "
                            "evaluate cannot give"),
    ("captum:GradientAttribution", "'captum:GradientAttribution' is one of Captum's base classes"),
    ("zennit:LayerMapComposite", "method 'zennit:LayerMapComposite' needs constructor arguments (layer_map)"),
])
def test_unusable_external_methods_are_refused_before_any_work(method, message):
    pytest.importorskip("captum")
    pytest.importorskip("zennit")
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate.check_methods(f"rap,{method}")
    assert evaluate.check_methods("rap,captum:Saliency,zennit:EpsilonPlusFlat") == [
        "rap", "captum:Saliency", "zennit:EpsilonPlusFlat"]


def test_evaluate_scores_an_external_method(tmp_path):
    pytest.importorskip("captum")
    import json

    from relprop import cli
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--model", "shapes-vgg", "--images", "6", "--methods",
                     "gradient-x-input,captum:InputXGradient", "--out", str(out), "-q"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["models"]["shapes-vgg"]["rows"]
    ours, theirs = rows
    assert theirs["method"] == "captum:InputXGradient" and theirs["untrusted"] is None
    for key in ("pointing_game", "relevance_mass", "iou", "ap", "aopc_morf", "sanity_top"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-5), key
    line, = [l for l in (out / "metrics.md").read_text().splitlines() if l.startswith("| captum:InputXGradient")]
    assert line.rstrip().endswith("| n/a |")


def test_an_external_method_that_cannot_explain_the_model_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """Captum's LRP has no rule for a Flatten: one line naming the method and the model,
    exit 2, before any method is scored (it was a traceback after rap's work)."""
    pytest.importorskip("captum")
    from relprop import cli
    scored = []
    orig = evaluate._evaluate_method
    monkeypatch.setattr(evaluate, "_evaluate_method", lambda *a, **k: scored.append(a[1]) or orig(*a, **k))
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--model", "shapes-vgg", "--images", "2", "--methods", "rap,captum:LRP",
                     "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "relprop evaluate: error: method 'captum:LRP' cannot explain the model shapes-vgg: TypeError: Module of type "
        "<class 'torch.nn.modules.flatten.Flatten'> has no rule"), err
    assert scored == [] and not out.exists() and list(tmp_path.iterdir()) == []
