"""Throughput and peak memory of relprop's methods beside the gradient floor and the peers.

Each benchmark group is one (model, batch, device): a plain forward, a forward+backward
gradient, relprop's methods, and Zennit's (and Captum's) equivalent composites, all timed
in the same run so ratios are meaningful.  ``bench/report.py`` turns the JSON into tables.
"""
import importlib.util

import pytest
import torch

import relprop
from conftest import PeakMemory, _rss_bytes, batch_sizes, devices

torchvision = pytest.importorskip("torchvision")

MODELS = {"small-vgg": 64, "vgg16": 224, "resnet50": 224}   # name -> input size
RELPROP = ["lrp-epsilon", "lrp-epsilon-plus-flat", "lrp-epsilon-alpha2beta1-flat", "lrp-rap-repo",
           "rap", "rsp", "ae", "clrp", "sglrp"]
ZENNIT = ["lrp-epsilon", "lrp-epsilon-plus-flat", "lrp-epsilon-alpha2beta1-flat"]
BACKENDS = [b for b in ("torch", "triton", "cuda") if relprop.backends()[b]["available"]]


def build(name, device):
    torch.manual_seed(0)
    if name == "small-vgg":
        cfg = [16, 16, "M", 32, 32, "M", 64, 64, "M"]
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(2))
            else:
                layers += [torch.nn.Conv2d(c, v, 3, padding=1), torch.nn.ReLU(inplace=True)]
                c = v
        model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                    torch.nn.Linear(64 * 16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    else:
        model = getattr(torchvision.models, name)(weights=None)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval().to(device)


def zennit_composite(method, model_name):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonAlpha2Beta1Flat, EpsilonPlusFlat, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    canon = [ResNetCanonizer()] if model_name == "resnet50" else [SequentialMergeBatchNorm()]
    if method == "lrp-epsilon":
        return LayerMapComposite(layer_map_base() + [(Convolution, Epsilon()), (torch.nn.Linear, Epsilon())],
                                 canonizers=canon)
    return {"lrp-epsilon-plus-flat": EpsilonPlusFlat,
            "lrp-epsilon-alpha2beta1-flat": EpsilonAlpha2Beta1Flat}[method](canonizers=canon)


def cases():
    for device in devices():
        for model_name in MODELS:
            for batch in batch_sizes(device):
                yield device, model_name, batch, "baseline", "forward"
                yield device, model_name, batch, "baseline", "gradient"
                for backend in BACKENDS:
                    for m in RELPROP:
                        yield device, model_name, batch, f"relprop-{backend}", m
                if importlib.util.find_spec("zennit"):
                    for m in ZENNIT:
                        yield device, model_name, batch, "zennit", m
                if importlib.util.find_spec("captum"):
                    yield device, model_name, batch, "captum", "lrp-epsilon"


def _ident(case):
    device, model_name, batch, impl, method = case
    return f"{device}-{model_name}-b{batch}-{impl}-{method}"


def make_call(impl, method, model, model_name):
    if impl == "baseline" and method == "forward":
        def call(x, t):
            with torch.no_grad():
                return model(x)
        return call
    if impl == "baseline":
        def call(x, t):
            x = x.detach().requires_grad_(True)
            out = model(x)
            (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), x)
            return g
        return call
    if impl.startswith("relprop"):
        explainer = relprop.Explainer(model, method, backend=impl.split("-", 1)[1])
        return lambda x, t: explainer(x, t)
    if impl == "zennit":
        from zennit.attribution import Gradient
        composite = zennit_composite(method, model_name)

        def call(x, t):
            onehot = torch.nn.functional.one_hot(t, 1000 if model_name != "small-vgg" else 10).to(x)
            with Gradient(model, composite) as attributor:
                _, rel = attributor(x, lambda out: out * onehot)
            return rel
        return call
    from captum.attr import LRP
    lrp = LRP(model)
    return lambda x, t: lrp.attribute(x, target=t)


@pytest.mark.parametrize("case", list(cases()), ids=_ident)
def test_throughput(benchmark, model_cache, case):
    device, model_name, batch, impl, method = case
    key = (model_name, device)
    if key not in model_cache:
        model_cache[key] = build(model_name, device)
    model = model_cache[key]
    size = MODELS[model_name]
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        t = model(x).argmax(1)
    call = make_call(impl, method, model, model_name)
    try:
        with PeakMemory(device) as mem:   # the warm-up call: capture and weight caches count too
            call(x, t)
    except Exception as e:                # Captum's LRP rejects some layer types: not comparable there
        if impl != "captum":
            raise
        pytest.skip(f"Captum's LRP cannot explain {model_name}: {type(e).__name__}: {str(e)[:200]}")

    def timed():
        out = call(x, t)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    heavy = model_name != "small-vgg" and device == "cpu"
    benchmark.group = f"{device} {model_name} batch {batch}"
    benchmark.extra_info.update(device=device, model=model_name, batch=batch, impl=impl, method=method,
                                peak_memory_bytes=mem.peak, torch=torch.__version__,
                                device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    benchmark.pedantic(timed, rounds=3 if heavy else 10, warmup_rounds=0)


def test_memory_is_flat_over_100_batches(benchmark):
    """Memory held after each of 100 repeated RAP batches (CUDA: allocated bytes and per-call
    peak; CPU: resident set size) -- flat when nothing accumulates across calls."""
    device = devices()[0]
    model = build("small-vgg", device)
    explainer = relprop.Explainer(model, "rap")
    x = torch.randn(8, 3, 64, 64, device=device)
    held, peaks = [], []

    def hundred():
        for _ in range(100):
            with PeakMemory(device) as mem:
                explainer(x)
            peaks.append(mem.peak)
            held.append(torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes())

    benchmark.group = f"{device} memory"
    benchmark.pedantic(hundred, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(device=device, model="small-vgg", batch=8, impl="relprop-torch", method="rap x100",
                                held_first10=max(held[:10]), held_last10=max(held[-10:]),
                                peak_first10=max(peaks[:10]), peak_last10=max(peaks[-10:]))
