"""Attribute a whole data set, in resumable shards (``relprop attribute``).

:func:`attribute_dataset` streams a dataset (:class:`relprop.images.ImageFolderDataset`
or :class:`relprop.images.TorchvisionDataset`) through one :class:`relprop.Explainer`,
batch by batch, and writes the relevance maps to disk in shards.

Output format (``out_dir``)::

    run.json                  the settings of the run (method, parameters, targets,
                              shard size, storage dtype, model and data fingerprints);
                              a re-run must use the same ones
    shards/shard-00000.npy    relevance, numpy array (n_items, C, H, W), float32 or float16
    shards/shard-00000.json   {"shard": 0, "first": 0, "stop": S, "rank": r (the process that
                              wrote it), "items": [...], "skipped": [...]}
    ...
    index.jsonl               one JSON object per line: every shard's items, then its
                              skipped images, shard by shard in order

Shard ``k`` holds the dataset items ``[k * shard_size, (k + 1) * shard_size)`` (the
dataset order is sorted, so it is deterministic).  An image explained for several
targets (``topk:K`` or a list) gives K consecutive items.  Each item of ``items`` (and
each line of ``index.jsonl``) is::

    {"shard": k, "row": r, "index": i, "id": "...", "path": "..." or null, "label": l or null,
     "target": t, "logit": z_t, "relevance_sum": sum(R), "delta": sum(R) - z_t}

``row`` is the item's row in the shard's ``.npy``; ``index`` the image's position in the
dataset; ``id`` its stable name (``dataset.item_id(i)``: the path relative to the image
folder, or ``NAME[options]:i`` for a torchvision data set); ``path`` the image file
(null for a torchvision data set); ``label`` the data set's label; ``logit`` the
model's output ``z_t`` for the explained class ``t``; ``delta`` the conservation error.
An image that cannot be read appears instead as ``{"shard": k, "index": i, "id": "...",
"path": ..., "skipped": true, "error": "..."}`` (and a warning names it).

Crash safety and resuming: each shard file is written under a temporary name in the
same folder and then renamed (:func:`os.replace`, atomic); the ``.json`` is written
*last*, so a shard counts as finished exactly when its ``.json`` exists.  Re-running the
same command skips every finished shard, so a run killed at any moment loses at most
the shards in flight.  A re-run with different settings is refused (``ValueError``).

Several processes: under ``torchrun`` (``WORLD_SIZE``/``RANK`` set) the processes join
a ``torch.distributed`` group (gloo on CPU, nccl on CUDA); shard ``k`` is done by rank
``k % world_size``, every rank writes its own shards and, once all are done, rank 0
writes ``index.jsonl``.  The ranks check in with each other after every round of
``world_size`` shards (see :class:`_Ranks`): when one fails, all stop within a shard and
raise :class:`DistributedRunError` naming the failed rank and its error; the finished
shards stay valid for a resume.

Storage dtype ``float16`` halves the disk space; the computation is float32 either way.
On CUDA, an out-of-memory error halves the number of items explained at once (with a
warning) and retries (:func:`_in_chunks`).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import traceback
import warnings

import numpy as np
import torch
from tqdm import tqdm

from .explainer import Explainer, available_methods
from .images import collate
from .models import model_fingerprint
from .viz import write_atomic

FORMAT_VERSION = 1


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
    Returns a summary dict (``shards``, ``done`` (shards computed by this call),
    ``skipped_shards``, ``items``, ``skipped_images``).  Under torchrun, a failure in any
    process raises :class:`DistributedRunError` in every process.
    """
    method_params = dict(method_params or {})
    kind, tvalue = parse_targets(targets)
    if method not in available_methods():
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(available_methods())}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if batch_size < 1 or shard_size < 1:
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
        with ranks.step():
            model = model.to(device)
            explainer = Explainer(model, method, **method_params)
            settings = {"format": FORMAT_VERSION, "method": method, "method_params": method_params,
                        "targets": targets if isinstance(targets, str) else list(tvalue),
                        "shard_size": shard_size, "dtype": dtype, "model": model_fingerprint(model),
                        "data": dataset.fingerprint() if hasattr(dataset, "fingerprint") else {"items": n}}
            settings.update(extra_settings or {})
            settings = json.loads(json.dumps(settings))
            _check_settings(out_dir, settings)
        with ranks.step():
            if rank == 0:
                os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
                if not os.path.exists(os.path.join(out_dir, "run.json")):
                    write_atomic(os.path.join(out_dir, "run.json"), json.dumps(settings, indent=2).encode())

        n_shards = math.ceil(n / shard_size)
        mine = [k for k in range(n_shards) if k % world == rank]
        todo = [k for k in mine if not os.path.exists(shard_paths(out_dir, k)[1])]
        with ranks.step():
            _attribute_shards(explainer, dataset, todo, out_dir, n, kind, tvalue, labels, batch_size, shard_size,
                              dtype, num_workers, progress and rank == 0, device, ranks)
            ranks.through_round(math.ceil(n_shards / world) - 1)
        summary = {"shards": n_shards, "done": len(todo), "skipped_shards": len(mine) - len(todo)}
        with ranks.step():
            if rank == 0:
                summary.update(write_index(out_dir, n_shards))
        if own_group:   # every rank idle before any tears its group down (a gloo peer aborted once without)
            torch.distributed.barrier()
        return summary
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _attribute_shards(explainer, dataset, todo, out_dir, n, kind, tvalue, labels, batch_size, shard_size,
                      dtype, num_workers, progress, device, ranks) -> None:
    """Compute and write the shards ``todo``, checking in with the other ranks between rounds."""
    batches = [list(range(s, min(s + batch_size, stop)))
               for k in todo for stop in [min((k + 1) * shard_size, n)]
               for s in range(k * shard_size, stop, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc="attributing",
               disable=not progress or None, dynamic_ncols=True)
    state = {"chunk": batch_size * (tvalue if kind == "topk" else len(tvalue) if kind == "list" else 1)}
    paths = getattr(dataset, "paths", None)
    item_id = getattr(dataset, "item_id", str)
    current, rel, items, skipped = None, [], [], []
    for x, indices, bad in (loader if batches else ()):
        k = (indices or [b[0] for b in bad])[0] // shard_size
        if k != current:
            if current is not None:
                _write_shard(out_dir, current, shard_size, n, rel, items, skipped, dtype, ranks.rank)
                rel, items, skipped = [], [], []
            ranks.through_round(k // ranks.world - 1)
        current = k
        for i, err in bad:
            warnings.warn(f"skipping unreadable image {item_id(i)}: {err}", stacklevel=3)
            skipped.append({"shard": k, "index": i, "id": item_id(i), "path": paths[i] if paths else None,
                            "skipped": True, "error": err})
        if x is not None:
            x = x.to(device, non_blocking=True)
            r, logit, tgt, reps = _explain(explainer, x, indices, kind, tvalue, labels, state)
            r_sum = r.flatten(1).double().sum(1).cpu().tolist()
            for j, (t, z, s) in enumerate(zip(tgt.cpu().tolist(), logit.cpu().tolist(), r_sum)):
                i = indices[j // reps]
                items.append({"shard": k, "row": len(items), "index": i, "id": item_id(i),
                              "path": paths[i] if paths else None,
                              "label": labels[i] if labels is not None else None,
                              "target": t, "logit": z, "relevance_sum": s, "delta": s - z})
            rel.append(r.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy())
        bar.update(len(indices) + len(bad))
    if current is not None:
        _write_shard(out_dir, current, shard_size, n, rel, items, skipped, dtype, ranks.rank)
    bar.close()


def write_index(out_dir, n_shards: int) -> dict:
    """Merge the shard jsons, in order, into ``out_dir/index.jsonl``; counts of items/skipped."""
    lines, n_items, n_skipped = [], 0, 0
    for k in range(n_shards):
        with open(shard_paths(out_dir, k)[1]) as f:
            shard = json.load(f)
        for rec in shard["items"] + shard["skipped"]:
            lines.append(json.dumps(rec))
        n_items += len(shard["items"])
        n_skipped += len(shard["skipped"])
    write_atomic(os.path.join(out_dir, "index.jsonl"), ("\n".join(lines) + "\n").encode())
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
    outs = _in_chunks(lambda s, e: explainer.attribute(xs[s:e], None if target is None else target[s:e]),
                      xs.shape[0], state)
    r = torch.cat([o.relevance for o in outs])
    tgt = torch.cat([o.target for o in outs])
    logit = torch.cat([o.logits.gather(1, o.target[:, None])[:, 0] for o in outs])
    return r, logit, tgt, reps


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


def _write_shard(out_dir, k, shard_size, n, rel, items, skipped, dtype, rank) -> None:
    npy, js = shard_paths(out_dir, k)
    if rel:
        arr = np.concatenate(rel)
    else:
        arr = np.zeros((0,), dtype=np.float16 if dtype == "float16" else np.float32)
    buf = io.BytesIO()
    np.save(buf, arr)
    write_atomic(npy, buf.getvalue())
    meta = {"shard": k, "first": k * shard_size, "stop": min((k + 1) * shard_size, n), "rank": rank,
            "items": items, "skipped": skipped}
    write_atomic(js, json.dumps(meta).encode())          # last: the shard is finished now


def _check_settings(out_dir, settings: dict) -> None:
    path = os.path.join(out_dir, "run.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    if old != settings:
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ValueError(f"{out_dir!r} holds a run with different settings ({', '.join(diff)} differ; "
                         f"see {path}); use another output folder, or the same settings to resume")


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
