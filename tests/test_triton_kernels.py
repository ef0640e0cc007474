"""The Triton backend (relprop.kernels) beyond the per-primitive comparisons of
tests/test_primitives.py: conservation of the fused shift, whole networks with the reference
unreachable, and (no GPU needed) compilation of representative variants to a Hopper (sm_90)
cubin.  On CPU under Triton's interpreter (TRITON_INTERPRET=1 in the environment of the
process), or on CUDA tensors with the compiled kernels where a GPU is visible.  Every
output buffer the kernels allocate is poisoned with NaN.

Whole networks in fp32 agree with the reference to ``rtol=1e-4, atol=1e-5*max|ref|``.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

#: Compiled kernels on CUDA tensors where a GPU is visible, else the interpreter on CPU
#: tensors.  TRITON_INTERPRET is process-wide and must be set before Triton is first
#: imported, so on CPU this module runs in its own process with the variable set
#: (``make test`` does that); the rest of the suite runs without it.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("on CPU the Triton kernels run only under the interpreter: "
                "TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py (make test runs it)",
                allow_module_level=True)

pytest.importorskip("triton")

import relprop  # noqa: E402
from op_cases import make_layer  # noqa: E402
from relprop.ops import dispatch, reference  # noqa: E402

import relprop.kernels as kernels  # noqa: E402
from relprop.kernels import _common  # noqa: E402


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor and layer a test makes lives on DEVICE; the CUDA reference in full fp32."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON", float("nan"))


def assert_matches(got, ref, rtol=1e-4, atol=1e-5):
    """``got`` equals ``ref`` to ``rtol`` and ``atol * max|ref|``."""
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * ref.abs().max().item())


def test_shifted_backward_conserves_relevance():
    lin, x, r = make_layer("3x5-s2")
    s1, s2 = kernels.split_scale(lin, x, r, "rap-conv")
    c = kernels.split_backward(lin, x, s1, s2, "pa", shift_to=r.flatten(1).sum(1))
    torch.testing.assert_close(c.flatten(1).sum(1), r.flatten(1).sum(1), rtol=1e-4, atol=1e-4)
    unshifted = kernels.split_backward(lin, x, s1, s2, "pa")
    assert (unshifted == 0).any() and torch.equal(c == 0, unshifted == 0)   # only non-zero entries move


# ---------------------------------------------------------------- whole networks

def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(6, 5, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 3 * 3, 7), nn.ReLU(), nn.Linear(7, 3)).eval()


@pytest.fixture
def reference_disabled(monkeypatch):
    """Make the reference fused primitives unreachable, so every call must run a kernel (the
    backend's self-check, which compares with the reference, has run before)."""
    dispatch.self_check("triton", DEVICE, torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("the triton backend fell back to the reference")
    for name in dispatch.PRIMITIVES:
        monkeypatch.setattr(reference, name, refuse)


@pytest.mark.parametrize("method", ["rap", "lrp-alphabeta", "lrp-zplus", "lrp-epsilon-plus", "lrp-rap-repo",
                                    "clrp", "sglrp", "ae", "rsp"])
def test_network_parity(method, request):
    model, x = tiny_cnn(), torch.rand(2, 3, 8, 8)
    init = {"init_layer": "5"} if method in ("ae", "rsp") else {}
    ref = relprop.Explainer(model, method, backend="torch", **init)(x)
    request.getfixturevalue("reference_disabled")
    got = relprop.Explainer(model, method, backend="triton", **init)(x)
    assert_matches(got, ref)


# ---------------------------------------------------------------- GPU compilation

SM90_COMPILE = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from relprop.kernels import elementwise as E, split_conv as C, split_linear as L

def signature(fn, dtype):
    def kind(name):
        if name in ("sum_ptr", "pos_ptr", "neg_ptr"):
            return "*fp32"
        if name == "cnt_ptr":
            return "*i32"
        return "*" + dtype if name.endswith("_ptr") else "fp32" if name in ("alpha", "beta", "eps") else "i32"
    return {p.name: "constexpr" if p.is_constexpr else kind(p.name) for p in fn.params}

tiles = dict(BM=64, BN=64, BK=32)
cases = [
    (C._split_conv_fwd_kernel, "fp32", dict(KH=3, KW=3, RULE=0, TWO=True, ABS_NEG=True, HAS_BIAS=False,
                                            PRECISION="tf32", **tiles)),
    (C._split_conv_fwd_kernel, "fp16", dict(KH=3, KW=5, RULE=2, TWO=True, ABS_NEG=False, HAS_BIAS=True,
                                            PRECISION="tf32", **tiles)),
    (C._split_conv_fwd_kernel, "bf16", dict(KH=1, KW=1, RULE=1, TWO=True, ABS_NEG=True, HAS_BIAS=False,
                                            PRECISION="tf32", **tiles)),
    (C._split_conv_bwd_kernel, "fp16", dict(KH=7, KW=7, TWO=True, ABS_NEG=True, STATS=True, PRECISION="tf32", **tiles)),
    (L._split_linear_bwd_kernel, "bf16", dict(TWO=True, ABS_NEG=True, STATS=False, PRECISION="tf32", **tiles)),
    (L._split_linear_fwd_kernel, "fp32", dict(RULE=3, TWO=False, ABS_NEG=False, HAS_BIAS=False, PRECISION="ieee",
                                              **tiles)),
    (L._split_linear_bwd_kernel, "fp32", dict(TWO=True, ABS_NEG=False, STATS=True, PRECISION="ieee", **tiles)),
    (E._shift_kernel, "bf16", dict(FROM_SUM=True, BLOCK=1024)),
    (E._masses_kernel, "fp16", dict(BLOCK=1024)),
]
gemms = (C._split_conv_fwd_kernel, C._split_conv_bwd_kernel, L._split_linear_fwd_kernel, L._split_linear_bwd_kernel)
for fn, dtype, consts in cases:
    k = triton.compile(ASTSource(fn, signature(fn, dtype), consts), target=GPUTarget("cuda", 90, 32))
    assert k.asm["cubin"], fn
    if fn in gemms and dtype in ("fp16", "bf16"):   # half-precision tiles go to Hopper's tensor cores
        assert "wgmma" in k.asm["ptx"], (fn.__name__, dtype)
print("compiled", len(cases))
'''


def test_kernels_compile_for_sm90(tmp_path):
    """Representative variants go through Triton's whole NVIDIA pipeline to a Hopper cubin
    (no GPU needed), in a fresh process without the interpreter and a fresh cache."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "compiled 9"
