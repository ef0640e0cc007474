"""Train the built-in "shapes in clutter" classifiers and ship their weights.

    python scripts/train_builtin.py            # both models -> relprop/benchmark/weights/

Trains every model of :data:`relprop.benchmark.models.MODELS` on
``ShapesDataset(n_train, split="train", seed)`` (rendered once with ``make_batch``;
every step applies a random dihedral transform per image -- a rotation by a multiple of
90 degrees, optionally mirrored, which keeps every class), Adam with linear warm-up and
cosine decay (the accuracy on 500 further training-split items is printed every 250 steps),
then measures the accuracy on ``ShapesDataset(1000, split="test", seed)``, saves the float32
state dicts to ``weights/<name>.pt`` and writes ``weights/README.md``.  Deterministic for a
given seed and thread count.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from relprop.benchmark import ShapesDataset, normalise
from relprop.benchmark import models

WEIGHTS = Path(__file__).resolve().parent.parent / "relprop" / "benchmark" / "weights"


def render(data: ShapesDataset, chunk: int = 500):
    images, labels = [], []
    for s in range(0, len(data), chunk):
        b = data.make_batch(range(s, min(s + chunk, len(data))))
        images.append(normalise(b["images"]))
        labels.append(b["labels"])
    return torch.cat(images), torch.cat(labels)


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


def train(model, images, labels, steps: int, batch: int, lr: float, seed: int, monitor=None) -> float:
    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        x = dihedral(images[idx], g)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
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
    p.add_argument("--n-train", type=int, default=24000, help="training images")
    p.add_argument("--n-test", type=int, default=1000, help="test images")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps per model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=WEIGHTS, help="output folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    t0 = time.time()
    # the training split's items n_train .. n_train + 500 are a validation set, printed during training
    train_x, train_y = render(ShapesDataset(args.n_train + 500, size=models.INPUT_SIZE, seed=args.seed, split="train"))
    (train_x, val_x), (train_y, val_y) = train_x.split(args.n_train), train_y.split(args.n_train)
    test_x, test_y = render(ShapesDataset(args.n_test, size=models.INPUT_SIZE, seed=args.seed, split="test"))
    render_s = time.time() - t0
    print(f"rendered {args.n_train} train + {args.n_test} test images in {render_s:.1f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model = models.build(name)
        print(f"{name}: training {args.steps} steps", flush=True)
        t = time.time()
        loss = train(model, train_x, train_y, args.steps, args.batch, args.lr, args.seed,
                     monitor=(val_x, val_y))
        wall = time.time() - t
        acc = accuracy(model, test_x, test_y)
        state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        path = args.out / f"{name}.pt"
        torch.save(state, path)
        size_kb = path.stat().st_size / 1024
        print(f"{name}: test accuracy {acc:.4f}, final loss {loss:.3f}, {wall:.1f} s, {size_kb:.0f} KiB", flush=True)
        rows.append((name, acc, wall, size_kb, loss))

    command = "python scripts/train_builtin.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Built-in shapes classifiers",
        "",
        "Trained by `scripts/train_builtin.py`; loaded with `relprop.benchmark.models.load(name)`.",
        "Inputs: 64 x 64 images normalised with `relprop.benchmark.normalise`.",
        "",
        f"- command: `{command.strip()}`",
        f"- seed: {args.seed}; training images: {args.n_train} (`ShapesDataset(split=\"train\")`, single object, "
        f"0-3 distractors); steps: {args.steps}; batch: {args.batch}; Adam lr {args.lr} (warm-up + cosine), "
        f"random rotations by multiples of 90 degrees and mirroring",
        f"- test set: `ShapesDataset({args.n_test}, seed={args.seed}, split=\"test\")`",
        f"- torch {torch.__version__}, {args.threads} CPU threads; rendering took {render_s:.1f} s",
        "",
        "| model | test accuracy | training wall time (s) | file size (KiB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {a:.4f} | {w:.1f} | {s:.0f} |" for n, a, w, s, _ in rows]
    if set(args.models) == set(models.MODELS):
        (args.out / "README.md").write_text("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
