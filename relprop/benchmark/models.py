"""Small built-in classifiers for the "shapes in clutter" benchmark (64 x 64 inputs).

    >>> from relprop.benchmark import models
    >>> model = models.load("shapes-vgg")           # trained weights shipped with the package
    >>> logits = model(normalise(batch["images"]))  # inputs: normalised with shapes.normalise

Two ReLU/BatchNorm CNNs (Conv2d, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d,
Flatten, Linear, Dropout and residual additions) and two of the architectures of
2020s image models (LayerNorm, GELU, layer scale, attention):

* ``"shapes-vgg"``: VGG-style, widths 16-16-M-32-32-M-64-64-M, global average pool,
  classifier Linear(64, 64)-ReLU-Dropout-Linear(64, 10);
* ``"shapes-resnet"``: ResNet-style, stem conv-BN-ReLU (16) and 2x2 max pool, three
  stages of one BasicBlock each (16, 32 /2, 64 /2; 1x1 conv + BN downsample shortcuts),
  global average pool, Linear(64, 10);
* ``"shapes-convnext"``: ConvNeXt-style (Liu et al. 2022): 4x4 patchify stem + channel
  LayerNorm, three stages of two blocks (widths 32, 64 /2, 128 /2; LayerNorm + 2x2
  stride-2 conv between stages), each block a depthwise 7x7 conv, channel LayerNorm,
  1x1 conv to 4x width, GELU, 1x1 conv back, layer scale, residual add; global average
  pool, LayerNorm, Linear(128, 10);
* ``"shapes-vit"``: a vision transformer with a convolutional stem (the "hybrid" ViT of
  Dosovitskiy et al. 2021; Xiao et al. 2021): two stride-2 conv-BN-ReLU (32, 64), a 2x2
  patch embedding to 64 tokens of width 96, class token and learnt position embedding,
  four pre-norm blocks (4-head self-attention written out as ``softmax(q k^T / sqrt(d)) v``,
  GELU MLP of width 192), final LayerNorm, Linear(96, 10) on the class token.

The weights were trained by ``scripts/train_builtin.py`` (see ``weights/README.md``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .shapes import CLASSES

MODELS = ("shapes-vgg", "shapes-resnet", "shapes-convnext", "shapes-vit")
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


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) tensor (channels-last ``nn.LayerNorm``
    between two permutes, as in torchvision's ConvNeXt)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """``x + gamma * pw2(GELU(pw1(LN(dw7x7(x)))))``, ``gamma`` a per-channel layer scale."""

    def __init__(self, dim: int, layer_scale: float = 0.1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, 4 * dim, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * dim, dim, 1)
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x):
        return x + self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class ShapesConvNeXt(nn.Module):
    """Patchify stem, stages of :class:`ConvNeXtBlock` (LayerNorm + 2x2 stride-2 conv between
    them), global average pool, LayerNorm, Linear."""

    def __init__(self, classes: int = len(CLASSES), dims=(32, 64, 128), depths=(2, 2, 2), patch: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], patch, stride=patch), LayerNorm2d(dims[0]))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            down = [] if i == 0 else [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, stride=2)]
            stages.append(nn.Sequential(*down, *[ConvNeXtBlock(d) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.norm = nn.LayerNorm(dims[-1])
        self.fc = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.fc(self.norm(self.flatten(self.pool(self.stages(self.stem(x))))))


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(d)) v`` written out (timm's unfused form)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-norm: ``x + attn(LN(x))``, then ``x + fc2(GELU(fc1(LN(x))))``."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ShapesViT(nn.Module):
    """Conv stem, 2x2 patch embedding (64 tokens at 64 x 64), class token, position
    embedding, :class:`TransformerBlock` s, LayerNorm, Linear on the class token."""

    def __init__(self, classes: int = len(CLASSES), dim: int = 96, depth: int = 4, heads: int = 4, mlp: int = 192):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.patch = nn.Conv2d(64, dim, 2, stride=2)
        tokens = (INPUT_SIZE // 8) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(self.stem(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


_BUILDERS = {"shapes-vgg": small_vgg, "shapes-resnet": ShapesResNet, "shapes-convnext": ShapesConvNeXt,
             "shapes-vit": ShapesViT}
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
