"""Why RAP fails on ``shapes-resnet``: RAP variants scored like ``relprop evaluate`` does.

    python scripts/rap_resnet_study.py                    # 200 test images, prints a markdown table
    python scripts/rap_resnet_study.py --train-bottleneck # first train the Bottleneck ResNet (~20 min, 2 cores)

Each variant changes one thing of RAP (methods.md §2) on the built-in ``shapes-resnet``:

* ``no-head``: no first propagation at the output Linear (the hidden rule there, seed ``z_t``);
* the residual Add split (``add=``): ``signed`` (today's ``R_k = x_k R / (x0 + x1)``),
  ``abs`` (``|x_k| R / (|x0| + |x1|)``, the ratio of LRP-for-ResNet's Relevance Splitting,
  arXiv 2407.09115, which their "flows_skip" variant applies at every add), ``resnet-latest``
  (their repository default: that ratio at projection shortcuts, everything down the residual
  branch at identity shortcuts), ``equal`` (``R / 2`` each, their "simple" variant);
* ``bn-folded``: BatchNorm folded into the conv before it instead of RAP's identity;
* ``float64``: the model and the inputs in float64.

Scores: the pointing game (TorchRay protocol, per-class mean) with its 95% bootstrap interval
over images, the median outside/inside ratio, relevance mass, IoU and AP, as in
:func:`relprop.evaluate._scores` (region perturbation and the randomisation test are left
out to keep the run short).  The Bottleneck ResNet (``--train-bottleneck``) is the
authors' only ResNet path; it is trained exactly like the built-in models by
``scripts/train_builtin.py`` (same data, steps, optimiser, seed) and stored under ``build/``.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from relprop import graph as g  # noqa: E402
from relprop import rules  # noqa: E402
from relprop.engine import RuleTable  # noqa: E402
from relprop.explainer import Explainer  # noqa: E402
from relprop.methods import METHODS, Method, rap  # noqa: E402
from relprop.ops import safe_divide  # noqa: E402

BOTTLENECK = ROOT / "build" / "rap_study" / "shapes-bottleneck.pt"


# ----------------------------------------------------------------------- Bottleneck model
class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, ``out += identity`` (1x1 conv + BN
    when the shape changes), ReLU; expansion 2 so the stage widths match shapes-resnet."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(mid), nn.ReLU()
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu3 = nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))))
        out += identity
        return self.relu3(out)


class ShapesBottleneckResNet(nn.Module):
    """shapes-resnet with :class:`Bottleneck` blocks (stem, widths 16, 32 /2, 64 /2, GAP, Linear)."""

    def __init__(self, classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(), nn.MaxPool2d(2))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Bottleneck(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool, self.flatten, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def train_bottleneck(threads: int) -> None:
    """Train :class:`ShapesBottleneckResNet` with train_builtin.py's data, schedule and seed."""
    import train_builtin as tb
    from relprop.benchmark import ShapesDataset, models

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    recipe = tb.RECIPES["shapes-resnet"]           # 2500 steps, Adam lr 3e-3, single-object + hard mix
    n_train, batch, seed = 24000, 64, 0                              # train_builtin.py's defaults
    (train_x, train_y), (val_x, val_y) = tb.training_data(n_train, recipe.n_hard, seed)
    test_x, test_y = tb.render(ShapesDataset(1000, size=models.INPUT_SIZE, seed=seed, split="test"))
    print(f"rendered in {time.time() - t0:.0f} s", flush=True)
    torch.manual_seed(seed)
    model = ShapesBottleneckResNet()
    tb.train(model, train_x, train_y, recipe, batch, seed, monitor=(val_x, val_y))
    acc = tb.accuracy(model, test_x, test_y)
    BOTTLENECK.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "test_accuracy": acc}, BOTTLENECK)
    print(f"shapes-bottleneck: test accuracy {acc:.4f}, {time.time() - t0:.0f} s -> {BOTTLENECK}", flush=True)


def load_bottleneck() -> tuple[nn.Module, float] | None:
    if not BOTTLENECK.is_file():
        return None
    saved = torch.load(BOTTLENECK, map_location="cpu", weights_only=True)
    model = ShapesBottleneckResNet()
    model.load_state_dict(saved["state"])
    return model.eval(), saved["test_accuracy"]


if __name__ == "__main__" and "--train-bottleneck-only" in sys.argv:
    train_bottleneck(int(sys.argv[sys.argv.index("--train-bottleneck-only") + 1]))
    sys.exit(0)


# ----------------------------------------------------------------------- RAP variants
def identity_shortcuts(graph: g.Graph) -> dict[int, int]:
    """ADD node index -> position of its identity-shortcut input: the input whose value is
    also read elsewhere (a block's input feeds both its first conv and the add)."""
    out = {}
    for n in graph.nodes:
        if n.kind == g.ADD and len(n.parents) == 2:
            fan = [len(graph.consumers[p]) > 1 for p in n.parents]
            if fan.count(True) == 1:
                out[n.index] = fan.index(True)
    return out


def resnet_latest_add(skips: dict[int, int]):
    """LRP-for-ResNet's repository default ("latest"): the |x| ratio at projection shortcuts,
    all relevance down the residual branch at identity shortcuts."""
    abs_rule = rules.abs_add()

    def rule(layer, r):
        k = skips.get(layer.node.index)
        if k is None:
            return abs_rule(layer, r)
        out = [r, r]
        out[k] = torch.zeros_like(r)
        return out
    return rule


def recording_add(log: dict):
    """The signed split (today's rule), recording per add: the share of relevance-carrying
    entries whose two inputs have opposite signs, and ``sum(|R0| + |R1|) / sum|R|`` (1 when
    the split keeps signs; large when nearly cancelling branches get large opposite shares)."""
    signed = rules.proportional_add()

    def rule(layer, r):
        r0, r1 = signed(layer, r)
        x0, x1 = layer.xs
        live = r != 0
        opposite = ((x0 * x1 < 0) & live).flatten(1).sum(1) / live.flatten(1).sum(1).clamp(min=1)
        mass = (r0.abs() + r1.abs()).flatten(1)
        amp = mass.sum(1) / r.abs().flatten(1).sum(1)
        k = ((x0.abs() + x1.abs()) / (x0 + x1).abs()).flatten(1)     # per-entry inflation
        hot = (mass * (k > 10)).sum(1) / mass.sum(1)
        log.setdefault(layer.node.name, []).append((opposite, amp, hot))
        return [r0, r1]
    return rule


def abs_at(names: set):
    """``abs`` at the adds named ``names``, the signed split at the others."""
    signed, absolute = rules.proportional_add(), rules.abs_add()
    return lambda layer, r: (absolute if layer.node.name in names else signed)(layer, r)


ADD_LOG: dict = {}
ADDS = {"signed": lambda ctx: rules.proportional_add(), "record": lambda ctx: recording_add(ADD_LOG),
        "abs": lambda ctx: rules.abs_add(),
        "equal": lambda ctx: rules.equal_add,
        "resnet-latest": lambda ctx: resnet_latest_add(identity_shortcuts(ctx.graph)),
        **{f"abs@{n}": (lambda ctx, n=n: abs_at({n})) for n in ("add", "add_1", "add_2")}}


def variant(name: str, head: bool = True, add: str = "signed", fold_bn: bool = False) -> str:
    """Register a RAP variant as method ``name`` (its tables are built per call: the
    ``resnet-latest`` add reads the graph)."""
    def table(ctx, with_head):
        bn = rules.passthrough if fold_bn else rules.batchnorm_authors
        by_kind = rules.shared_layers(pool=rules.proportional_pool(), add=ADDS[add](ctx), bn=bn)
        by_kind.update({g.CONV: rap.hidden, g.LINEAR: rap.hidden})
        return RuleTable(by_kind, first=rules.zbox("image", safe_divide),
                         head=rap.first_propagation if with_head else None, fold_bn=fold_bn, name=name)

    class Variant(Method):
        def run(self, ctx):
            h = ctx.head()
            if head and h is not None and h.kind == g.LINEAR:
                return ctx.propagate(table(ctx, True), ctx.seed)
            return ctx.propagate(table(ctx, False), ctx.logits * ctx.seed)

    Variant.name = name
    METHODS[name] = Variant
    return name


VARIANTS = [
    # (row label, method, float64)
    ("rap (signed add, head, BN identity)", "rap", False),
    ("rap, float64", "rap", True),
    ("(a) no head rule", variant("study-nohead", head=False), False),
    ("(b) add: abs (Relevance Splitting ratio)", variant("study-abs", add="abs"), False),
    ("(b) add: LRP-for-ResNet default", variant("study-latest", add="resnet-latest"), False),
    ("(b) add: equal", variant("study-equal", add="equal"), False),
    ("(b) abs at block 1's add only (identity shortcut)", variant("study-abs-add", add="abs@add"), False),
    ("(b) abs at block 2's add only (projection)", variant("study-abs-add1", add="abs@add_1"), False),
    ("(b) abs at block 3's add only (projection)", variant("study-abs-add2", add="abs@add_2"), False),
    ("(c) BN folded into conv", variant("study-bnfold", fold_bn=True), False),
    ("(a)+(b) no head, add abs", variant("study-nohead-abs", head=False, add="abs"), False),
    ("(b)+(c) add abs, BN folded", variant("study-abs-bnfold", add="abs", fold_bn=True), False),
]
DIAGNOSE = variant("study-record", add="record")
class WithAdd(Method):
    """A registered method with ``add_rule="abs"`` (the library option), as a study row."""


def with_abs(name: str) -> str:
    """Register method ``name`` with ``add_rule="abs"`` as ``study-<name>-abs``."""
    from relprop.methods import create

    class Abs(WithAdd):
        accepts_initial_relevance = False

        def __init__(self):
            self.inner = create(name, add_rule="abs")

        def run(self, ctx):
            return self.inner.run(ctx)

    Abs.name = f"study-{name}-abs"
    METHODS[Abs.name] = Abs
    return Abs.name


OTHERS = [("clrp (signed add)", "clrp", False), ("clrp, add_rule='abs'", with_abs("clrp"), False),
          ("sglrp (signed add)", "sglrp", False), ("sglrp, add_rule='abs'", with_abs("sglrp"), False)]
BASELINES = [("gradient", "gradient", False), ("gradient-x-input", "gradient-x-input", False),
             ("lrp-epsilon-plus-flat", "lrp-epsilon-plus-flat", False)]


# ----------------------------------------------------------------------- scoring
def data(images: int, seed: int = 0) -> dict:
    from relprop.benchmark import ShapesDataset, models, normalise
    from relprop.metrics import boxes_to_masks

    b = ShapesDataset(images, size=models.INPUT_SIZE, seed=seed, split="test").make_batch(range(images))
    s = b["images"].shape[-1]
    return {"x": normalise(b["images"]), "target": b["labels"], "mask": b["masks"],
            "box": boxes_to_masks([bx[0] for bx in b["boxes"]], s, s)}


def heatmaps(model, method: str, items: dict, float64: bool, batch: int = 50) -> torch.Tensor:
    if float64:
        model = __import__("copy").deepcopy(model).double()
    ex = Explainer(model, method)
    x = items["x"].double() if float64 else items["x"]
    return torch.cat([ex.heatmap(x[s:s + batch], items["target"][s:s + batch]).float()
                      for s in range(0, len(x), batch)])


def score(heat: torch.Tensor, items: dict, ref_hits: torch.Tensor | None, resamples: int) -> dict:
    from relprop.metrics import (bootstrap as B, outside_inside_ratio, pointing_game, pointing_game_accuracy,
                                 relevance_mass_accuracy, segmentation_scores)
    size = heat.shape[-1]
    hits = pointing_game(heat, items["box"], tolerance=15 * size / 224)
    classes, n = items["target"], heat.shape[0]
    pg = B.class_mean_statistic(hits, classes, 10)
    row = {"hits": hits, "pg": pointing_game_accuracy(hits, classes, 10)["mean"],
           "pg_ci": B.bootstrap_interval(pg, n, resamples, 0.95, 0)}
    if ref_hits is not None:       # paired: the same resampled images for both maps
        ref = B.class_mean_statistic(ref_hits, classes, 10)
        row["diff_ci"] = B.bootstrap_interval(lambda idx: pg(idx) - ref(idx), n, resamples, 0.95, 0)
    seg = segmentation_scores(heat, items["mask"])
    row.update(oi=outside_inside_ratio(heat, items["box"]).double().nanmedian().item(),
               mass=relevance_mass_accuracy(heat, items["mask"]).double().nanmean().item(),
               iou=seg["iou"].double().nanmean().item(), ap=seg["average_precision"].double().nanmean().item())
    return row


def table_rows(model_name: str, model, items: dict, variants, resamples: int) -> list[str]:
    lines, ref = [], None
    for label, method, f64 in variants:
        t = time.time()
        row = score(heatmaps(model, method, items, f64), items, ref, resamples)
        if ref is None:
            ref = row["hits"]
        d = row.get("diff_ci")
        diff = "—" if d is None else f"[{d[0]:+.3f}, {d[1]:+.3f}]"
        lines.append(f"| {model_name} | {label} | {row['pg']:.3f} [{row['pg_ci'][0]:.3f}, {row['pg_ci'][1]:.3f}] "
                     f"| {diff} | {row['oi']:.3f} | {row['mass']:.3f} | {row['iou']:.3f} | {row['ap']:.3f} "
                     f"| {time.time() - t:.1f} |")
        print(lines[-1], flush=True)
    return lines


def diagnose(model_name: str, model, items: dict) -> None:
    """Per residual add of RAP's pass: how often the inputs have opposite signs where relevance
    arrives, and how much the signed split inflates |R| (median and 90th percentile over images)."""
    ADD_LOG.clear()
    heatmaps(model, DIAGNOSE, items, False)
    for name, parts in reversed(ADD_LOG.items()):
        opp, amp, hot = (torch.cat([p[i] for p in parts]).double() for i in range(3))
        print(f"| {model_name} | {name} | {opp.median():.2f} | {amp.median():.1f} | {amp.quantile(0.9):.1f} "
              f"| {hot.median():.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="first items of ShapesDataset(split='test')")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-bottleneck", action="store_true", help="train the Bottleneck ResNet first (~20 min)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the signed-add maps are flagged as ill-conditioned (float32 vs float64); the float64 row shows it
    warnings.filterwarnings("ignore", message=".*may be off by up to.*")
    if args.train_bottleneck:
        train_bottleneck(args.threads)
    from relprop.benchmark import models

    items = data(args.images)
    print(f"{args.images} images of ShapesDataset(split='test'); pointing game with its 95% bootstrap interval; "
          f"'vs first' = paired 95% interval of (row - first row of its model's block, rap or the "
          f"method's signed-add row) on the same resamples\n")
    print("| model | variant | pointing game [95% CI] | vs first | outside/inside ↓ | relevance mass ↑ | IoU ↑ "
          "| AP ↑ | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    table_rows("shapes-resnet", models.load("shapes-resnet"), items, VARIANTS + BASELINES, args.resamples)
    for pair in (OTHERS[:2], OTHERS[2:]):       # the contrastive methods also split adds by signed inputs
        table_rows("shapes-resnet", models.load("shapes-resnet"), items, pair, args.resamples)
    bottleneck = load_bottleneck()
    if bottleneck is None:
        print("| shapes-bottleneck | not trained: run with --train-bottleneck | | | | | | | |")
    else:
        table_rows(f"shapes-bottleneck (acc {bottleneck[1]:.3f})", bottleneck[0], items,
                   [VARIANTS[i] for i in (0, 2, 3, 4, 5, 6, 7, 8, 9)] + BASELINES[:2], args.resamples)
    table_rows("shapes-vgg", models.load("shapes-vgg"), items,
               [VARIANTS[i] for i in (0, 2, 9)] + BASELINES[:2], args.resamples)
    print("\nRAP's signed add split, per residual add (medians over images; 'inflation' = "
          "sum(|R0| + |R1|) / sum|R|):\n")
    print("| model | add | share of entries with opposite-sign inputs | inflation (median) | inflation (90th pct) "
          "| share of the split's \\|R\\| at entries with (\\|x0\\| + \\|x1\\|) / \\|x0 + x1\\| > 10 |")
    print("|---|---|---|---|---|---|")
    diagnose("shapes-resnet", models.load("shapes-resnet"), items)
    if bottleneck is not None:
        diagnose("shapes-bottleneck", bottleneck[0], items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
