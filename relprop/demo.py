"""A self-contained demo: train a small CNN on synthetic shapes, explain it with every method.

No download is needed.  :func:`make_shapes` draws RGB images of one coloured shape
(square, disc, triangle or cross; random position, size and colour) on a noisy,
textured background, with the shape's mask; :func:`make_model` is a small VGG-style
CNN; :func:`run` trains it for 200 steps on 1024 such images on CPU (under a minute),
measures held-out accuracy, explains a few held-out images with each method (one
batched call per method) and writes ``heatmaps.png`` and ``summary.json``.

The masks give a cheap sanity number per method, ``mask_share``: the fraction of the
*positive* relevance that falls on the shape (the background carries no class
information, so a good explanation puts most of it on the shape; compare with
``mask_area``, the share a uniform map would get).

    >>> from relprop import demo
    >>> summary = demo.run("relprop-demo", methods=["rap", "lrp-epsilon"], images=4)
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import viz
from .benchmark.models import small_vgg
from .explainer import Explainer, available_methods

CLASSES = ("square", "disc", "triangle", "cross")
SIZE = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
DEFAULT_STEPS = 200
BATCH = 32
LR = 3e-3
TRAIN_IMAGES = 1024
TEST_IMAGES = 256


# --------------------------------------------------------------------------- data
def make_shapes(n: int, generator: torch.Generator, size: int = SIZE, labels: torch.Tensor | None = None):
    """``n`` images of random shapes: (images (n, 3, size, size) in [0, 1], labels (n,), masks (n, size, size) bool).

    Deterministic given the generator state.  ``labels`` fixes the classes (default:
    uniformly random).
    """
    g = generator
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    if labels is None:
        labels = torch.randint(len(CLASSES), (n,), generator=g)
    labels = torch.as_tensor(labels).long()

    # shape geometry: half-size s, centre kept inside the image
    s = size * (0.14 + 0.14 * rand(n))                                  # 9 .. 18 px at 64
    cx = s + 2 + (size - 2 * s - 4) * rand(n)
    cy = s + 2 + (size - 2 * s - 4) * rand(n)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
    s3 = s.view(-1, 1, 1)
    square = (dx.abs() <= 0.85 * s3) & (dy.abs() <= 0.85 * s3)
    disc = dx ** 2 + dy ** 2 <= s3 ** 2
    triangle = (dy <= 0.8 * s3) & (dx.abs() <= (dy + s3) * 0.6)         # apex up
    bar = 0.3 * s3
    cross = ((dx.abs() <= bar) & (dy.abs() <= s3)) | ((dy.abs() <= bar) & (dx.abs() <= s3))
    masks = torch.stack([square, disc, triangle, cross], 1)[torch.arange(n), labels]

    # background: a random colour, a low-frequency texture and pixel noise
    bg = 0.25 + 0.5 * rand(n, 3, 1, 1)
    texture = F.interpolate(rand(n, 1, 8, 8) - 0.5, size=(size, size), mode="bilinear", align_corners=False)
    background = bg + 0.25 * texture + 0.05 * torch.randn(n, 3, size, size, generator=g)
    # foreground: the background colour pushed away by 0.3 .. 0.6 per channel
    sign = torch.where(rand(n, 3, 1, 1) < 0.5, -1.0, 1.0)
    fg = bg + sign * (0.3 + 0.3 * rand(n, 3, 1, 1))
    fg = torch.where((fg < 0) | (fg > 1), bg - (fg - bg), fg)          # reflect back into [0, 1]
    foreground = fg + 0.05 * torch.randn(n, 3, size, size, generator=g)
    images = torch.where(masks.unsqueeze(1), foreground, background).clamp(0, 1)
    return images, labels, masks


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


# --------------------------------------------------------------------------- model
def make_model(width: int = 8, classes: int = len(CLASSES), batchnorm: bool = True) -> nn.Sequential:
    """The demo's small VGG (:func:`relprop.benchmark.models.small_vgg`, narrower, 4 classes)."""
    return small_vgg(width, classes, batchnorm)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, generator: torch.Generator,
          batch: int = BATCH, progress: bool = True) -> float:
    """Adam on random mini-batches of (normalised) ``images``; returns the last loss.

    The learning rate warms up linearly over the first 10% of the steps, then decays
    along a cosine to zero.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress or None, leave=False)
    for _ in bar:
        idx = torch.randint(len(images), (batch,), generator=generator)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    model.eval()
    return loss_value


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model(normalise(b)).argmax(1) for b in images.split(128)])
    return (preds == labels).float().mean().item()


# --------------------------------------------------------------------------- demo
def check_methods(methods: Sequence[str] | None) -> list[str]:
    """The method list to run (None/"all": every method); ValueError naming unknown ones."""
    valid = list(available_methods())
    if methods is None or list(methods) == ["all"]:
        return valid
    names = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    unknown = [m for m in names if m not in valid]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; valid methods: all, {', '.join(valid)}")
    if not names:
        raise ValueError("no method given")
    return names


def run(out_dir="relprop-demo", methods: Sequence[str] | None = None, images: int = 6, seed: int = 0,
        steps: int = DEFAULT_STEPS, train_images: int | None = None, test_images: int | None = None,
        progress: bool = True) -> dict:
    """Train, evaluate, explain ``images`` held-out images with each method, write the grid.

    Writes ``out_dir/heatmaps.png`` and ``out_dir/summary.json``; returns the summary.
    ``train_images``/``test_images`` default to :data:`TRAIN_IMAGES`/:data:`TEST_IMAGES`.
    Each method explains the model's predicted class.  A method that raises is
    recorded under ``"failed"`` (its column is left out) instead of stopping the demo.
    """
    methods = check_methods(methods)
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.perf_counter()

    train_images = TRAIN_IMAGES if train_images is None else train_images
    n_test = max(TEST_IMAGES if test_images is None else test_images, images)
    test_x, test_y, test_m = make_shapes(n_test, torch.Generator().manual_seed(seed + 1),
                                         labels=torch.arange(n_test) % len(CLASSES))   # every class in turn
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y, _ = make_shapes(train_images, gen)
    model = make_model()
    t0 = time.perf_counter()
    loss = train(model, normalise(train_x), train_y, steps, gen, progress=progress)
    train_s = time.perf_counter() - t0
    acc = accuracy(model, test_x, test_y)

    x, masks = normalise(test_x[:images]), test_m[:images]
    with torch.no_grad():
        probs = model(x).softmax(1)
    conf, pred = probs.max(1)
    mask_area = masks.float().mean().item()

    maps, seconds, shares, failed = {}, {}, {}, {}
    for name in tqdm(methods, desc="explaining", unit="method", disable=not progress or None, leave=False):
        t0 = time.perf_counter()
        try:
            relevance = Explainer(model, name)(x)            # one batched call, predicted classes
        except Exception as e:                                # keep the other methods' results
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        seconds[name] = time.perf_counter() - t0
        heat = relevance.sum(1)
        maps[name] = heat
        pos = heat.clamp(min=0)
        shares[name] = ((pos * masks).sum((1, 2)) / pos.sum((1, 2)).clamp(min=1e-12)).mean().item()

    png = os.path.join(out_dir, "heatmaps.png")
    rows = [viz.image_to_rgb(xi, MEAN, STD) for xi in x]
    row_titles = [f"{CLASSES[t]} -> {CLASSES[p]} {c:.0%}" for t, p, c in zip(test_y[:images].tolist(),
                                                                         pred.tolist(), conf.tolist())]
    viz.save_grid(png, rows, [list(maps[m]) for m in maps], ["input (true -> predicted)"] + list(maps),
                  row_titles=row_titles, scale=2,
                  caption=f"held-out accuracy {acc:.1%}; explaining the predicted class; "
                          "red = positive relevance, blue = negative, white = 0 (each map scaled by its max |R|)")

    summary = {
        "accuracy": acc, "chance": 1 / len(CLASSES), "test_images": len(test_y), "classes": list(CLASSES),
        "seed": seed, "train_images": train_images, "steps": steps, "batch": BATCH, "final_loss": loss,
        "train_seconds": train_s,
        "method_seconds": seconds, "mask_share": shares, "mask_area": mask_area, "failed": failed,
        "explained": [{"true": CLASSES[t], "predicted": CLASSES[p], "confidence": c}
                      for t, p, c in zip(test_y[:images].tolist(), pred.tolist(), conf.tolist())],
        "total_seconds": time.perf_counter() - t_start,
        "heatmaps": os.path.abspath(png), "summary": os.path.abspath(os.path.join(out_dir, "summary.json")),
    }
    viz.write_atomic(summary["summary"], (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the console."""
    lines = [f"trained {summary['steps']} steps (batch {summary['batch']}, {summary['train_images']} synthetic images) "
             f"in {summary['train_seconds']:.1f} s; "
             f"held-out accuracy {summary['accuracy']:.1%} on {summary['test_images']} images "
             f"(chance {summary['chance']:.0%})",
             f"{'method':<30} {'seconds':>8} {'mask share':>11}"]
    for name, s in summary["method_seconds"].items():
        lines.append(f"{name:<30} {s:>8.2f} {summary['mask_share'][name]:>11.2f}")
    lines.append(f"(mask share: fraction of positive relevance on the shape; a uniform map gets "
                 f"{summary['mask_area']:.2f})")
    for name, err in summary["failed"].items():
        lines.append(f"FAILED {name}: {err}")
    lines.append(f"wrote {summary['heatmaps']} and {summary['summary']} in {summary['total_seconds']:.1f} s")
    return "\n".join(lines)


__all__ = ["CLASSES", "make_shapes", "make_model", "train", "accuracy", "check_methods", "run", "format_summary"]
