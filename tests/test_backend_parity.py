"""Whole-network parity of the fast backends with the reference: every golden case (the
authors' code on small nets: the in-repository subset always, the full set when present)
and the Zennit-compatible composites on torchvision VGG16 / ResNet50 give the same maps
with ``backend="cuda"`` / ``"triton"`` as with ``"torch"``.

Runs on CUDA tensors when torch sees a GPU (TF32 off, so fp32 is compared as fp32).  On a
CPU machine the ``cuda`` backend runs the op library's CPU kernels (JIT-built by the
``ext`` fixture) and Triton is skipped here: its interpreter is too slow for 224x224 nets
(tests/test_triton_kernels.py checks it whole-network on a tiny CNN)."""
import importlib

import pytest
import torch

import golden_adapter
import relprop
from conftest import GOLDEN_CASES, CountingOps, load_golden_case
from relprop.ops import dispatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative L2 to the torch backend on the same device.  fp32 differs by summation order
# only (observed up to 1.7e-5, on AE r=2, whose layers sum to ~0 by design); fp64 is exact
# up to rounding.  Triton computes float64 with the reference, so it is compared in fp32.
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    name = request.param
    if name == "triton" and DEVICE.type == "cpu":
        pytest.skip("Triton's CPU interpreter is too slow for 224x224 nets (see test_triton_kernels.py)")
    if name == "cuda" and DEVICE.type == "cpu":
        request.getfixturevalue("ext")          # the CPU op library stands in for relprop._C
    info = relprop.backends(DEVICE)[name]
    if not info["available"]:
        pytest.skip(f"backend {name!r} unavailable on {DEVICE.type}: {info['reason']}")
    return name


@pytest.fixture
def native_calls(backend, monkeypatch):
    """For the ``cuda`` backend, the dict of its native op calls (filled while the test runs),
    so that a backend that fell back to the reference everywhere cannot pass."""
    if backend != "cuda":
        return None
    extension = importlib.import_module("relprop.ops.cuda")   # importable once the ops are registered
    dispatch.self_check("cuda", DEVICE, torch.float32)        # once per process; not counted
    dispatch.self_check("cuda", DEVICE, torch.float64)
    counting = CountingOps(extension._OPS)
    monkeypatch.setattr(extension, "_OPS", counting)
    return counting.calls


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", GOLDEN_CASES)
def test_golden_case_on_the_backend(path, dtype, backend, native_calls):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend computes float64 with the reference")
    case, golden_models = load_golden_case(path)
    name = case["name"]
    model = golden_models.build(case["arch"])
    model.load_state_dict(case["state_dict"], strict=True)
    model = model.eval().to(DEVICE, dtype)
    x, target = case["input"].to(DEVICE, dtype), case["target"].to(DEVICE)
    ref = golden_adapter.explain(model, x, target, case["method"], case["params"], backend="torch")
    got = golden_adapter.explain(model, x, target, case["method"], case["params"], backend=backend)
    assert native_calls is None or native_calls, f"{name}: the {backend} backend ran no native op"
    assert _rel_l2(got, ref) < TOL[dtype]
    tol = 1e-2 if case["arch"]["family"] == "resnet" else 1e-4    # the golden README's own bound
    assert _rel_l2(got.cpu(), case["relevance"]) < tol


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
@pytest.mark.parametrize("method", ["lrp-epsilon-plus-flat", "lrp-epsilon-alpha2beta1-flat", "lrp-zplus", "rap"])
def test_torchvision_models_on_the_backend(arch, method, backend, native_calls):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = model.eval().to(DEVICE)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    target = torch.tensor([417, 3], device=DEVICE)
    ref = relprop.Explainer(model, method, backend="torch")(x, target)
    got = relprop.Explainer(model, method, backend=backend)(x, target)
    assert native_calls is None or native_calls, f"the {backend} backend ran no native op"
    assert _rel_l2(got, ref) < TOL[torch.float32]
