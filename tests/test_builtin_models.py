"""The shipped built-in shapes classifiers: loading, layers, accuracy and RAP localisation."""
import re
from importlib.resources import files

import pytest
import torch

import relprop
from relprop.benchmark import ShapesDataset, models, normalise
from relprop.metrics import relevance_mass_accuracy

ACC_MARGIN = 0.05           # first 256 test images vs the documented 1000-image accuracy
# Mean relevance-mass accuracy (RAP, true class, first 32 test images) must beat the mean
# mask area (0.112) by this much.  Measured: shapes-vgg 0.469 (+0.358), shapes-resnet 0.360 (+0.248),
# shapes-convnext 0.187 (+0.076), shapes-vit 0.205 (+0.093).
RMA_MARGIN = {"shapes-vgg": 0.20, "shapes-resnet": 0.15, "shapes-convnext": 0.04, "shapes-vit": 0.05}


def _documented_accuracy(name):
    text = files("relprop.benchmark").joinpath("weights", "README.md").read_text()
    m = re.search(rf"^\| {re.escape(name)} \| ([0-9.]+) \|", text, re.M)
    assert m, f"no accuracy for {name} in weights/README.md"
    return float(m.group(1))


@pytest.fixture(scope="module")
def test_batch():
    return ShapesDataset(256, size=models.INPUT_SIZE, seed=0, split="test").make_batch(range(256))


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("nope")


CNN_LAYERS = {torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.AdaptiveAvgPool2d,
              torch.nn.Flatten, torch.nn.Linear, torch.nn.Dropout}
# the leaf modules of each model (its attention and residual adds are functional)
LAYERS = {"shapes-vgg": CNN_LAYERS, "shapes-resnet": CNN_LAYERS,
          "shapes-convnext": {torch.nn.Conv2d, models.LayerNorm2d, torch.nn.GELU, torch.nn.AdaptiveAvgPool2d,
                              torch.nn.Flatten, torch.nn.LayerNorm, torch.nn.Linear},
          "shapes-vit": {torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.LayerNorm, torch.nn.GELU,
                         torch.nn.Linear}}


@pytest.mark.parametrize("name", models.MODELS)
def test_builtin_model(name, test_batch):
    model = models.load(name)
    assert not model.training
    leaves = {type(m) for m in model.modules() if not list(m.children())}
    assert leaves <= LAYERS[name], leaves - LAYERS[name]
    explainer = relprop.Explainer(model, "rap")

    x = normalise(test_batch["images"])
    with torch.no_grad():
        pred = model(x).argmax(1)
    acc = (pred == test_batch["labels"]).float().mean().item()
    assert acc >= _documented_accuracy(name) - ACC_MARGIN, acc

    xs, masks = x[:32], test_batch["masks"][:32]
    relevance = explainer(xs, target=test_batch["labels"][:32])
    assert relevance.shape == xs.shape and torch.isfinite(relevance).all()
    heat = relevance.sum(1)
    rma = relevance_mass_accuracy(heat, masks).mean().item()
    area = masks.float().mean().item()
    assert rma > area + RMA_MARGIN[name], (rma, area)


def test_missing_weights(monkeypatch):
    monkeypatch.setitem(models._BUILDERS, "shapes-missing", models._BUILDERS["shapes-vgg"])
    explanation = (r"^the weights of 'shapes-missing' are missing \(.*shapes-missing\.pt\); "
                   r"train them with scripts/train_builtin\.py or reinstall relprop with its package data$")
    with pytest.raises(FileNotFoundError, match=explanation):
        models.load("shapes-missing")
