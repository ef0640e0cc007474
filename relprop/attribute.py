"""Attribute a whole data set, in resumable shards (``relprop attribute``).

:func:`attribute_dataset` streams a dataset (:class:`relprop.images.ImageFolderDataset`
or :class:`relprop.images.TorchvisionDataset`) through one :class:`relprop.Explainer`,
batch by batch, and writes the relevance maps to disk in shards.

Output format (``out_dir``)::

    run.json                  the settings of the run (method, parameters, targets,
                              shard size, storage dtype, model and data fingerprints);
                              a re-run must use the same ones; and "batch_size" (not a
                              setting): {"requested": N or "auto", and for auto "chosen",
                              "per_image_bytes", "fixed_bytes", "available_bytes", "how"}
    shards/shard-00000.npy    relevance, numpy array (n_items, C, H, W), float32 or float16
    shards/shard-00000.json   {"shard": 0, "first": 0, "stop": S, "rank": r (the process that
                              wrote it), "settings": sha256 of run.json's settings,
                              "dtype", "shape", "bytes", "sha256": of the .npy file,
                              "items": [...], "skipped": [...]}
    ...
    index.jsonl               one JSON object per line: every shard's items, then its
                              skipped images, shard by shard in order

Shard ``k`` holds the dataset items ``[k * shard_size, (k + 1) * shard_size)`` (the
dataset order is sorted, so it is deterministic).  An image explained for several
targets (``topk:K`` or a list) gives K consecutive items.  Each item of ``items`` (and
each line of ``index.jsonl``) is::

    {"shard": k, "row": r, "index": i, "id": "...", "path": "..." or null, "label": l or null,
     "target": t, "logit": z_t, "relevance_sum": sum(R), "delta": sum(R) - z_t,
     "error_estimate": e, "reported": false, "dtype": "float32"}

``row`` is the item's row in the shard's ``.npy``; ``index`` the image's position in the
dataset; ``id`` its stable name (``dataset.item_id(i)``: the path relative to the image
folder, or ``NAME[options]:i`` for a torchvision data set); ``path`` the image file
relative to the image folder (``dataset.relative_path(i)``, so the same whatever the
working directory; null for a torchvision data set); ``label`` the data set's label;
``logit`` the model's output ``z_t`` for the explained class ``t``; ``relevance_sum``
the sum of the float32 map; ``delta`` the conservation error; ``error_estimate`` the
map's estimated relative error (``Attribution.error``) and ``reported`` whether it is above
the trusted bound (the map may be numerically untrustworthy; one warning for the run counts
them); ``dtype`` the dtype the shard's ``.npy`` stores.  A number that is infinite or NaN
(a float16 model's logit past 65504) is null, and such a map is reported.
An image that cannot be read appears instead as ``{"shard": k, "index": i, "id": "...",
"path": ..., "skipped": true, "error": "..."}`` (and a warning names it).

Validation: before anything is written, the first readable item is explained (its
predicted class) with the method and parameters, which proves them usable on this model
and data, and gives the number of classes the targets are checked against (a class
index or ``topk:K`` beyond it, or a label beyond it for ``targets="label"``, is a
``ValueError``); a data set none of whose items can be read is a ``ValueError`` too.

Crash safety and resuming: each file is written under a temporary name in the same
folder (``.NAME.PID-HOST.XXXXXXXX.tmp``), flushed to disk (``fsync``) and then renamed
(:func:`os.replace`, atomic); the shard's ``.json`` is written *last*, with the size and
sha256 of its ``.npy``.  Re-running the same command keeps every finished shard whose
files are whole: a shard whose ``.json`` is empty, unreadable or incomplete, was made
with other settings (``run.json`` replaced), or whose ``.npy`` is missing, has another
size, shape or dtype, or fails the checksum, is computed again with a warning naming the
file.  Temporary files of runs that are no longer alive are removed; ``index.jsonl`` is
removed while shards are being (re)computed, so it exists only for a complete run.  A
run killed at any moment loses at most the shards in flight.  A re-run with different
settings is refused (``ValueError``); so is an empty or corrupt ``run.json``, with the
advice to delete it (the shards made with the same settings are then kept).

Write errors (disk full, a read-only folder, ``out_dir/shards`` being a file) raise
:class:`OutputError` (an ``OSError``) naming the file and what to do; the finished
shards stay valid for a resume.

Several processes: under ``torchrun`` (``WORLD_SIZE``/``RANK`` set) the processes join
a ``torch.distributed`` group (gloo on CPU, nccl on CUDA); shard ``k`` is done by rank
``k % world_size``, every rank writes its own shards and, once all are done, rank 0
writes ``index.jsonl``.  The ranks check in with each other after every round of
``world_size`` shards (see :class:`_Ranks`): when one fails, all stop within a shard and
raise :class:`DistributedRunError` naming the failed rank and its error; the finished
shards stay valid for a resume.

Storage dtype ``float16`` halves the disk space; the computation is float32 either way.
A shard with a value that float16 cannot hold (``|R| > 65504``, which would be stored as
inf) is stored as float32 instead, with a warning naming the item and its largest
``|R|``; its ``.json`` ``dtype`` and the ``dtype`` of its index lines say ``float32``
(its other maps keep their float16 rounding).  The summary counts the shards of every
rank.
On CUDA, an out-of-memory error halves the number of items explained at once (with a
warning) and retries (:func:`_in_chunks`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import socket
import sys
import traceback
import uuid
import warnings

import numpy as np
import torch
from tqdm import tqdm

from .explainer import Explainer, available_methods, reported_maps_quiet, trusted_error
from .images import collate
from .models import model_fingerprint

FORMAT_VERSION = 2          # 2: shard .json records the settings digest and the .npy's size and sha256
FLOAT16_MAX = float(np.finfo(np.float16).max)      # 65504
RESUME_NOTE = "finished shards are kept: fix this, then run the same command again to resume"


class OutputError(OSError):
    """The output folder cannot be written (disk full, read-only, a file where a folder
    belongs...); the message names the path and what to do.  Finished shards are kept."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


def parse_targets(targets) -> tuple[str, object]:
    """``"predicted"``, ``"label"``, ``"topk:K"`` or a list of class indices (or ``"1,5,7"``)
    -> ``(kind, value)``; ValueError otherwise."""
    if isinstance(targets, str):
        text = targets.strip()
        if text in ("predicted", "label"):
            return text, None
        if text.startswith("topk:"):
            try:
                k = int(text[5:])
            except ValueError:
                k = 0
            if k < 1:
                raise ValueError(f"targets {targets!r}: topk:K needs an integer K >= 1")
            return "topk", k
        try:
            targets = [int(t) for t in text.split(",")]
        except ValueError:
            raise ValueError(f"targets {targets!r}: use predicted, label, topk:K or a comma-separated "
                             "list of class indices such as 1,5,7") from None
    values = [int(t) for t in targets]
    if not values or any(t < 0 for t in values):
        raise ValueError(f"targets {targets!r}: need at least one class index, all >= 0")
    return "list", values


def shard_paths(out_dir, k: int) -> tuple[str, str]:
    base = os.path.join(os.fspath(out_dir), "shards", f"shard-{k:05d}")
    return base + ".npy", base + ".json"


def attribute_dataset(model: torch.nn.Module, dataset, method: str = "rap", method_params: dict | None = None,
                      out_dir="relprop-attributions", targets="predicted", batch_size: int = 32,
                      shard_size: int = 1024, dtype: str = "float32", num_workers: int = 0,
                      progress: bool = True, device=None, extra_settings: dict | None = None) -> dict:
    """Explain every item of ``dataset`` and write shards (format: module docstring).

    ``dataset[i]`` must return ``(i, image tensor or None, error message or None)`` and
    may have ``paths``, ``item_id(i)``, ``labels`` (needed for ``targets="label"``) and
    ``fingerprint()``.  ``extra_settings`` (e.g. the model spec) join ``run.json``.
    Returns a summary dict (``shards``, ``done`` (shards computed by this call), ``batch_size``,
    ``skipped_shards``, ``items``, ``skipped_images``).  Under torchrun, a failure in any
    process raises :class:`DistributedRunError` in every process.
    """
    method_params = dict(method_params or {})
    kind, tvalue = parse_targets(targets)
    if method not in available_methods():
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(available_methods())}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    auto = batch_size == "auto"
    if not auto and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    if (not auto and batch_size < 1) or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    labels = getattr(dataset, "labels", None)
    if kind == "label" and labels is None:
        raise ValueError("targets='label' needs labels: put the images in one sub-folder per class "
                         "(root/<class>/<image>), or use predicted, topk:K or class indices")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")

    world, rank, own_group = _init_distributed()
    try:
        device = torch.device(device) if device is not None else (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
            else torch.device("cpu"))
        ranks = _Ranks(world, rank)
        with ranks.step():          # everything is validated before anything is written
            model = model.to(device)
            explainer = Explainer(model, method, **method_params)
            settings = {"format": FORMAT_VERSION, "method": method, "method_params": method_params,
                        "targets": targets if isinstance(targets, str) else list(tvalue),
                        "shard_size": shard_size, "dtype": dtype, "model": model_fingerprint(model),
                        "data": dataset.fingerprint() if hasattr(dataset, "fingerprint") else {"items": n}}
            settings.update(extra_settings or {})
            try:
                settings = json.loads(json.dumps(settings))
            except (TypeError, ValueError) as e:
                raise ValueError(f"the method parameters and settings must be JSON values (numbers, strings, "
                                 f"lists...): {e}") from None
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
            replace_record = _check_settings(out_dir, settings)
            first, classes = _validate(explainer, dataset, method, method_params, targets, kind, tvalue, labels,
                                       device)
            per_image = tvalue if kind == "topk" else len(tvalue) if kind == "list" else 1
            batch = {"requested": batch_size}
            if auto:
                batch.update(auto_batch_size(explainer, first, per_image, limit=shard_size))
                batch_size = batch["chosen"]
                if rank == 0 and progress:
                    print(f"relprop attribute: --batch-size auto: {batch_size} images per batch ({batch['how']})",
                          file=sys.stderr, flush=True)
        with ranks.step():
            if rank == 0:
                _prepare_folder(out_dir)
                if replace_record or not os.path.exists(os.path.join(out_dir, "run.json")):   # the batch size is
                    record = dict(settings, batch_size=batch)               # not a setting: a resume may use another
                    _write_atomic(os.path.join(out_dir, "run.json"), json.dumps(record, indent=2).encode())

        n_shards = math.ceil(n / shard_size)
        mine = [k for k in range(n_shards) if k % world == rank]
        with ranks.step():
            todo = _unfinished(out_dir, mine, shard_size, n, digest)
        computed = sum(ranks.gather(len(todo)))
        with ranks.step():
            if rank == 0 and computed:          # index.jsonl exists only for a complete run
                _remove(os.path.join(out_dir, "index.jsonl"))
            _attribute_shards(explainer, dataset, todo, out_dir, n, kind, tvalue, labels, classes, batch_size,
                              shard_size, dtype, num_workers, progress and rank == 0, device, ranks, digest)
            ranks.through_round(math.ceil(n_shards / world) - 1)
        summary = {"shards": n_shards, "done": computed, "skipped_shards": n_shards - computed,
                   "batch_size": batch_size}
        with ranks.step():
            if rank == 0:
                summary.update(write_index(out_dir, n_shards))
        if own_group:   # every rank idle before any tears its group down (a gloo peer aborted once without)
            torch.distributed.barrier()
        return summary
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _attribute_shards(explainer, dataset, todo, out_dir, n, kind, tvalue, labels, classes, batch_size, shard_size,
                      dtype, num_workers, progress, device, ranks, digest) -> None:
    """Compute and write the shards ``todo``, checking in with the other ranks between rounds."""
    batches = [list(range(s, min(s + batch_size, stop)))
               for k in todo for stop in [min((k + 1) * shard_size, n)]
               for s in range(k * shard_size, stop, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc="attributing",
               disable=not progress or None, dynamic_ncols=True)
    state = {"chunk": batch_size * (tvalue if kind == "topk" else len(tvalue) if kind == "list" else 1)}
    item_id = getattr(dataset, "item_id", str)
    path_of = _path_function(dataset)
    current, rel, items, skipped, overflow, reported = None, [], [], [], None, 0
    for x, indices, bad in (loader if batches else ()):
        k = (indices or [b[0] for b in bad])[0] // shard_size
        if k != current:
            if current is not None:
                _write_shard(out_dir, current, shard_size, n, rel, items, skipped, dtype, ranks.rank, digest,
                             overflow)
                rel, items, skipped, overflow = [], [], [], None
            ranks.through_round(k // ranks.world - 1)
        current = k
        for i, err in bad:
            warnings.warn(f"skipping unreadable image {item_id(i)}: {err}", stacklevel=3)
            skipped.append({"shard": k, "index": i, "id": item_id(i), "path": path_of(i),
                            "skipped": True, "error": err})
        if x is not None:
            x = x.to(device, non_blocking=True)
            if kind == "label":   # before the batch is explained: the error names the item
                check_labels(labels, indices, classes, item_id)
            r, logit, tgt, reps, error = _explain(explainer, x, indices, kind, tvalue, labels, state)
            r_sum = r.flatten(1).double().sum(1).cpu().tolist()
            first_row = len(items)
            bound = trusted_error(x.dtype)
            for j, (t, z, s, e) in enumerate(zip(tgt.cpu().tolist(), logit.cpu().tolist(), r_sum, error.tolist())):
                i = indices[j // reps]
                items.append({"shard": k, "row": len(items), "index": i, "id": item_id(i),
                              "path": path_of(i),
                              "label": labels[i] if labels is not None else None,
                              "target": t, "logit": _json_number(z), "relevance_sum": _json_number(s),
                              "delta": _json_number(s - z), "error_estimate": _json_number(e),
                              "reported": not e <= bound})
                reported += not e <= bound
            r = r.to(torch.float32)
            if dtype == "float16":
                r16 = r.to(torch.float16)
                lost = (torch.isinf(r16) & torch.isfinite(r)).flatten(1).any(1)     # finite values -> inf
                if lost.any():
                    peak = r.flatten(1).abs().where(torch.isfinite(r.flatten(1)), 0).amax(1)
                    j = int(torch.where(lost, peak, -1).argmax())
                    if overflow is None or peak[j].item() > overflow[0]:
                        overflow = (peak[j].item(), items[first_row + j]["id"])
                else:
                    r = r16
            rel.append(r.cpu().numpy())
        bar.update(len(indices) + len(bad))
    if current is not None:
        _write_shard(out_dir, current, shard_size, n, rel, items, skipped, dtype, ranks.rank, digest, overflow)
    bar.close()
    if reported:     # one line for the run, not one per batch; the index says which maps
        warnings.warn(f"{reported} map(s) may be numerically untrustworthy (estimated relative error above the "
                      "trusted bound): their index lines have \"reported\": true (README, Numerics)",
                      RuntimeWarning, stacklevel=3)


def _path_function(dataset):
    """``i -> `` the ``path`` index column: ``dataset.relative_path(i)`` (relative to the image
    folder, the same whatever the working directory), else ``dataset.paths[i]``, else None."""
    relative = getattr(dataset, "relative_path", None)
    if relative is not None:
        return relative
    paths = getattr(dataset, "paths", None)
    return (lambda i: paths[i]) if paths else (lambda i: None)


def dense_output_refusal(command: str, shape) -> str:
    """Why ``relprop <command>`` refuses a model with a dense output of ``shape``: its
    targets (class indices, top-k, labels) are classes of a (B, classes) output."""
    return (f"relprop {command} explains classifiers, whose output is (B, classes) scores; this model's output "
            f"has shape {tuple(shape)} (a dense map, e.g. segmentation). Explain it from Python with a region "
            "target: relprop.Explainer(model, method)(x, target=relprop.SegmentationTarget(category, mask)) "
            "(README, Dense outputs)")


def _validate(explainer, dataset, method, method_params, targets, kind, tvalue, labels, device) -> tuple:
    """Explain the first readable item (its predicted class) and check the targets against the
    model's number of classes; ValueError, before anything is written, if that fails.  Returns
    that item (a batch of 1) and the number of classes."""
    item_id = getattr(dataset, "item_id", str)
    first_error = None
    for i in range(len(dataset)):
        _, x, err = dataset[i]
        if x is not None:
            break
        first_error = first_error or (i, err)
    else:
        i, err = first_error
        raise ValueError(f"none of the {len(dataset)} images can be read (the first, {item_id(i)}: {err})")
    x = x[None].to(device)
    try:
        with torch.no_grad():           # a dense output has no classes to take targets from: refuse it first
            shape = explainer.graph.forward(x, drop=frozenset(range(1, len(explainer.graph.nodes) - 1)))[-1].shape
    except ValueError as e:
        raise ValueError(f"the model fails on the first image, {item_id(i)}: {e}") from e
    if len(shape) != 2:
        raise ValueError(dense_output_refusal("attribute", shape))
    try:
        with reported_maps_quiet():     # the run reports such maps in the index
            att = _in_chunks(lambda s, e: explainer.attribute(x), 1, {"chunk": 1})[0]
            first = x
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        params = ", ".join(f"{key}={value!r}" for key, value in method_params.items())
        raise ValueError(f"method {method!r}{f' with {params}' if params else ''} fails on the first image, "
                         f"{item_id(i)}: {type(e).__name__}: {e}") from e
    classes = att.logits.shape[1]
    if kind == "list" and max(tvalue) >= classes:
        bad = next(t for t in tvalue if t >= classes)
        raise ValueError(f"targets {targets!r}: class {bad} is out of range: the model has {classes} classes "
                         f"(0 to {classes - 1})")
    if kind == "topk" and tvalue > classes:
        raise ValueError(f"targets {targets!r}: the model has only {classes} classes")
    if kind == "label" and isinstance(labels, (list, tuple)):
        bad = next((t for t in labels if not 0 <= t < classes), None)
        if bad is not None:
            raise ValueError(f"targets 'label': the data set has the label {bad} but the model has {classes} "
                             f"classes (0 to {classes - 1})")
    elif kind == "label":   # labels read with their items (a torchvision data set without .targets): the first
        check_labels(labels, [i], classes, item_id)
    return first, classes


def check_labels(labels, indices, classes: int, item_id=str) -> None:
    """ValueError naming the first of ``indices`` whose label is not a class of the model."""
    bad = next((i for i in indices if not 0 <= labels[i] < classes), None)
    if bad is not None:
        raise ValueError(f"targets 'label': {item_id(bad)} has the label {labels[bad]} but the model has {classes} "
                         f"classes (0 to {classes - 1})")


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing), so that the resident set is the bytes alive: a peak measured as the rise of
    ``VmHWM`` over ``VmRSS`` otherwise misses what the call reuses of memory freed before it."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):   # no glibc (macOS: no symbol; Windows: no CDLL(None))
        pass


# The share of the free memory ``--batch-size auto`` plans to use: the rest absorbs what one
# measurement does not see (the data loader's batches, allocator slack, other processes).
AUTO_MEMORY_SHARE = 0.7


def auto_batch_size(explainer, x1: torch.Tensor, per_image: int = 1, limit: int = 4096) -> dict:
    """The largest batch (images, each explained for ``per_image`` targets) whose measured
    peak memory fits ``AUTO_MEMORY_SHARE`` of the memory free now, at most ``limit``.

    The peak of one call grows linearly with the batch: it is measured at 1 and 3 copies of
    the image ``x1`` (1, C, H, W) and extrapolated.  On CUDA: ``max_memory_allocated`` above
    the allocated memory, against the device's free memory plus torch's unused cache.  On
    CPU (Linux): the rise of the peak resident set (``VmHWM``, reset through
    ``/proc/self/clear_refs``) over the trimmed heap's (:func:`trim_heap`), against
    ``MemAvailable``.  Elsewhere, 32.
    Returns ``chosen``, ``per_image_bytes``, ``fixed_bytes`` (the batch-independent part),
    ``available_bytes`` and ``how`` (one line).
    """
    def call(b):
        with reported_maps_quiet():
            explainer.attribute(x1.expand(b * per_image, *x1.shape[1:]).contiguous())

    cuda = x1.is_cuda
    if not cuda and not (os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/meminfo")):
        return {"chosen": min(32, limit), "per_image_bytes": None, "fixed_bytes": None, "available_bytes": None,
                "how": "no memory statistics on this system: the default"}
    peaks = []
    for b in (1, 3):
        if cuda:
            torch.cuda.synchronize(x1.device)
            torch.cuda.reset_peak_memory_stats(x1.device)
            base = torch.cuda.memory_allocated(x1.device)
            call(b)
            torch.cuda.synchronize(x1.device)
            peaks.append(torch.cuda.max_memory_allocated(x1.device) - base)
        else:
            trim_heap()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _proc_kib("/proc/self/status", "VmRSS")
            call(b)
            peaks.append((_proc_kib("/proc/self/status", "VmHWM") - base) * 1024)
    per = max((peaks[1] - peaks[0]) / 2, peaks[1] / 3, 1.0)   # allocator reuse can hide the first call's rise
    fixed = max(peaks[0] - per, 0.0)
    if cuda:
        free, _ = torch.cuda.mem_get_info(x1.device)
        free += torch.cuda.memory_reserved(x1.device) - torch.cuda.memory_allocated(x1.device)
    else:
        free = _proc_kib("/proc/meminfo", "MemAvailable") * 1024
    chosen = int(max(1, min(limit, (AUTO_MEMORY_SHARE * free - fixed) // per)))
    return {"chosen": chosen, "per_image_bytes": int(per), "fixed_bytes": int(fixed), "available_bytes": int(free),
            "how": f"measured {per / 2**20:.0f} MiB per image, {free / 2**30:.1f} GiB available, "
                   f"planned to use {AUTO_MEMORY_SHARE:.0%} of it" + (f", at most {limit} (the shard size)"
                                                                    if chosen == limit else "")}


def _json_number(v: float) -> float | None:
    """``v``, or None (JSON null) where it is infinite or NaN (a float16 logit past 65504), which
    strict JSON cannot write."""
    return v if math.isfinite(v) else None


def _proc_kib(path: str, field: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in {path}")


def write_index(out_dir, n_shards: int) -> dict:
    """Merge the shard jsons, in order, into ``out_dir/index.jsonl``; counts of items/skipped."""
    lines, n_items, n_skipped = [], 0, 0
    for k in range(n_shards):
        js = shard_paths(out_dir, k)[1]
        try:
            with open(js, "rb") as f:
                shard = json.load(f)
            records = shard["items"] + shard["skipped"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{js} cannot be read ({type(e).__name__}: {e}): run the same command again to "
                             "compute that shard again") from None
        for rec in records:
            lines.append(json.dumps(rec))
        n_items += len(shard["items"])
        n_skipped += len(shard["skipped"])
    _write_atomic(os.path.join(out_dir, "index.jsonl"), ("\n".join(lines) + "\n").encode())
    return {"items": n_items, "skipped_images": n_skipped}


def _explain(explainer, x, indices, kind, tvalue, labels, state):
    """Relevance, logit of the target, targets and repeats per image, for one batch.

    Several targets per image: the images are repeated along the batch dimension so all
    targets go through one batched pass (in chunks of ``state["chunk"]`` items, see
    :func:`_in_chunks`).
    """
    b = x.shape[0]
    if kind == "predicted":
        reps, target = 1, None
    elif kind == "label":
        reps, target = 1, torch.tensor([labels[i] for i in indices], device=x.device)
    elif kind == "list":
        reps, target = len(tvalue), torch.tensor(tvalue, device=x.device).repeat(b)
    else:
        with torch.no_grad():
            logits = torch.cat(_in_chunks(lambda s, e: explainer.graph.forward(x[s:e])[-1], b, state))
        reps = tvalue
        if reps > logits.shape[1]:
            raise ValueError(f"topk:{reps} but the model has only {logits.shape[1]} classes")
        target = logits.topk(reps, dim=1).indices.reshape(-1)
    xs = x.repeat_interleave(reps, dim=0) if reps > 1 else x
    with reported_maps_quiet():      # recorded per item in the index instead
        outs = _in_chunks(lambda s, e: explainer.attribute(xs[s:e], None if target is None else target[s:e]),
                          xs.shape[0], state)
    r = torch.cat([o.relevance for o in outs])
    tgt = torch.cat([o.target for o in outs])
    logit = torch.cat([o.logits.gather(1, o.target[:, None])[:, 0] for o in outs])
    return r, logit, tgt, reps, torch.cat([o.error for o in outs]).cpu()


def _in_chunks(fn, n: int, state: dict) -> list:
    """``[fn(start, stop), ...]`` over ``range(n)`` in chunks of ``state["chunk"]`` items.

    On CUDA out-of-memory the failed chunk's memory is released (the exception and its
    frames are dropped, then the CUDA cache emptied), ``state["chunk"]`` is halved for
    the rest of the run, a warning says so, and the chunk is retried; a single item that
    still does not fit raises ``torch.cuda.OutOfMemoryError`` with advice.
    """
    outs, start = [], 0
    while start < n:
        size = state["chunk"]
        try:
            outs.append(fn(start, min(start + size, n)))
            start += size
            continue
        except torch.cuda.OutOfMemoryError as e:
            if size == 1:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory even for one item at a time ({e}); use a smaller --size or model, a "
                    "GPU with more free memory, or the CPU (CUDA_VISIBLE_DEVICES=)") from None
        state["chunk"] = max(1, size // 2)        # here the failed attempt's tensors are already freed
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        warnings.warn(f"CUDA out of memory with {size} items at once: retrying with {state['chunk']} "
                      "(and at most that many for the rest of the run)", stacklevel=4)
    return outs


def _write_shard(out_dir, k, shard_size, n, rel, items, skipped, dtype, rank, digest, overflow=None) -> None:
    """Write shard ``k``: the ``.npy``, then (last: the shard is finished) its ``.json``.

    ``overflow``: ``(largest |R|, item id)`` when a map does not fit float16; the shard is
    then stored as float32 (with a warning) and its records say so.
    """
    npy, js = shard_paths(out_dir, k)
    stored = dtype
    if overflow is not None:
        stored = "float32"
        warnings.warn(f"shard {k} is stored as float32, not float16: item {overflow[1]} has relevance values up "
                      f"to |R| = {overflow[0]:.6g}, beyond float16's largest value {FLOAT16_MAX:.0f} (its .json and "
                      "index lines say dtype float32)", stacklevel=3)
    arr = np.concatenate([a.astype(stored, copy=False) for a in rel]) if rel else np.zeros((0,), dtype=stored)
    buf = io.BytesIO()
    np.save(buf, arr)
    data = buf.getvalue()
    _write_atomic(npy, data)
    for item in items:
        item["dtype"] = stored
    meta = {"shard": k, "first": k * shard_size, "stop": min((k + 1) * shard_size, n), "rank": rank,
            "settings": digest, "dtype": stored, "shape": list(arr.shape), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "items": items, "skipped": skipped}
    _write_atomic(js, json.dumps(meta).encode())          # last: the shard is finished now


def _shard_problem(out_dir, k: int, shard_size: int, n: int, digest: str) -> str | None:
    """Why the finished shard ``k`` (its ``.json`` exists) is not whole, or None if it is."""
    npy, js = shard_paths(out_dir, k)
    try:
        with open(js, "rb") as f:
            raw = f.read()
    except OSError as e:
        return f"{js} cannot be read ({e.strerror or e})"
    if not raw.strip():
        return f"{js} is empty"
    try:
        meta = json.loads(raw)
    except ValueError as e:
        return f"{js} is not valid JSON ({e})"
    expected = {"shard": k, "first": k * shard_size, "stop": min((k + 1) * shard_size, n)}
    fields = ("settings", "dtype", "shape", "bytes", "sha256", "items", "skipped")
    if not isinstance(meta, dict) or any(f not in meta for f in (*expected, *fields)):
        return f"{js} is incomplete"
    if meta["settings"] != digest:
        return f"{js} was made with other settings than run.json"
    if any(meta[f] != v for f, v in expected.items()) or not isinstance(meta["items"], list) \
            or not isinstance(meta["shape"], list) or meta["shape"][:1] != [len(meta["items"])]:
        return f"{js} does not describe shard {k}"
    try:
        size = os.path.getsize(npy)
    except OSError:
        return f"{npy} is missing"
    if size != meta["bytes"]:
        return f"{npy} has {size} bytes, {meta['bytes']} expected"
    try:
        with open(npy, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            f.seek(0)
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except (OSError, ValueError) as e:
        return f"{npy} does not load ({e})"
    if list(shape) != meta["shape"] or dtype.name != meta["dtype"]:
        return f"{npy} holds a {dtype.name} array of shape {tuple(shape)}, not {meta['dtype']} {tuple(meta['shape'])}"
    if h.hexdigest() != meta["sha256"]:
        return f"{npy} fails its checksum (sha256 recorded in {js})"
    return None


def _unfinished(out_dir, shards, shard_size: int, n: int, digest: str) -> list:
    """The shards among ``shards`` to compute: those not finished, and those whose files are
    not whole (warned about, and their ``.json`` removed so they count as unfinished)."""
    todo = []
    for k in shards:
        js = shard_paths(out_dir, k)[1]
        if not os.path.exists(js):
            todo.append(k)
            continue
        problem = _shard_problem(out_dir, k, shard_size, n, digest)
        if problem is not None:
            warnings.warn(f"shard {k} is damaged: {problem}; computing it again", stacklevel=3)
            _remove(js)
            todo.append(k)
    return todo


def _check_settings(out_dir, settings: dict) -> bool:
    """Whether ``out_dir`` may take a run of ``settings``: refused (ValueError) where it holds
    finished shards of other settings.  True where its ``run.json`` is another run's that
    finished nothing (it failed or was stopped before its first shard): it is replaced."""
    path = os.path.join(out_dir, "run.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        old = json.loads(raw)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        what = "is empty" if not raw.strip() else f"is corrupt ({e})"
        raise ValueError(f"{path} {what}: delete it and run the command again (the finished shards made with the "
                         "same settings are kept, the others are computed again)") from None
    old.pop("batch_size", None)   # recorded for the reader, not a setting (see attribute_dataset)
    if old == settings:
        return False
    if not _holds_results(out_dir):
        return True
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    raise ValueError(f"{out_dir!r} holds a run with different settings ({', '.join(diff)} differ; "
                     f"see {path}); use another output folder, or the same settings to resume")


def _holds_results(out_dir) -> bool:
    """A finished shard (its ``.json`` is written last) or an index in ``out_dir``."""
    if os.path.exists(os.path.join(out_dir, "index.jsonl")):
        return True
    try:
        return any(re.fullmatch(r"shard-\d+\.json", f) for f in os.listdir(os.path.join(out_dir, "shards")))
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- files
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_TMP = re.compile(r"^\..+\.(\d+)(?:-([A-Za-z0-9_]+))?\.[0-9a-f]{8}\.tmp$")   # also the old .NAME.PID.X.tmp


def _tmp_name(path) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base}.{os.getpid()}-{_HOST}.{uuid.uuid4().hex[:8]}.tmp")


def _write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder,
    flushed to disk (fsync), renamed over ``path``, and the folder flushed.  An OSError
    becomes :class:`OutputError` naming ``path``; the temporary file is removed."""
    path = os.fspath(path)
    tmp = _tmp_name(path)
    try:
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_folder(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; {RESUME_NOTE}", e.errno) from e


def _fsync_folder(folder) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be synced."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _remove(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputError(f"cannot remove {path}: {e.strerror or e}; {RESUME_NOTE}", e.errno) from e


def _alive(pid: int, host: str | None) -> bool:
    """Whether the process that named a temporary file may still be writing it."""
    if host not in (None, _HOST):
        return False            # another machine's: at the start of a run no process of it writes here
    if os.name != "posix":
        return True             # no safe liveness probe (os.kill would end the process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _prepare_folder(out_dir) -> None:
    """Create ``out_dir/shards``, prove it writable and remove temporary files of dead runs;
    :class:`OutputError` saying what to do otherwise."""
    out_dir = os.fspath(out_dir)
    shards = os.path.join(out_dir, "shards")
    for folder in (out_dir, shards):
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise OutputError(f"{folder} exists but is not a folder: move it away or use another output folder",
                              errno.ENOTDIR)
    try:
        os.makedirs(shards, exist_ok=True)
        probe = _tmp_name(os.path.join(shards, "probe"))
        with open(probe, "xb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to {shards}: {e.strerror or e}; {RESUME_NOTE}", e.errno) from e
    for folder in (out_dir, shards):
        for name in os.listdir(folder):
            m = _TMP.match(name)
            if m and not _alive(int(m.group(1)), m.group(2)):
                _remove(os.path.join(folder, name))


class DistributedRunError(RuntimeError):
    """A process of a torchrun job failed; raised in every process of the job."""


class _Ranks:
    """Failure-aware synchronisation of the processes of a torchrun job.

    Every process reaches the same sequence of check points (one per :meth:`step` and
    one per round of ``world`` shards, :meth:`through_round`); at each, all processes
    exchange whether they failed (``all_gather_object``).  A process that fails goes
    straight to its next check point with the error, so the others stop there (within
    one shard) instead of waiting forever, and every process raises
    :class:`DistributedRunError` naming the failed rank(s) and the cause.
    """

    def __init__(self, world: int, rank: int):
        self.world, self.rank, self.rounds = world, rank, 0

    @contextlib.contextmanager
    def step(self):
        """Run the block, then check in (with its error if it failed)."""
        try:
            yield
        except DistributedRunError:
            raise
        except Exception as e:
            self.check(e)                    # raises
        self.check()

    def through_round(self, j: int) -> None:
        """Check in for every round up to ``j`` not checked yet."""
        while self.rounds <= j:
            self.rounds += 1
            self.check()

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (all ranks must call it at the same point)."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def check(self, error: Exception | None = None) -> None:
        if self.world == 1:
            if error is not None:
                raise error
            return
        if error is not None:
            traceback.print_exception(type(error), error, error.__traceback__)
        reports = [None] * self.world
        torch.distributed.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
        failed = [f"rank {r} of {self.world} failed: {m}" for r, m in enumerate(reports) if m is not None]
        if failed:
            raise DistributedRunError("; ".join(failed) + f" (seen by rank {self.rank}; every rank stopped, "
                                      "finished shards are kept: run the same command again to resume)") from error


def _init_distributed() -> tuple[int, int, bool]:
    """(world size, rank, whether this call created the process group)."""
    import torch.distributed as dist

    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, False
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), False
    if torch.cuda.is_available():                                       # one GPU per process
        local, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= gpus:
            raise RuntimeError(f"local rank {local} needs GPU {local} but {gpus} GPU(s) are visible: start at most "
                               f"{gpus} processes per node (torchrun --nproc-per-node {gpus}), or run on the CPU "
                               "with CUDA_VISIBLE_DEVICES=")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size(), dist.get_rank(), True
