"""Train the built-in "shapes in clutter" classifiers and ship their weights.

    python scripts/train_builtin.py            # every model -> relprop/benchmark/weights/

Trains each model of :data:`relprop.benchmark.models.MODELS` by its recipe
(:data:`RECIPES`: steps, learning rate, optimiser, clipping, hard images) on
``ShapesDataset(n_train, split="train", seed)`` (one object per image, its class as label)
mixed, where the recipe says so (or ``--n-hard N``), with
``ShapesDataset(N, split="train", seed, hard=True)`` (3-4 smaller objects of distinct
classes: the label spreads evenly over the classes present, since nothing marks one of them
as the target), rendered once with ``make_batch``; every step applies a random
dihedral transform per image -- a rotation by a multiple of 90 degrees, optionally mirrored,
which keeps every class -- with linear warm-up and cosine decay of the learning rate (the
accuracy on 500 further single-object training items is printed every 250 steps).  Then it
measures the accuracy on ``ShapesDataset(1000, split="test", seed)`` and, on the hard test
images ``ShapesDataset(1000, split="test", seed, hard=True)``, three accuracies
(:func:`hard_accuracy`), saves the float32 state dicts to ``weights/<name>.pt`` and writes
``weights/README.md``.  Deterministic for a given seed and thread count.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from relprop.benchmark import ShapesDataset, normalise
from relprop.benchmark import models
from relprop.benchmark.shapes import CLASSES

WEIGHTS = Path(__file__).resolve().parent.parent / "relprop" / "benchmark" / "weights"


def render(data: ShapesDataset, chunk: int = 500, present: bool = False):
    """Normalised images and labels of ``data``: the target classes (N,), or with ``present``
    the (N, classes) distribution spread evenly over the classes each image holds."""
    images, labels = [], []
    for s in range(0, len(data), chunk):
        b = data.make_batch(range(s, min(s + chunk, len(data))))
        images.append(normalise(b["images"]))
        if present:
            dist = torch.zeros(len(b["images"]), len(CLASSES))
            for row, objects in zip(dist, b["object_labels"]):
                row[objects] = 1.0 / len(objects)
            labels.append(dist)
        else:
            labels.append(b["labels"])
    return torch.cat(images), torch.cat(labels)


def training_data(n_train: int, n_hard: int, seed: int, size: int = models.INPUT_SIZE):
    """The training mix: ``n_train`` single-object images (one-hot labels) and ``n_hard`` hard
    images (labels spread over the classes present), as (images, (N, classes) labels), and
    500 further single-object items (images, class indices) for monitoring."""
    single_x, single_y = render(ShapesDataset(n_train + 500, size=size, seed=seed, split="train"))
    (single_x, val_x), (single_y, val_y) = single_x.split([n_train, 500]), single_y.split([n_train, 500])
    if not n_hard:   # class indices, as the shipped weights were trained (bit for bit)
        return (single_x, single_y), (val_x, val_y)
    hard_x, hard_y = render(ShapesDataset(n_hard, size=size, seed=seed, split="train", hard=True), present=True)
    labels = torch.cat([F.one_hot(single_y, len(CLASSES)).float(), hard_y])
    return (torch.cat([single_x, hard_x]), labels), (val_x, val_y)


@torch.no_grad()
def hard_accuracy(model, data: ShapesDataset, chunk: int = 250) -> dict:
    """On hard images: ``target`` -- top-1 is the target's class (object 0; at most about 1/3,
    since nothing marks which object is the target); ``present`` -- top-1 is one of the
    image's objects; ``recall`` -- the share of the image's n classes among its top n."""
    model.eval()
    target = present = recall = 0.0
    for s in range(0, len(data), chunk):
        b = data.make_batch(range(s, min(s + chunk, len(data))))
        logits = model(normalise(b["images"]))
        top1 = logits.argmax(1)
        target += (top1 == b["labels"]).sum().item()
        for row, t, objects in zip(logits, top1, b["object_labels"]):
            present += float(t.item() in objects.tolist())
            top = set(row.topk(len(objects)).indices.tolist())
            recall += len(top & set(objects.tolist())) / len(objects)
    return {"target": target / len(data), "present": present / len(data), "recall": recall / len(data)}


@torch.no_grad()
def accuracy(model, images, labels, chunk: int = 250) -> float:
    model.eval()
    correct = sum((model(images[s:s + chunk]).argmax(1) == labels[s:s + chunk]).sum().item()
                  for s in range(0, len(images), chunk))
    return correct / len(images)


def dihedral(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W), H == W, rotated by k * 90 degrees (k uniform in 0..3)
    and mirrored left-right with probability 1/2."""
    k = torch.randint(4, (len(x),), generator=g)
    mirror = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
    out = x.clone()
    for turns in range(1, 4):
        sel = k == turns
        out[sel] = x[sel].rot90(turns, dims=(2, 3))
    return out


@dataclass(frozen=True)
class Recipe:
    """How one built-in model is trained: optimiser steps, peak learning rate, ``"adam"``
    (L2 penalty ``weight_decay`` on every parameter) or ``"adamw"`` (decoupled weight decay on
    the weight matrices and kernels only, not on biases, norms, the class token and the
    position embedding), gradient-norm clipping (None: none) and hard training images."""
    steps: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 1e-4
    clip: float | None = None
    n_hard: int = 0


# Every model is trained on the single-object + hard mix.  The BatchNorm CNNs learn it in 2500
# steps of Adam; the LayerNorm / attention models (no BatchNorm outside the ViT's stem) need
# 10000, with AdamW and clipping.
RECIPES = {
    "shapes-vgg": Recipe(2500, 3e-3, n_hard=12000),
    "shapes-resnet": Recipe(2500, 3e-3, n_hard=12000),
    "shapes-convnext": Recipe(10000, 2e-3, "adamw", 0.05, 1.0, n_hard=12000),
    "shapes-vit": Recipe(10000, 1e-3, "adamw", 0.05, 1.0, n_hard=12000),
}
assert tuple(RECIPES) == models.MODELS


def optimiser(model, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    decay, rest = [], []
    for name, p in model.named_parameters():
        (rest if p.ndim <= 1 or name in ("cls", "pos") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=recipe.lr)


def train(model, images, labels, recipe: Recipe, batch: int, seed: int, monitor=None) -> float:
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = optimiser(model, recipe)
    steps = recipe.steps
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        x = dihedral(images[idx], g)
        loss = F.cross_entropy(model(x), labels[idx])   # class indices or (batch, classes) distributions
        opt.zero_grad()
        loss.backward()
        if recipe.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            extra = f", held-out accuracy {accuracy(model, *monitor):.3f}" if monitor else ""
            model.train()
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f}{extra}", flush=True)
    model.eval()
    return loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(models.MODELS), choices=models.MODELS)
    p.add_argument("--n-train", type=int, default=24000, help="single-object training images")
    p.add_argument("--n-hard", type=int, default=None,
                   help="hard training images (several objects) mixed in (default: the model's recipe, RECIPES)")
    p.add_argument("--n-test", type=int, default=1000, help="test images (and as many hard test images)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per model (default: the model's recipe)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=WEIGHTS, help="output folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    overrides = {k: getattr(args, k) for k in ("steps", "lr", "n_hard") if getattr(args, k) is not None}
    recipes = {name: replace(RECIPES[name], **overrides) for name in args.models}

    t0 = time.time()
    # the single-object training split's items n_train .. n_train + 500 are a validation set, printed during training
    data = {n_hard: training_data(args.n_train, n_hard, args.seed) for n_hard in {r.n_hard for r in recipes.values()}}
    test_x, test_y = render(ShapesDataset(args.n_test, size=models.INPUT_SIZE, seed=args.seed, split="test"))
    hard_test = ShapesDataset(args.n_test, size=models.INPUT_SIZE, seed=args.seed, split="test", hard=True)
    render_s = time.time() - t0
    print(f"rendered {args.n_train} + {sorted(data)} hard train + {args.n_test} test images in {render_s:.1f} s",
          flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        recipe = recipes[name]
        (train_x, train_y), (val_x, val_y) = data[recipe.n_hard]
        torch.manual_seed(args.seed)
        model = models.build(name)
        print(f"{name}: training {recipe}", flush=True)
        t = time.time()
        loss = train(model, train_x, train_y, recipe, args.batch, args.seed, monitor=(val_x, val_y))
        wall = time.time() - t
        acc = accuracy(model, test_x, test_y)
        hard = hard_accuracy(model, hard_test)
        state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        path = args.out / f"{name}.pt"
        torch.save(state, path)
        size_kb = path.stat().st_size / 1024
        print(f"{name}: test accuracy {acc:.4f}, hard {hard}, final loss {loss:.3f}, {wall:.1f} s, "
              f"{size_kb:.0f} KiB", flush=True)
        rows.append((name, recipe, acc, hard, wall, size_kb))

    command = "python scripts/train_builtin.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Built-in shapes classifiers",
        "",
        "Trained by `scripts/train_builtin.py`; loaded with `relprop.benchmark.models.load(name)`.",
        "Inputs: 64 x 64 images normalised with `relprop.benchmark.normalise`.",
        "",
        f"- command: `{command.strip()}`",
        f"- seed: {args.seed}; training images: {args.n_train} single-object (`ShapesDataset(split=\"train\")`, "
        f"0-3 distractors, one-hot labels) and the recipe's hard ones (`ShapesDataset(split=\"train\", hard=True)`, "
        f"3-4 objects, labels spread evenly over the classes present); batch: {args.batch}; warm-up + cosine "
        f"learning rate, random rotations by multiples of 90 degrees and mirroring; recipes: `RECIPES` in the script",
        f"- test sets: `ShapesDataset({args.n_test}, seed={args.seed}, split=\"test\")` (test accuracy) and "
        f"`ShapesDataset({args.n_test}, seed={args.seed}, split=\"test\", hard=True)`: hard target = top-1 is the "
        f"target's class (object 0; nothing marks it, so about 1/3 at best), hard present = top-1 is one of the "
        f"image's objects, hard recall = share of the image's n classes among its top n",
        f"- torch {torch.__version__}, {args.threads} CPU threads; rendering took {render_s:.1f} s",
        "",
        "| model | test accuracy | hard target | hard present | hard recall | hard training images | steps | "
        "optimiser | training wall time (s) | file size (KiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {a:.4f} | {h['target']:.4f} | {h['present']:.4f} | {h['recall']:.4f} | {r.n_hard} | "
              f"{r.steps} | {r.optimizer} lr {r.lr} | {w:.1f} | {s:.0f} |" for n, r, a, h, w, s in rows]
    if set(args.models) == set(models.MODELS):
        (args.out / "README.md").write_text("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
