"""Float32 and half-precision maps against float64 on the built-in models (README, Numerics).

    python scripts/numerics_study.py                          # every built-in model, 200 images
    python scripts/numerics_study.py --models shapes-vgg --half

For each model and method, on the first ``--images`` items of the benchmark's test split
(``ShapesDataset(n, seed=0, split="test")``, each explained for the float64 model's predicted
class, in batches of ``--batch``): the relative L2 error of the float32 map against the float64
map of the same model (median, maximum, the count above 1e-3 and how many of those the
explainer does not report) and the count of float32 maps the explainer reports
(``Attribution.error`` above ``trusted_error(float32)``).  With ``--half`` also the float16
and bfloat16 models (forward in half, relevance in float32): median and 90th percentile of
the error against float64, the count above the dtype's bound (``trusted_error``: 0.029 /
0.23), how many of those are unreported, and the count reported.  Prints markdown tables;
nothing is written.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch

import relprop
from relprop.benchmark import models, shapes
from relprop.explainer import trusted_error

HALF = (torch.float16, torch.bfloat16)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1)


def maps(model, method: str, x: torch.Tensor, target: torch.Tensor, batch: int):
    """The relevance (float64 for comparison) and error estimates of ``method`` on ``x``."""
    explainer = relprop.Explainer(model, method)
    rel, err = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # counted below instead
        for s in range(0, len(x), batch):
            att = explainer.attribute(x[s:s + batch], target[s:s + batch])
            rel.append(att.relevance.detach().double())
            err.append(att.error.detach().double())
    return torch.cat(rel), torch.cat(err)


def study(name: str, methods, n: int, batch: int, half: bool):
    data = shapes.ShapesDataset(n, size=models.INPUT_SIZE, seed=0, split="test")
    x = shapes.normalise(torch.stack([data[i]["image"] for i in range(len(data))]))
    model = models.load(name)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        target = model64(x.double()).argmax(1)
    rows = []
    for method in methods:
        r64, _ = maps(model64, method, x.double(), target, batch)
        r32, e32 = maps(model, method, x, target, batch)
        err = rel_l2(r32, r64)
        reported = e32 > trusted_error(torch.float32)
        row = {"method": method, "median": err.median().item(), "max": err.max().item(),
               "above": int((err > 1e-3).sum()), "reported": int(reported.sum()),
               "above_unreported": int(((err > 1e-3) & ~reported).sum())}
        if half:
            for dtype in HALF:
                rh, eh_est = maps(copy.deepcopy(model).to(dtype), method, x.to(dtype), target, batch)
                eh = rel_l2(rh, r64)
                bound = trusted_error(dtype)
                row[str(dtype)] = (eh.median().item(), eh.quantile(0.9).item(),
                                   int((eh > bound).sum()), int(((eh > bound) & ~(eh_est > bound)).sum()),
                                   int((eh_est > bound).sum()))
        rows.append(row)
        print(f"  {name} {method}: median {row['median']:.1e}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(models.MODELS), choices=models.MODELS)
    p.add_argument("--methods", nargs="+", default=sorted(relprop.available_methods()))
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--half", action="store_true", help="also float16 and bfloat16 models")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        rows = study(name, args.methods, args.images, args.batch, args.half)
        print(f"\n**{name}**, float32 against float64 ({args.images} test images, predicted class)\n")
        head = "| method | median | max | maps > 1e-3 | of them unreported | maps reported |"
        if args.half:
            head += "".join(f" {str(d).removeprefix('torch.')} median / p90 | above {trusted_error(d):.2g} / "
                            "unreported / reported |" for d in HALF)
        print(head)
        print("|---|" + "---:|" * (head.count("|") - 2))
        for r in rows:
            line = (f"| {r['method']} | {r['median']:.1e} | {r['max']:.1e} | {r['above']} | {r['above_unreported']} "
                    f"| {r['reported']} |")
            if args.half:
                line += "".join(f" {r[str(d)][0]:.1e} / {r[str(d)][1]:.1e} | {r[str(d)][2]} / {r[str(d)][3]} / "
                                f"{r[str(d)][4]} |" for d in HALF)
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
