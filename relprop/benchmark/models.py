"""Small built-in classifiers for the "shapes in clutter" benchmark (64 x 64 inputs).

    >>> from relprop.benchmark import models
    >>> model = models.load("shapes-vgg")           # trained weights shipped with the package
    >>> logits = model(normalise(batch["images"]))  # inputs: normalised with shapes.normalise

Both architectures use only layers relprop supports (Conv2d, BatchNorm2d, ReLU,
MaxPool2d, AdaptiveAvgPool2d, Flatten, Linear, Dropout and residual additions):

* ``"shapes-vgg"``: VGG-style, widths 16-16-M-32-32-M-64-64-M, global average pool,
  classifier Linear(64, 64)-ReLU-Dropout-Linear(64, 10);
* ``"shapes-resnet"``: ResNet-style, stem conv-BN-ReLU (16) and 2x2 max pool, three
  stages of one BasicBlock each (16, 32 /2, 64 /2; 1x1 conv + BN downsample shortcuts),
  global average pool, Linear(64, 10).

The weights were trained by ``scripts/train_builtin.py`` (see ``weights/README.md``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .shapes import CLASSES

MODELS = ("shapes-vgg", "shapes-resnet")
INPUT_SIZE = 64


def small_vgg(width: int = 16, classes: int = len(CLASSES), batchnorm: bool = True) -> nn.Sequential:
    """A small VGG: (conv-[BN]-ReLU-conv-[BN]-ReLU-maxpool) x 3 with widths ``width``,
    ``2 width``, ``4 width``; global average pool; Linear-ReLU-Dropout-Linear head."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (width, 2 * width, 4 * width):
        for _ in range(2):
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
            cin = cout
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Sequential(nn.Linear(cin, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, classes)),
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, ``out += identity`` (1x1 conv + BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu2(out)


class ShapesResNet(nn.Module):
    """Stem conv3x3-BN-ReLU-maxpool, one :class:`BasicBlock` per width (stride 2 from the
    second on), global average pool, Linear."""

    def __init__(self, classes: int = len(CLASSES), widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(2))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


_BUILDERS = {"shapes-vgg": small_vgg, "shapes-resnet": ShapesResNet}
assert tuple(_BUILDERS) == MODELS


def build(name: str) -> nn.Module:
    """A freshly initialised (untrained) model ``name`` (one of :data:`MODELS`)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return _BUILDERS[name]()


def load(name: str, device="cpu") -> nn.Module:
    """Model ``name`` with its shipped trained weights, on ``device``, in eval mode."""
    model = build(name)
    # package data next to this module (``os`` rather than importlib.resources: the benchmark
    # package keeps to a short list of imports, see tests/test_benchmark_data.py)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", f"{name}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the weights of {name!r} are missing ({path}); train them with "
                                f"scripts/train_builtin.py or reinstall relprop with its package data")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()
