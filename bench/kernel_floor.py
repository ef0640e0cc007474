"""Each fused primitive's measured time against its own floor, per backend.

The floor of one call is ``max(FLOPs / matrix rate, bytes / bandwidth)`` (../kernels/README.md):
FLOPs of the products it must form, bytes of its inputs read once and its outputs written
once.  Both ceilings are measured first, in the same run: a large device-to-device copy
(bytes read plus written) and a large matrix product in the precision the layer runs in
(TF32 for CUDA convs while ``torch.backends.cudnn.allow_tf32`` is on, as in torch; else
fp32).  One cuDNN/ATen convolution of each layer is timed beside them as the unit the
speed goals count in ("convolution equivalents").

    python bench/kernel_floor.py --out bench/results/<name>        # VGG16 / ResNet50 layers, batch 64
    python bench/kernel_floor.py --quick --out /tmp/floor          # small shapes, any machine

writes ``<name>.json`` (every row) and ``<name>.md`` (the table for kernels/README.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import relprop
from relprop.ops.dispatch import default_device, operations, resolve_backend
from relprop import ops

# name, (C, O, kernel, stride, padding, input size): VGG16 and ResNet50 layers that cover
# the kernel sizes, channel counts and resolutions of the two nets, plus their linear heads.
LAYERS = [
    ("vgg16 conv1_2", (64, 64, 3, 1, 1, 224)),
    ("vgg16 conv2_2", (128, 128, 3, 1, 1, 112)),
    ("vgg16 conv3_3", (256, 256, 3, 1, 1, 56)),
    ("vgg16 conv4_3", (512, 512, 3, 1, 1, 28)),
    ("vgg16 conv5_3", (512, 512, 3, 1, 1, 14)),
    ("resnet50 layer1 1x1", (64, 256, 1, 1, 0, 56)),
    ("resnet50 layer3 3x3 s2", (256, 256, 3, 2, 1, 28)),
    ("resnet50 layer4 1x1", (512, 2048, 1, 1, 0, 7)),
    ("vgg16 fc6", (25088, 4096, None, None, None, None)),
    ("vgg16 fc7", (4096, 4096, None, None, None, None)),
]
QUICK_LAYERS = [
    ("conv 3x3", (16, 32, 3, 1, 1, 16)),
    ("conv 1x1 s2", (32, 16, 1, 2, 0, 16)),
    ("linear", (256, 128, None, None, None, None)),
]
#: The timed calls (``prepare`` builds each, ``cost`` counts it); "rap" is rap-conv or rap-linear.
PRIMITIVES = ("split_scale rap", "split_scale zplus", "split_backward pa+shift", "split_backward zplus",
              "shift_nonzero", "ae_masses")


@dataclass
class Layer:
    name: str
    module: nn.Module
    x: torch.Tensor            # the layer input (non-negative, with exact zeros, as after a ReLU)
    y_shape: torch.Size        # the layer output's shape

    @property
    def flops(self) -> float:
        """F: the FLOPs of one product (2 per multiply-add), as torch's FlopCounterMode counts them."""
        y = self.y_shape.numel()
        w = self.module.weight
        return 2.0 * y * w[0].numel()


def make_layer(name, spec, batch, device, dtype) -> Layer:
    c, o, k, s, p, size = spec
    if k is None:
        module = nn.Linear(c, o)
        x = torch.randn(batch, c, device=device, dtype=dtype).relu()
    else:
        module = nn.Conv2d(c, o, k, stride=s, padding=p)
        x = torch.randn(batch, c, size, size, device=device, dtype=dtype).relu()
    module = module.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        y_shape = module(x).shape
    return Layer(name, module, x, y_shape)


def cost(layer: Layer, primitive: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call: the products it forms, its inputs read once and its
    outputs written once (weights read once; W+ / V2 are formed on the fly)."""
    a, y = layer.x.numel(), layer.y_shape.numel()
    p, f = layer.module.weight.numel(), layer.flops
    e = layer.x.element_size()
    flops, elements = {
        "split_scale rap": (2 * f, a + p + y + 2 * y),         # x, W, R -> S1, S2
        "split_scale zplus": (f, a + p + y + y),                    # x, W, R -> S1
        "split_backward pa+shift": (2 * f, 2 * y + p + a + a),      # S1, S2, W, x -> C (shifted)
        "split_backward zplus": (f, y + p + a + a),                 # S1, W, x -> C
        "shift_nonzero": (0.0, a + a),                              # C -> C'
        "ae_masses": (0.0, a + 2 * a),                              # R -> T, O
    }[primitive]
    return flops, float(elements * e)


def prepare(layer: Layer, primitive: str, module):
    """A zero-argument call of ``primitive`` on ``module`` (a backend) with fresh inputs."""
    lin = ops.LinearMap(layer.module)
    x = layer.x
    dev, dt = x.device, x.dtype
    r = torch.randn(layer.y_shape, device=dev, dtype=dt)
    rule = "rap-conv" if isinstance(layer.module, nn.Conv2d) else "rap-linear"
    if primitive == "split_scale rap":
        return lambda: module.split_scale(lin, x, r, rule)
    if primitive == "split_scale zplus":
        return lambda: module.split_scale(lin, x, r, "alphabeta-repo", 1.0, 0.0)
    s1, s2 = torch.randn_like(r), torch.randn_like(r)
    if primitive == "split_backward pa+shift":
        shift_to = torch.randn(x.shape[0], device=dev, dtype=dt)
        return lambda: module.split_backward(lin, x, s1, s2, "pa", shift_to)
    if primitive == "split_backward zplus":
        return lambda: module.split_backward(lin, x, s1, None, "pn")
    c = torch.randn_like(x) * (x > 0)
    if primitive == "shift_nonzero":
        excess = torch.randn(x.shape[0], *([1] * (x.ndim - 1)), device=dev, dtype=dt)
        return lambda: module.shift_nonzero(c, excess)
    return lambda: module.ae_masses(c)


def median_seconds(fn, device: torch.device, budget_s: float = 0.5) -> float:
    """Median time of ``fn`` after a warm-up: CUDA events on a GPU, the wall clock on CPU."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 200):
        if device.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """Measured bandwidth (bytes/s, read + write) and matrix rates (FLOP/s): fp32 in full
    precision, TF32, and the conv precision torch uses for this device."""
    n = 1 << (22 if quick else 28 if device.type == "cuda" else 26)
    src = torch.randn(n, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / median_seconds(lambda: dst.copy_(src), device)
    m = 512 if quick else 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    rates = {}
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, tf32 in (("ieee", False), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            rates[name] = 2 * m ** 3 / median_seconds(lambda: a @ b, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    conv_tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return {"bandwidth": bw, "matmul_ieee": rates["ieee"], "matmul_tf32": rates["tf32"],
            "conv_rate": rates["tf32" if conv_tf32 else "ieee"], "conv_precision": "tf32" if conv_tf32 else "ieee"}


def reference_conv(layer: Layer):
    """One plain layer product (cuDNN / ATen): the unit "1F" of the speed goals."""
    m, x = layer.module, layer.x
    w = m.weight.detach()
    if isinstance(m, nn.Conv2d):
        return lambda: torch.nn.functional.conv2d(x, w, None, m.stride, m.padding)
    return lambda: torch.nn.functional.linear(x, w)


def run(layers, batch, device, dtype, backends, quick, save) -> dict:
    """Every (layer, primitive, backend) row; ``save(result)`` after each layer, so a run cut
    short still leaves the layers it finished."""
    ceil = ceilings(device, dtype, quick)
    rows = []
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "batch": batch, "torch": torch.__version__,
              "ceilings": ceil, "rows": rows}
    for name, spec in layers:
        layer = make_layer(name, spec, batch, device, dtype)
        is_conv = isinstance(layer.module, nn.Conv2d)
        rate = ceil["conv_rate"] if is_conv else (
            ceil["matmul_tf32"] if torch.backends.cuda.matmul.allow_tf32 and device.type == "cuda"
            else ceil["matmul_ieee"])
        one_f = median_seconds(reference_conv(layer), device)
        for primitive in PRIMITIVES:
            flops, nbytes = cost(layer, primitive)
            floor = max(flops / rate, nbytes / ceil["bandwidth"])
            for backend in backends:
                with torch.inference_mode():
                    seconds = median_seconds(prepare(layer, primitive, operations(backend)), device)
                rows.append({"layer": name, "shape": list(layer.x.shape), "primitive": primitive,
                             "backend": backend, "seconds": seconds, "floor_seconds": floor,
                             "bound": "compute" if flops / rate >= nbytes / ceil["bandwidth"] else "memory",
                             "flops": flops, "bytes": nbytes, "conv_seconds": one_f,
                             "tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9})
            print(f"{name:26s} {primitive:24s} floor {floor * 1e3:9.4g} ms  " + "  ".join(
                f"{r['backend']} {r['seconds'] * 1e3:9.4g} ms" for r in rows[-len(backends):]), flush=True)
        save(result)
    return result


def markdown(result: dict) -> str:
    c = result["ceilings"]
    lines = [f"Device {result['device']}, {result['dtype']}, batch {result['batch']}, torch {result['torch']}. "
             f"Measured ceilings: copy {c['bandwidth'] / 1e9:.0f} GB/s, matmul {c['matmul_ieee'] / 1e12:.1f} "
             f"TFLOP/s fp32 / {c['matmul_tf32'] / 1e12:.1f} TF32 (convs in {c['conv_precision']}).", "",
             "| layer | primitive | floor ms (bound) | 1 conv ms | " + " | ".join(
                 f"{b} ms (x floor)" for b in dict.fromkeys(r["backend"] for r in result["rows"])) + " |",
             "|---|---|---|---|" + "---|" * len(dict.fromkeys(r["backend"] for r in result["rows"]))]
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["layer"], r["primitive"]), []).append(r)
    for (layer, primitive), rs in groups.items():
        first = rs[0]
        cells = " | ".join(f"{r['seconds'] * 1e3:.4g} ({r['seconds'] / first['floor_seconds']:.1f})" for r in rs)
        lines.append(f"| {layer} | {primitive} | {first['floor_seconds'] * 1e3:.4g} ({first['bound']}) | "
                     f"{first['conv_seconds'] * 1e3:.4g} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output path without suffix (writes .json and .md)")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run on any machine)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 64, --quick 2)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backends", default=None, help="comma-separated (default: every available one)")
    args = p.parse_args(argv)
    device = torch.device(args.device or default_device())
    names = args.backends.split(",") if args.backends else [
        n for n, v in relprop.backends(device).items() if v["available"]]
    for n in names:
        resolve_backend(n, device)       # an unavailable backend fails here, with its reason
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result):
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result))

    result = run(QUICK_LAYERS if args.quick else LAYERS, args.batch or (2 if args.quick else 64), device,
                 getattr(torch, args.dtype), names, args.quick, save)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
