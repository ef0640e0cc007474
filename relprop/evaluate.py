"""``relprop evaluate``: attribution methods scored on a localisation benchmark, as a report.

Data: the built-in "shapes in clutter" test split (:class:`relprop.benchmark.ShapesDataset`,
64 x 64, one object per image; ``--split hard``: its hard mode, 3-4 smaller objects of
distinct classes per image, the first the target, more clutter) with the shipped models,
or user images with PASCAL VOC or COCO annotations and a user model
(:mod:`relprop.benchmark.userdata`).  An *item* is one (image, ground-truth class) pair
with that class's object mask and box mask; every method explains the ground-truth class
and its map is the channel sum of the relevance (the pointing game of the gradient
baselines excepted, below).

Metrics per method (:mod:`relprop.metrics`; the mean over items unless said otherwise):

* ``pointing_game``: TorchRay's protocol (:func:`relprop.metrics.pointing_game`): the map
  at image resolution (upsampled bilinearly first if it is not), its arg-max a hit when
  closer than ``15 * size / 224`` px to the box (TorchRay's 15 px at 224, scaled to the
  input size: :func:`relprop.metrics.torchray_tolerance`), the hit rate per class, then
  the mean over classes; the map of the gradient baselines (:data:`MAX_ABS_METHODS`) is
  TorchRay's ``max_c |R_c|`` (:func:`relprop.metrics.max_abs_channels`), every other map
  the signed channel sum (the other metrics use the channel sum for every method);
* ``outside_inside``: outside-inside ratio of positive relevance w.r.t. the box, the
  **median** over items (an item without positive relevance on the box is ``inf``);
  lower is better;
* ``relevance_mass``: share of the positive relevance on the object mask;
* ``iou``: IoU of the positive part of the map (``R > 0``) with the object mask;
* ``ap``: average precision of the pixels ranked by relevance against the object mask;
* ``aopc_morf`` / ``aopc_lerf``: region perturbation (Samek et al.): the ``PERTURB_STEPS``
  most (least) relevant of the ``size/8 x size/8`` patches replaced by uniform noise one
  after another, AOPC of the target logit, on the first ``perturb_images`` items; MoRF
  higher is better, LeRF lower is better;
* ``sanity_top`` / ``sanity_all``: cascading model randomisation (Adebayo et al.) on the
  first ``sanity_images`` items: Spearman rank correlation of ``|map|`` with the trained
  model's, after randomising the output layer / every layer; lower means the map depends
  more on the learned weights;
* ``ms_per_image``: wall time of the attribution calls per item.
* ``untrusted``: how many maps the explainer reported as numerically untrustworthy (their
  estimated relative error, ``Attribution.error``, above the trusted bound; README, Numerics).

Every metric but the last two (not per-item statistics) carries a 95% percentile-bootstrap
confidence interval over items (:mod:`relprop.metrics.bootstrap`): the items scored for it
are resampled with replacement ``BOOTSTRAP_RESAMPLES`` times (indices from a CPU generator
seeded with the run's seed, the same draws for every method), the metric is recomputed as
defined above on each resample (the pointing game's class mean, the ratio's median, the
other means), and the 2.5% and 97.5% quantiles are the interval: ``row["ci"][metric] =
{"low": ..., "high": ..., "items": k}`` in ``metrics.json`` (``k`` items scored for the
metric), ``value ± (high - low) / 2`` in ``metrics.md``.  With fewer than 2 items scored
(``--images 1``; a metric NaN on all items but one) no interval can be estimated: ``low``
and ``high`` are null and ``metrics.md`` prints ``value ± n/a``.  A bound can also be
infinite (the outside/inside ratio of an item with no positive relevance inside its object
is infinite): ``metrics.md`` prints ``± inf`` and, JSON having no infinity, ``metrics.json``
has null for that bound with ``items`` of 2 or more.

The report folder holds ``metrics.md`` and ``metrics.json`` (one table / row list per
model, one row per method) and ``grid-<model>.png`` (rows = the first ``grid_images`` items,
columns = the input and each method, symmetric blue-white-red maps, the object outline in
black).  It is written to a temporary sibling folder and renamed into place when complete.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import external, viz
from .benchmark.models import MODELS as BUILTIN_MODELS     # shapes-vgg, -resnet, -convnext, -vit
from .explainer import Explainer, available_methods, reported_maps_quiet, trusted_error
from .metrics import bootstrap as B
from .metrics import (cascading_randomization, max_abs_channels, outside_inside_ratio, pointing_game,
                      pointing_game_accuracy, region_perturbation, relevance_mass_accuracy, segmentation_scores,
                      torchray_tolerance)

DEFAULT_METHODS = ("lrp-epsilon", "lrp-alphabeta", "lrp-epsilon-plus-flat", "clrp", "sglrp", "rap", "rsp", "ae",
                   "gradient", "gradient-x-input")
BUILTIN_SPLITS = ("test", "hard")      # --split: the shapes test split, or its hard mode
# TorchRay's pointing game reduces the channels of its gradient baselines by max |.|
# (gradient_to_saliency); relprop's names for them:
MAX_ABS_METHODS = ("gradient", "gradient-x-input")
DEFAULT_IMAGES, FULL_IMAGES = 200, 2000
PERTURB_STEPS = 8
GRID_IMAGES = 8
BOOTSTRAP_RESAMPLES, CI_LEVEL = 1000, 0.95
MIN_CI_ITEMS = 2          # fewer scored items: no confidence interval (n/a), never a zero-width one
COLUMNS = (  # key, markdown header, format
    ("pointing_game", "pointing game ↑", "{:.3f}"),
    ("outside_inside", "outside/inside (median) ↓", "{:.3f}"),
    ("relevance_mass", "relevance mass ↑", "{:.3f}"),
    ("iou", "IoU (R>0) ↑", "{:.3f}"),
    ("ap", "AP ↑", "{:.3f}"),
    ("aopc_morf", "AOPC MoRF ↑", "{:.2f}"),
    ("aopc_lerf", "AOPC LeRF ↓", "{:.2f}"),
    ("sanity_top", "rand. ρ top ↓", "{:.2f}"),
    ("sanity_all", "rand. ρ all ↓", "{:.2f}"),
    ("ms_per_image", "ms / image", "{:.1f}"),
    ("untrusted", "maps reported ⚠", "{:.0f}"),
)


@dataclass
class Source:
    """Items to evaluate one model on: ``batches(batch_size)`` yields dicts with ``x``
    (B, 3, S, S) normalised, ``target`` (B,), ``mask`` and ``box`` (B, S, S) bool."""
    name: str
    model: torch.nn.Module
    count: int
    size: int
    mean: tuple
    std: tuple
    classes: tuple
    batches: Callable[[int], Iterator[dict]]
    notes: dict = field(default_factory=dict)


def check_methods(text: str) -> list[str]:
    """``"default"``, ``"all"`` or a comma-separated list -> method names; ValueError naming unknown
    ones.  In a list, ``default`` and ``all`` stand for their methods (``default,rap-split``);
    a name given twice counts once."""
    known = available_methods()
    groups = {"default": list(DEFAULT_METHODS), "all": list(known)}
    names = []
    for m in (m.strip() for m in text.split(",")):
        names.extend(groups.get(m, [m] if m else []))
    for m in names:
        if external.is_external(m):
            external.check(m)          # a ValueError naming the method: unknown, unusable or not installed
    unknown = [m for m in names if m not in known and not external.is_external(m)]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or repr(text)}; choose from: default, all, "
                         f"{', '.join(known)}, or captum:<Attribution> / zennit:<Composite> when installed")
    return list(dict.fromkeys(names))


def shapes_source(model_name: str, images: int, seed: int, split: str = "test") -> Source:
    """The built-in model ``model_name`` on the first ``images`` items of the shapes test split
    (``split="hard"``: of its hard mode; the target is each image's object 0, its mask and box
    the ground truth, the other objects count as background)."""
    from .benchmark import CLASSES, MEAN, STD, ShapesDataset, models, normalise
    from .metrics import boxes_to_masks

    if split not in BUILTIN_SPLITS:
        raise ValueError(f"split must be one of {', '.join(BUILTIN_SPLITS)}, got {split!r}")
    model = models.load(model_name)
    hard = split == "hard"
    data = ShapesDataset(images, size=models.INPUT_SIZE, seed=seed, split="test", hard=hard)

    def batches(batch_size):
        for s in range(0, images, batch_size):
            b = data.make_batch(range(s, min(s + batch_size, images)))
            S = b["images"].shape[-1]
            yield {"x": normalise(b["images"]), "target": b["labels"], "mask": b["masks"],
                   "box": boxes_to_masks([bx[0] for bx in b["boxes"]], S, S)}

    described = f"ShapesDataset({images}, size={models.INPUT_SIZE}, seed={seed}, split='test'"
    return Source(model_name, model, images, models.INPUT_SIZE, MEAN, STD, CLASSES, batches,
                  {"data": described + (", hard=True)" if hard else ")"), "split": split})


def annotated_source(name: str, model: torch.nn.Module, records: list, size: int, mean, std, classes,
                     images: int | None) -> Source:
    """A user model on VOC/COCO records (see :mod:`relprop.benchmark.userdata`), at most ``images`` items."""
    from .benchmark import userdata

    items = userdata.class_items(records)[:images]

    def batches(batch_size):
        for s in range(0, len(items), batch_size):
            chunk = items[s:s + batch_size]
            loaded = [userdata.load_item(records[r], c, size, mean, std) for r, c in chunk]
            yield {"x": torch.stack([d["x"] for d in loaded]), "target": torch.tensor([c for _, c in chunk]),
                   "mask": torch.stack([d["mask"] for d in loaded]), "box": torch.stack([d["box"] for d in loaded])}

    return Source(name, model, len(items), size, tuple(mean), tuple(std), tuple(classes), batches,
                  {"data": f"{len(records)} annotated images, {len(items)} (image, class) items"})


def _nanmean(v: torch.Tensor) -> float:
    v = v.double()
    keep = ~v.isnan()
    return v[keep].mean().item() if bool(keep.any()) else math.nan


def _scores(model, items: dict, heat: torch.Tensor, num_classes: int, perturb_images: int,
            seed: int, point_heat: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Every metric but the randomisation test, for the maps ``heat`` of ``items`` (the
    pointing game on ``point_heat`` when given): (the row's values, metric -> (bootstrap
    statistic, number of items) for its confidence interval)."""
    h, w = items["box"].shape[-2:]
    size = heat.shape[-1]
    hits = pointing_game(heat if point_heat is None else point_heat, items["box"],
                         tolerance=torchray_tolerance(h, w))
    seg = segmentation_scores(heat, items["mask"])
    ratio = outside_inside_ratio(heat, items["box"])
    mass = relevance_mass_accuracy(heat, items["mask"])
    row = {"pointing_game": pointing_game_accuracy(hits, items["target"], num_classes)["mean"],
           "outside_inside": ratio.double().nanmedian().item(),
           "relevance_mass": _nanmean(mass),
           "iou": _nanmean(seg["iou"]), "ap": _nanmean(seg["average_precision"])}
    count = heat.shape[0]
    stats = {"pointing_game": (B.class_mean_statistic(hits, items["target"], num_classes), count, count),
             "outside_inside": (B.nanmedian_statistic(ratio), count, _scored(ratio)),
             "relevance_mass": (B.nanmean_statistic(mass), count, _scored(mass)),
             "iou": (B.nanmean_statistic(seg["iou"]), count, _scored(seg["iou"])),
             "ap": (B.nanmean_statistic(seg["average_precision"]), count, _scored(seg["average_precision"]))}
    n = perturb_images
    for order in ("morf", "lerf"):
        r = region_perturbation(model, items["x"][:n], heat[:n], items["target"][:n], patch=max(1, size // 8),
                                steps=PERTURB_STEPS, order=order, generator=torch.Generator().manual_seed(seed),
                                batch_size=512)
        row[f"aopc_{order}"] = _nanmean(r["aopc"])
        stats[f"aopc_{order}"] = (B.nanmean_statistic(r["aopc"]), n, _scored(r["aopc"]))
    return row, stats


def explain_function(method: str, **params) -> Callable:
    """The relprop method ``method`` (with its ``params``) as a metric's explain callable:
    ``explain(model, x, targets) -> (B, H, W)`` heat maps (the channel sum of the
    relevance).  A fresh :class:`Explainer` is built on every call, so a model changed in
    place between calls (cascading randomisation) is explained as it is at the call.
    Bad method names or parameters fail here, not at the first call.  ``captum:<Attribution>``
    and ``zennit:<Composite>`` give those libraries' methods (:mod:`relprop.external`)."""
    from . import methods

    if external.is_external(method):
        if params:
            raise TypeError(f"external method {method!r} takes no parameters here, got {', '.join(params)}")
        return external.explain_function(method)
    methods.create(method, **params)

    def explain(model: torch.nn.Module, x: torch.Tensor, targets) -> torch.Tensor:
        return Explainer(model, method, **params).heatmap(x, targets)

    explain.__name__ = explain.__qualname__ = f"explain_{method.replace('-', '_')}"
    return explain


def _sanity(model, items: dict, method: str, n: int, seed: int) -> tuple[dict, dict]:
    """Cascading randomisation on the first ``n`` items: mean Spearman of |map| after the first
    and the last step (values, bootstrap statistics as :func:`_scores`)."""
    steps = cascading_randomization(model, items["x"][:n], items["target"][:n], explain_function(method), seed=seed)
    top, every = steps[0]["spearman"], steps[-1]["spearman"]
    return ({"sanity_top": _nanmean(top), "sanity_all": _nanmean(every)},
            {"sanity_top": (B.nanmean_statistic(top), n, _scored(top)),
             "sanity_all": (B.nanmean_statistic(every), n, _scored(every))})


def _scored(values) -> int:
    """How many items have a score (not NaN)."""
    return int((~torch.as_tensor(values).reshape(-1).isnan()).sum())


def confidence_intervals(stats: dict, resamples: int, seed: int, level: float = CI_LEVEL) -> dict:
    """metric -> ``{"low": ..., "high": ..., "items": k}``: the percentile-bootstrap interval
    over items (:func:`relprop.metrics.bootstrap_interval`, ``resamples`` draws seeded with
    ``seed``) and the number ``k`` of items scored for the metric.  ``stats`` maps a metric to
    ``(statistic, n)`` or ``(statistic, n, k)`` (``k`` of the ``n`` items have a score; default
    ``n``).  With ``k < MIN_CI_ITEMS`` (one item: every resample is that item) there is no
    interval: ``low`` and ``high`` are None (printed ``± n/a``), not the zero-width interval
    that would claim certainty."""
    out = {}
    for key, (statistic, n, *scored) in stats.items():
        k = scored[0] if scored else n
        if k < MIN_CI_ITEMS:
            out[key] = {"low": None, "high": None, "items": k}
            continue
        low, high = B.bootstrap_interval(statistic, n, resamples, level, seed)
        out[key] = {"low": low, "high": high, "items": k}
    return out


def evaluate_source(src: Source, methods: list[str], batch_size: int, perturb_images: int, sanity_images: int,
                    grid_images: int, seed: int, progress, resamples: int = None) -> tuple[list[dict], dict]:
    """Score every method on ``src``: (one row dict per method, the grid's inputs, outlines,
    maps per method and the model's accuracy on the items)."""
    batches = list(src.batches(batch_size))
    items = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    with torch.no_grad():
        correct = sum((src.model(b["x"]).argmax(1) == b["target"]).sum().item() for b in batches)
    grid = {"images": [viz.image_to_rgb(x, src.mean, src.std) for x in items["x"][:grid_images]],
            "outlines": list(items["mask"][:grid_images]), "maps": {}, "accuracy": correct / src.count}
    _check_methods_run(src, methods, batches[0])
    rows = []
    for method in methods:
        with reported_maps_quiet():   # the "maps reported" column counts them instead of a warning per batch
            rows.append(_evaluate_method(src, method, batches, items, perturb_images, sanity_images, seed, progress,
                                         resamples))
        grid["maps"][method] = list(rows[-1].pop("heat")[:grid_images])
    return rows, grid


def _check_methods_run(src: Source, methods: list[str], batch: dict) -> None:
    """Each method on the first item, before any is scored: one that cannot explain the model
    (Captum's LRP has no rule for a Flatten) is a ValueError naming it, not a traceback after
    the other methods' work."""
    x, target = batch["x"][:1], batch["target"][:1]
    for method in methods:
        try:
            with reported_maps_quiet():
                if external.is_external(method):
                    external.explain_function(method)(src.model, x, target)
                else:
                    Explainer(src.model, method).attribute(x, target)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means the method cannot run here
            text = str(e).strip().splitlines()
            raise ValueError(f"method {method!r} cannot explain the model {src.name}: {type(e).__name__}"
                             + (f": {text[0]}" if text else "")) from e


def _evaluate_method(src: Source, method: str, batches: list, items: dict, perturb_images: int, sanity_images: int,
                     seed: int, progress, resamples: int = None) -> dict:
    resamples = BOOTSTRAP_RESAMPLES if resamples is None else resamples
    points = []                          # TorchRay's max |.| maps of the gradient baselines
    if external.is_external(method):     # another library's method: its maps, no error estimate
        explain = external.explain_function(method)
        explain(src.model, batches[0]["x"][:1], batches[0]["target"][:1])   # warm-up: not timed
        heats, seconds, untrusted = [], 0.0, math.nan
        for b in batches:
            t0 = time.perf_counter()
            heats.append(explain(src.model, b["x"], b["target"]))
            seconds += time.perf_counter() - t0
            progress(1)
    else:
        explainer = Explainer(src.model, method)
        explainer.attribute(batches[0]["x"][:1], batches[0]["target"][:1])   # warm-up: not timed
        heats, seconds, untrusted = [], 0.0, 0
        for b in batches:
            t0 = time.perf_counter()
            att = explainer.attribute(b["x"], b["target"])
            heats.append(att.relevance.sum(1))
            seconds += time.perf_counter() - t0
            if method in MAX_ABS_METHODS:
                points.append(max_abs_channels(att.relevance))
            untrusted += int((att.error > trusted_error(b["x"].dtype)).sum())
            progress(1)
    heat = torch.cat(heats)
    scores, stats = _scores(src.model, items, heat, len(src.classes), perturb_images, seed,
                            torch.cat(points) if points else None)
    sanity, sanity_stats = _sanity(src.model, items, method, sanity_images, seed)
    row = {"method": method, **scores, **sanity, "ms_per_image": 1000 * seconds / src.count,
           "untrusted": untrusted, "ci": confidence_intervals({**stats, **sanity_stats}, resamples, seed),
           "heat": heat}
    progress(1)
    return row


def format_table(rows: list[dict]) -> str:
    """The markdown table of one model's rows."""
    head = "| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = ["n/a" if math.isnan(r[k]) else f.format(r[k]) + _plus_minus(r.get("ci", {}).get(k))
                 for k, _, f in COLUMNS]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plus_minus(ci: dict | None) -> str:
    """`` ± h`` with ``h`` half the width of the interval ``ci`` (empty without one; `` ± n/a``
    when too few items were scored to estimate one)."""
    if ci and ci.get("items", MIN_CI_ITEMS) < MIN_CI_ITEMS:
        return " ± n/a"
    if not ci or ci["low"] is None or ci["high"] is None or math.isnan(ci["low"]) or math.isnan(ci["high"]):
        return ""
    half = (ci["high"] - ci["low"]) / 2
    if not math.isfinite(half):
        return " ± inf"
    return f" ± {half:.2f}" if half >= 0.005 or half == 0 else f" ± {half:.1g}"


def _markdown(results: dict) -> str:
    out = ["# relprop evaluate", "", "Metrics as defined in `relprop/evaluate.py` (↑ higher is better, ↓ lower is "
           "better; every method explains the ground-truth class).", ""]
    for name, res in results["models"].items():
        out += [f"## {name}", "", f"{res['data']}; {res['items']} items; model accuracy on them "
                f"{res['accuracy']:.3f}; AOPC on the first {res['perturb_images']} items, randomisation on the "
                f"first {res['sanity_images']}; total {res['seconds']:.0f} s.", "", format_table(res["rows"]), "",
                f"± half the width of the 95% percentile-bootstrap interval over the items "
                f"({res.get('resamples', BOOTSTRAP_RESAMPLES)} resamples of the items, seeded; the bounds are in "
                "metrics.json, `ci`); a difference between methods whose intervals overlap is not called a "
                f"difference.  ± n/a: fewer than {MIN_CI_ITEMS} items scored for the metric, so no interval can "
                "be estimated (`low`/`high` are null in metrics.json).  ± inf: a bound is infinite (an item's "
                "outside/inside ratio is infinite: no positive relevance inside its object); metrics.json has "
                "null for it, with `items` of 2 or more.", "",
                f"maps reported ⚠: of the {res['items']} maps, how many relprop reported as numerically "
                "untrustworthy (estimated relative error above the trusted bound, 1e-3 for a float32 model; README, "
                "Numerics).", ""]
    return "\n".join(out)


def run(sources: list[Callable[[], Source]], methods: list[str], out: str, batch_size: int = 50,
        perturb_images: int = 48, sanity_images: int = 6, grid_images: int = GRID_IMAGES, seed: int = 0,
        show_progress: bool = True, settings: dict | None = None, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Evaluate ``methods`` on each source (built lazily by the callables) and write the report to ``out``;
    every metric of a row carries its bootstrap interval (``resamples`` draws, seeded with ``seed``)."""
    from tqdm import tqdm

    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)           # mkdtemp's folder is private; the report is an ordinary folder
    results = {"settings": dict(settings or {}, methods=methods, seed=seed), "models": {}}
    try:
        with tqdm(total=None, disable=not show_progress, unit="step", desc="evaluate") as bar:
            for make in sources:
                t0 = time.time()
                src = make()
                n_batches = math.ceil(src.count / batch_size)
                bar.total = (bar.total or 0) + len(methods) * (n_batches + 1)
                bar.set_description(src.name)
                rows, grid = evaluate_source(src, methods, batch_size, min(perturb_images, src.count),
                                             min(sanity_images, src.count), grid_images, seed, bar.update,
                                             resamples)
                viz.save_grid(os.path.join(tmp, f"grid-{src.name}.png"), grid["images"],
                              [grid["maps"][m] for m in methods], ["input"] + methods, scale=3 if src.size <= 96 else 1,
                              outlines=grid["outlines"])
                results["models"][src.name] = {**src.notes, "items": src.count, "accuracy": grid["accuracy"],
                                               "perturb_images": min(perturb_images, src.count),
                                               "sanity_images": min(sanity_images, src.count),
                                               "resamples": resamples,
                                               "seconds": time.time() - t0, "rows": rows}
        with open(os.path.join(tmp, "metrics.json"), "w") as fh:
            json.dump(_finite(results), fh, indent=2, allow_nan=False)
        with open(os.path.join(tmp, "metrics.md"), "w") as fh:
            fh.write(_markdown(results))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results


def _finite(obj):
    """``obj`` with every NaN / infinite float replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _replace(tmp: str, out: str) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an earlier report there."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=os.path.dirname(out))
        os.replace(out, os.path.join(old, "report"))
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def check_out(out: str) -> None:
    """ValueError unless ``out`` is absent, empty or an earlier report (never overwrite other files)."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ValueError(f"{out!r} exists and is not a folder")
    entries = os.listdir(out)
    if entries and "metrics.json" not in entries:
        raise ValueError(f"{out!r} is a non-empty folder that is not a relprop report (no metrics.json); "
                         f"choose another --out or empty it")


# --------------------------------------------------------------------------- command line
DESCRIPTION = """\
Evaluate attribution methods on a localisation benchmark and write a report folder.

Default (nothing to download or train): the built-in models shapes-vgg, shapes-resnet,
shapes-convnext and shapes-vit (trained weights ship with relprop) on the first N images
of the procedural "shapes in clutter" test split (64x64, exact object masks; --split hard:
3-4 smaller objects of distinct classes per image, one of them the target, more clutter).
With --voc or --coco: your own model (--model, --weights) on your annotated images, each
resized to --size x --size.

Every method explains the ground-truth class of each (image, class) item; other
libraries' methods (captum:<Attribution>, zennit:<Composite>) are scored by the same code.  Metrics, per
method: pointing game, outside/inside relevance ratio (median), relevance mass, IoU of
R > 0 with the object mask, average precision, AOPC of region perturbation (MoRF and
LeRF, first 48 items), Spearman correlation after cascading model randomisation (first 6
items), milliseconds per image and how many maps were reported as numerically
untrustworthy; each with its 95% bootstrap confidence interval over the items
(value ± half-width; bounds in metrics.json); definitions in relprop/evaluate.py.

Output (OUT, replaced as a whole when the run has finished):
  metrics.md, metrics.json   one table / row list per model, one row per method
  grid-<model>.png           the first 8 items: input and one map per method, red =
                             positive, blue = negative relevance, object outline in black
"""

EXAMPLES = """\
examples:
  relprop evaluate --out relprop-report                 default methods, every built-in model
  relprop evaluate --model shapes-vgg --methods rap,gradient --images 50
  relprop evaluate --full                               2000 images
  relprop evaluate --split hard                         several objects per image, one the target
  relprop evaluate --voc VOCdevkit/VOC2007 --model mypkg.nets:voc_vgg --weights voc.pt
  relprop evaluate --coco instances.json --images-dir images/ --model resnet50 \\
      --weights coco.pt --num-classes 80
"""


def add_arguments(p) -> None:
    """The options of ``relprop evaluate``."""
    from .cli import _positive

    p.add_argument("--methods", default="default", metavar="LIST",
                   help=f"'default' ({','.join(DEFAULT_METHODS)}), 'all' (every method of 'relprop methods') "
                        f"or a comma-separated list, which may include them (default,rap-split); besides "
                        f"relprop's methods (gradcam included) "
                        f"captum:<Attribution> (e.g. captum:IntegratedGradients) and zennit:<Composite> (e.g. "
                        f"zennit:EpsilonPlusFlat) when those packages are installed")
    p.add_argument("--model", default="all", metavar="MODEL",
                   help="built-in data: shapes-vgg, shapes-resnet, shapes-convnext, shapes-vit or all (default: "
                        "all); with --voc/--coco: a torchvision architecture name or package.module:function "
                        "returning your model")
    p.add_argument("--weights", metavar="PATH", help="state dict of your model (with --voc/--coco)")
    p.add_argument("--num-classes", type=_positive, metavar="N", help="build your model with N classes")
    p.add_argument("--images", type=_positive, metavar="N",
                   help=f"evaluate the first N items (default: {DEFAULT_IMAGES} built-in, every item of user data)")
    p.add_argument("--full", action="store_true", help=f"the longer run: {FULL_IMAGES} built-in images, AOPC on "
                                                       f"500 and randomisation on 32 of them")
    p.add_argument("--split", choices=BUILTIN_SPLITS, metavar="SPLIT",
                   help="built-in data: 'test' (default: one object per image) or 'hard' (3-4 smaller objects "
                        "of distinct classes per image, one of them the target, more clutter)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the built-in test images and of the perturbation noise (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=50, metavar="N",
                   help="items per batch (default: %(default)s)")
    p.add_argument("--out", default="relprop-report", metavar="DIR", help="report folder (default: %(default)s)")
    p.add_argument("--voc", metavar="DIR", help="PASCAL VOC folder: DIR/Annotations/*.xml, images in DIR/JPEGImages")
    p.add_argument("--coco", metavar="JSON", help="COCO instances file (needs --images-dir)")
    p.add_argument("--images-dir", metavar="DIR", help="folder of the annotated images (COCO; overrides VOC's)")
    p.add_argument("--classes", metavar="LIST|FILE",
                   help="the model's class names in output order, comma-separated or a file with one per line "
                        "(default: the 20 VOC classes, or the COCO categories in id order)")
    p.add_argument("--size", type=_positive, metavar="PX",
                   help="user images are resized to PX x PX (default: the model's input size, 224 for ImageNet "
                        "models)")
    p.add_argument("--mean", metavar="R,G,B", help="normalisation mean of user images (default: the model's, "
                                                   "e.g. ImageNet 0.485,0.456,0.406)")
    p.add_argument("--std", metavar="R,G,B", help="normalisation std of user images (default: the model's, e.g. "
                                                  "ImageNet 0.229,0.224,0.225)")
    p.add_argument("--threads", type=_positive, metavar="N",
                   help="CPU threads (default: 1 for the built-in benchmark, whose tiny 64x64 models run fastest "
                        "on one thread, torch's default for user data)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def command(args, parser) -> int:
    """``relprop evaluate``: check every option, then run and print the tables."""
    from functools import partial

    try:
        methods = check_methods(args.methods)
    except ValueError as e:
        parser.error(f"--methods: {e}")
    if args.full and args.images is not None:
        parser.error("give --images N or --full, not both")
    if args.voc and args.coco:
        parser.error("give --voc or --coco, not both")
    if args.coco and not args.images_dir:
        parser.error("--coco needs --images-dir DIR, the folder of the images")
    try:
        check_out(args.out)
    except ValueError as e:
        parser.error(f"--out: {e}")
    from .cli import _check_writable

    _check_writable(parser, "--out", os.path.dirname(os.path.abspath(args.out)))
    perturb, sanity = (500, 32) if args.full else (48, 6)
    if args.voc or args.coco:
        if args.split is not None:
            parser.error("--split is only for the built-in benchmark (not with --voc or --coco)")
        sources = [_user_source(args, parser, methods)]
    else:
        if args.model not in BUILTIN_MODELS + ("all",):
            parser.error(f"--model: the built-in benchmark runs {', '.join(BUILTIN_MODELS)} or all; "
                         f"your own model {args.model!r} needs your data: --voc DIR or --coco JSON")
        for flag in ("weights", "num_classes", "images_dir", "classes", "size", "mean", "std"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} is only for your own data (--voc or --coco)")
        names = BUILTIN_MODELS if args.model == "all" else (args.model,)
        images = FULL_IMAGES if args.full else (args.images or DEFAULT_IMAGES)
        sources = [partial(shapes_source, name, images, args.seed, args.split or "test") for name in names]
    if args.threads or not (args.voc or args.coco):
        torch.set_num_threads(args.threads or 1)
    settings = {k: getattr(args, k) for k in ("model", "weights", "images", "full", "voc", "coco", "images_dir",
                                              "batch_size", "split")}
    if not (args.voc or args.coco):     # what ran, not what was typed: the defaults filled in
        settings.update(split=args.split or "test", images=images)
    try:
        results = run(sources, methods, args.out, batch_size=args.batch_size, perturb_images=perturb,
                      sanity_images=sanity, seed=args.seed, show_progress=not args.quiet, settings=settings)
    except ValueError as e:                 # e.g. an unreadable image: no report is left behind
        print(f"relprop evaluate: error: {e}", file=sys.stderr)
        return 2
    print(_markdown(results))
    print(f"report: {os.path.abspath(args.out)}")
    return 0


def _user_source(args, parser, methods):
    from functools import partial

    from .benchmark import userdata
    from .cli import _floats3, model_error
    from .models import load_model

    if args.model in BUILTIN_MODELS + ("all",):
        parser.error(f"--model: {args.model!r} is a built-in shapes model; --voc/--coco need your own model "
                     f"(a torchvision name or package.module:function)")
    flag = "--voc" if args.voc else "--coco"
    try:
        if args.classes is None:
            classes = userdata.VOC_CLASSES if args.voc else None
        else:
            classes = _read_classes(args.classes)
        if args.voc:
            records = userdata.voc_records(args.voc, args.images_dir, classes)
        else:
            records = userdata.coco_records(args.coco, args.images_dir, classes)
            classes = classes or userdata.coco_classes(args.coco)
    except (OSError, ValueError) as e:
        parser.error(f"{flag}: {e}")
    try:
        model, pre = load_model(args.model, args.weights, args.num_classes)
    except ValueError as e:
        parser.error(model_error(e))
    size = args.size or pre.size
    mean = pre.mean if args.mean is None else _floats3(parser, "mean", args.mean)
    std = pre.std if args.std is None else _floats3(parser, "std", args.std)
    if any(s <= 0 for s in std):
        parser.error("--std: values must be > 0")
    try:
        with torch.no_grad():
            outputs = model(torch.zeros(1, 3, size, size)).shape[-1]
    except RuntimeError as e:
        parser.error(f"--model: the model fails on a {size}x{size} input: {e}")
    if outputs < len(classes):
        parser.error(f"--model: the model has {outputs} outputs but there are {len(classes)} classes "
                     f"(set --num-classes or --classes)")
    for m in methods:
        if external.is_external(m):
            continue
        try:
            Explainer(model, m)
        except Exception as e:
            parser.error(f"--model: method {m} cannot explain this model: {e}")
    return partial(annotated_source, "user-model", model, records, size, mean, std, classes, args.images)


def _read_classes(text: str) -> tuple[str, ...]:
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as fh:
            names = tuple(line.strip() for line in fh if line.strip())
    else:
        names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise ValueError(f"--classes {text!r} names no class")
    return names
