"""Peak memory of one attribution call, each case in a fresh process, as a multiple of the
gradient pass's.

On CPU a case's peak is the rise of the process's peak resident set (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs``) over its resident set just
before the call: a fresh process whose heap is trimmed (``malloc_trim``) first, so the
allocator has nothing to reuse and the rise is what the call needs (an in-process RSS delta
reads 0 once freed memory is reused).  On CUDA it is ``torch.cuda.max_memory_allocated()``
after ``reset_peak_memory_stats()``, above the memory allocated before the call.  Before the
measured call the model, its weights and the input exist; nothing else has run (the first
call pays the capture, which is small beside the activations).

Run::

    python bench/memory.py --out bench/results/memory-cpu-2cores-DATE     # .json and .md
    python bench/memory.py --models vgg16 --cases gradient rap --batch 8

Cases: ``forward`` (no_grad), ``gradient`` (autograd input gradient of the target logit:
the reference every other case is divided by), each relprop method (``relprop:<method>``,
optionally ``@<backend>``), Zennit's composites (``zennit:<Composite>``) and Captum's LRP
(``captum:LRP``) when installed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

DEFAULT_CASES = ["forward", "gradient", "relprop:gradient", "relprop:lrp-epsilon-plus-flat",
                 "relprop:lrp-epsilon-alpha2beta1-flat", "relprop:lrp-epsilon", "relprop:clrp", "relprop:sglrp",
                 "relprop:rap", "relprop:rsp", "relprop:ae", "zennit:EpsilonPlusFlat",
                 "zennit:EpsilonAlpha2Beta1Flat"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _model(name: str):
    import torchvision
    return getattr(torchvision.models, name)(weights=None).eval()


def _case(case: str, model_name: str, batch: int, device: str, size: int) -> dict:
    """Run one case in this process and return its peak (bytes) and wall time."""
    import torch
    torch.manual_seed(0)
    model = _model(model_name).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.arange(batch, device=device) % 1000

    kind, _, spec = case.partition(":")
    if kind == "forward":
        def call():
            with torch.no_grad():
                model(x)
    elif kind == "gradient":
        def call():
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xi)
            return g
    elif kind == "relprop":
        import relprop
        method, _, backend = spec.partition("@")
        explainer = relprop.Explainer(model, method, backend=backend or "auto")

        def call():
            return explainer(x, target=target)
    elif kind == "zennit":
        from zennit import composites
        from zennit.attribution import Gradient
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
        canonizer = ResNetCanonizer() if "resnet" in model_name else VGGCanonizer()
        composite = getattr(composites, spec)(canonizers=[canonizer])

        def call():
            with Gradient(model=model, composite=composite) as attributor:
                _, rel = attributor(x, torch.nn.functional.one_hot(target, 1000).to(x.dtype))
            return rel
    elif kind == "captum":
        from captum.attr import LRP

        def call():
            return LRP(model).attribute(x, target=target)
    else:
        raise SystemExit(f"unknown case {case!r}")

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        from relprop.attribute import trim_heap
        trim_heap()   # what the model's set-up freed is not counted as memory the call already has
        if os.access("/proc/self/clear_refs", os.W_OK):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # the peak so far (the set-up's) is not the call's
        base = _status_kib("VmRSS") * 1024
    t = time.perf_counter()
    out = call()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base
    seconds = time.perf_counter() - t
    del out
    return {"case": case, "model": model_name, "batch": batch, "device": device, "size": size,
            "peak_bytes": max(peak, 0), "seconds": seconds}


def run(models, cases, batch, device, size, deadline: float | None = None) -> list[dict]:
    rows = []
    for model_name in models:
        for case in cases:
            if deadline is not None and time.time() > deadline:
                print(f"{model_name:10s} {case:40s} skipped: past the deadline", file=sys.stderr)
                continue
            cmd = [sys.executable, __file__, "--one", case, "--models", model_name, "--batch", str(batch),
                   "--device", device, "--size", str(size)]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{model_name:10s} {case:40s} failed: {last}", file=sys.stderr)
                rows.append({"case": case, "model": model_name, "batch": batch, "device": device,
                             "size": size, "error": last})
                continue
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{model_name:10s} {case:40s} {row['peak_bytes'] / 2**20:8.0f} MiB {row['seconds']:7.2f} s",
                  file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: MiB and multiple of the gradient pass per model and case."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = ["| case | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    grad = {r["model"]: r.get("peak_bytes") for r in rows if r["case"] == "gradient"}
    for case in cases:
        cells = []
        for m in models:
            r = next((r for r in rows if r["model"] == m and r["case"] == case), None)
            if r is None or "error" in r:
                cells.append("failed" if r else "")
                continue
            mib = r["peak_bytes"] / 2**20
            ratio = f" ({r['peak_bytes'] / grad[m]:.2f}x)" if grad.get(m) else ""
            cells.append(f"{mib:.0f} MiB{ratio}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg16", "resnet50"])
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    p.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--deadline", type=float, default=None,
                   help="Unix time after which cases not yet started are skipped (the tables are still written)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # internal: run one case here
    a = p.parse_args(argv)
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = a.batch or (64 if a.device == "cuda" else 8)
    if a.one:
        print(json.dumps(_case(a.one, a.models[0], batch, a.device, a.size)))
        return
    rows = run(a.models, a.cases, batch, a.device, a.size, a.deadline)
    md = table(rows)
    print(md)
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": platform.node(),
                "cpus": os.cpu_count(), "device": a.device, "batch": batch, "size": a.size}
        with open(a.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(f"Peak memory per call, fresh process per case ({a.device}, batch {batch}, {a.size}x{a.size}, "
                    f"fp32, random weights; commit {commit}, {meta['date']}); multiples of the gradient pass.\n\n")
            f.write(md)


if __name__ == "__main__":
    main()
