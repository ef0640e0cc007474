"""Attribute a whole data set, in resumable shards (``relprop attribute``).

:func:`attribute_dataset` streams a dataset (normally
:class:`relprop.images.ImageFolderDataset`) through one :class:`relprop.Explainer`,
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

    {"shard": k, "row": r, "index": i, "path": "...", "label": l or null, "target": t,
     "logit": z_t, "relevance_sum": sum(R), "delta": sum(R) - z_t}

``row`` is the item's row in the shard's ``.npy``; ``index`` the image's position in the
dataset; ``delta`` the conservation error.  An image that cannot be read appears
instead as ``{"shard": k, "index": i, "path": "...", "skipped": true, "error": "..."}``
(and a warning names it).

Crash safety and resuming: each shard file is written under a temporary name in the
same folder and then renamed (:func:`os.replace`, atomic); the ``.json`` is written
*last*, so a shard counts as finished exactly when its ``.json`` exists.  Re-running the
same command skips every finished shard, so a run killed at any moment loses at most
the shards in flight.  A re-run with different settings is refused (``ValueError``).

Several processes: under ``torchrun`` (``WORLD_SIZE``/``RANK`` set) the processes join
a ``torch.distributed`` group (gloo on CPU, nccl on CUDA); shard ``k`` is done by rank
``k % world_size``, every rank writes its own shards and, after a barrier, rank 0
writes ``index.jsonl``.

Storage dtype ``float16`` halves the disk space; the computation is float32 either way.
On CUDA, an out-of-memory error halves the number of items explained at once (with a
warning) and retries.
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings

import numpy as np
import torch
from tqdm import tqdm

from .explainer import Explainer, available_methods
from .images import collate, model_fingerprint
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
    may have ``paths``, ``labels`` (needed for ``targets="label"``) and ``fingerprint()``.
    ``extra_settings`` (e.g. the model spec) join ``run.json``.  Returns a summary dict
    (``shards``, ``done`` (shards computed by this call), ``skipped_shards``, ``items``,
    ``skipped_images``).
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
        model = model.to(device)
        explainer = Explainer(model, method, **method_params)
        settings = {"format": FORMAT_VERSION, "method": method, "method_params": method_params,
                    "targets": targets if isinstance(targets, str) else list(tvalue),
                    "shard_size": shard_size, "dtype": dtype, "model": model_fingerprint(model),
                    "data": dataset.fingerprint() if hasattr(dataset, "fingerprint") else {"items": n}}
        settings.update(extra_settings or {})
        settings = json.loads(json.dumps(settings))
        _check_settings(out_dir, settings)
        _barrier(world)
        if rank == 0:
            os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
            if not os.path.exists(os.path.join(out_dir, "run.json")):
                write_atomic(os.path.join(out_dir, "run.json"), json.dumps(settings, indent=2).encode())
        _barrier(world)

        n_shards = math.ceil(n / shard_size)
        mine = [k for k in range(n_shards) if k % world == rank]
        todo = [k for k in mine if not os.path.exists(shard_paths(out_dir, k)[1])]
        batches = [list(range(s, min(s + batch_size, stop)))
                   for k in todo for stop in [min((k + 1) * shard_size, n)]
                   for s in range(k * shard_size, stop, batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                             collate_fn=collate, pin_memory=device.type == "cuda")
        bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc="attributing",
                   disable=not progress or rank != 0 or None, dynamic_ncols=True)
        state = {"chunk": batch_size * (tvalue if kind == "topk" else len(tvalue) if kind == "list" else 1)}
        paths = getattr(dataset, "paths", None)
        current, rel, items, skipped = None, [], [], []
        for x, indices, bad in (loader if batches else ()):
            k = (indices or [b[0] for b in bad])[0] // shard_size
            if current is not None and k != current:
                _write_shard(out_dir, current, shard_size, n, rel, items, skipped, dtype, rank)
                rel, items, skipped = [], [], []
            current = k
            for i, err in bad:
                path = paths[i] if paths else None
                warnings.warn(f"skipping unreadable image {path or i}: {err}", stacklevel=2)
                skipped.append({"shard": k, "index": i, "path": path, "skipped": True, "error": err})
            if x is not None:
                x = x.to(device, non_blocking=True)
                r, logit, tgt, reps = _explain(explainer, x, indices, kind, tvalue, labels, state)
                r_sum = r.flatten(1).double().sum(1).cpu().tolist()
                for j, (t, z, s) in enumerate(zip(tgt.cpu().tolist(), logit.cpu().tolist(), r_sum)):
                    i = indices[j // reps]
                    items.append({"shard": k, "row": len(items), "index": i,
                                  "path": paths[i] if paths else None,
                                  "label": labels[i] if labels is not None else None,
                                  "target": t, "logit": z, "relevance_sum": s, "delta": s - z})
                rel.append(r.to(torch.float16 if dtype == "float16" else torch.float32).cpu().numpy())
            bar.update(len(indices) + len(bad))
        if current is not None:
            _write_shard(out_dir, current, shard_size, n, rel, items, skipped, dtype, rank)
        bar.close()

        _barrier(world)
        summary = {"shards": n_shards, "done": len(todo), "skipped_shards": len(mine) - len(todo)}
        if rank == 0:
            summary.update(write_index(out_dir, n_shards))
        return summary
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


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
    targets go through one batched pass.  On CUDA out-of-memory the number of items per
    pass (``state["chunk"]``) is halved and the batch retried.
    """
    b = x.shape[0]
    while True:
        try:
            if kind == "predicted":
                reps, target = 1, None
            elif kind == "label":
                reps, target = 1, torch.tensor([labels[i] for i in indices], device=x.device)
            elif kind == "list":
                reps, target = len(tvalue), torch.tensor(tvalue, device=x.device).repeat(b)
            else:
                with torch.no_grad():
                    logits = torch.cat([explainer.graph.forward(c)[-1] for c in x.split(state["chunk"])])
                reps = tvalue
                if reps > logits.shape[1]:
                    raise ValueError(f"topk:{reps} but the model has only {logits.shape[1]} classes")
                target = logits.topk(reps, dim=1).indices.reshape(-1)
            xs = x.repeat_interleave(reps, dim=0) if reps > 1 else x
            outs = [explainer.attribute(xs[s:s + state["chunk"]],
                                        None if target is None else target[s:s + state["chunk"]])
                    for s in range(0, xs.shape[0], state["chunk"])]
            break
        except torch.cuda.OutOfMemoryError:
            if state["chunk"] == 1:
                raise
            state["chunk"] = max(1, state["chunk"] // 2)
            warnings.warn(f"CUDA out of memory: retrying with {state['chunk']} items at once", stacklevel=2)
            torch.cuda.empty_cache()
    r = torch.cat([o.relevance for o in outs])
    tgt = torch.cat([o.target for o in outs])
    logit = torch.cat([o.logits.gather(1, o.target[:, None])[:, 0] for o in outs])
    return r, logit, tgt, reps


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


def _init_distributed() -> tuple[int, int, bool]:
    """(world size, rank, whether this call created the process group)."""
    import torch.distributed as dist

    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, False
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size(), dist.get_rank(), True


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
