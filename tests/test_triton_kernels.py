"""The Triton backend (relprop.kernels) against the relprop.ops reference: on CPU under
Triton's interpreter (TRITON_INTERPRET=1 in the environment of the process), or on CUDA
tensors with the compiled kernels where a GPU is visible.

Inputs are non-negative with exact zeros (ReLU of Gaussians, plus an all-zero band so
that whole receptive fields vanish and every safe-divide guard is hit); relevance has
both signs.  Every output buffer the kernels allocate is poisoned with NaN, so an
element a kernel forgets to write fails the comparison.  With no GPU at hand, one test
also compiles representative kernel variants to a Hopper (sm_90) cubin in a subprocess.

Tolerances (scale-free: ``atol`` is relative to the reference's largest magnitude):
fp32 ``rtol=1e-4, atol=1e-5*max|ref|`` (only the summation order differs; on CUDA both
sides run with TF32 off); fp16/bf16 ``rtol=1e-2, atol=1e-2*max|ref|``, against the
reference run in fp32 on the same half-precision inputs (the kernels accumulate in fp32
and round once when storing); whole networks in fp32 ``rtol=1e-4, atol=1e-5*max|ref|``.
"""
import copy
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
from relprop import ops  # noqa: E402

import relprop.kernels as kernels  # noqa: E402
from relprop.kernels import _common, split_conv, split_linear  # noqa: E402


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


HALF = (torch.float16, torch.bfloat16)


def assert_matches(got, ref, rtol=1e-4, atol=1e-5):
    """``got`` equals ``ref`` to ``rtol`` and ``atol * max|ref|`` (a half-precision ``got``
    compared in fp32, any other in its own dtype); both None is a match."""
    if ref is None:
        assert got is None
        return
    torch.testing.assert_close(got.float() if got.dtype in HALF else got, ref, rtol=rtol,
                               atol=atol * ref.abs().max().item())


def sparse_input(*shape, dtype=torch.float32):
    """ReLU of Gaussians with zero bands: the first half of every image's rows, or of every
    sample's features and (batch > 1) the whole last sample."""
    x = torch.randn(*shape).relu()
    if x.ndim == 4:
        x[:, :, : shape[2] // 2] = 0
    else:
        x[:, : shape[1] // 2] = 0
        if shape[0] > 1:
            x[-1] = 0
    return x.to(dtype)


# (rule, alpha, beta, eps): every branch of ops.split_scale, incl. beta == 0 (z+)
RULES = [("rap-conv", 1.0, 0.0, 0.0), ("rap-linear", 1.0, 0.0, 0.0), ("alphabeta", 2.0, 1.0, 1e-2),
         ("alphabeta", 1.0, 0.0, 1e-6), ("alphabeta-repo", 2.0, 1.0, 0.0), ("alphabeta-repo", 1.0, 0.0, 0.0),
         ("zplus", 1.0, 0.0, 1e-6)]
RULE_IDS = [f"{r}-b{b:g}" for r, _, b, _ in RULES]

# (C, O, kernel, stride, padding, dilation, (H, W), batch, bias)
CONVS = [
    (3, 5, 3, 1, 1, 1, (7, 9), 1, True),              # 3x3, padding, non-square input, batch 1
    (4, 6, (3, 5), 2, (1, 2), 1, (9, 8), 2, True),    # non-square kernel, stride 2
    (5, 17, 1, 1, 0, 1, (4, 5), 2, False),            # 1x1, 17 channels, no bias
    (3, 4, 7, 2, 3, 1, (11, 10), 2, True),            # 7x7, stride 2, padding 3
    (3, 4, 3, (2, 1), 2, 2, (9, 10), 1, True),        # dilation 2, mixed strides
    (2, 3, 3, 1, 1, 1, (3, 4), 64, True),             # batch 64, tiny
    (70, 67, 3, 2, 1, 1, (5, 6), 2, True),            # several tiles along every GEMM axis
]
CONV_IDS = ["3x3", "3x5-s2", "1x1", "7x7-s2", "dil2", "b64", "tiles"]


def conv_case(c, o, k, s, p, d, hw, b, bias, dtype=torch.float32):
    conv = nn.Conv2d(c, o, k, s, p, d, bias=bias).to(dtype)
    x = sparse_input(b, c, *hw, dtype=dtype)
    r = torch.randn_like(conv(x))
    return ops.LinearMap(conv), x, r


@pytest.mark.parametrize("rule, alpha, beta, eps", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("case", CONVS, ids=CONV_IDS)
def test_conv_split_scale_and_backward(case, rule, alpha, beta, eps):
    lin, x, r = conv_case(*case)
    ref = ops.split_scale(lin, x, r, rule, alpha, beta, eps)
    got = kernels.split_scale(lin, x, r, rule, alpha, beta, eps)
    for g, f in zip(got, ref):
        assert_matches(g, f)
    split = ops.SPLIT_RULES[rule]
    s1, s2 = ref
    shift_to = r.flatten(1).sum(1)
    for target in (None, shift_to):
        assert_matches(kernels.split_backward(lin, x, s1, s2, split, target),
                       ops.split_backward(lin, x, s1, s2, split, target))


def test_shifted_backward_conserves_relevance():
    lin, x, r = conv_case(*CONVS[1])
    s1, s2 = kernels.split_scale(lin, x, r, "rap-conv")
    c = kernels.split_backward(lin, x, s1, s2, "pa", shift_to=r.flatten(1).sum(1))
    torch.testing.assert_close(c.flatten(1).sum(1), r.flatten(1).sum(1), rtol=1e-4, atol=1e-4)
    unshifted = kernels.split_backward(lin, x, s1, s2, "pa")
    assert (unshifted == 0).any() and torch.equal(c == 0, unshifted == 0)   # only non-zero entries move


# (B, C, O, bias)
LINEARS = [(1, 7, 5, True), (3, 37, 19, False), (64, 10, 6, True), (5, 70, 67, True)]


@pytest.mark.parametrize("rule, alpha, beta, eps", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("b, c, o, bias", LINEARS, ids=["b1", "odd", "b64", "tiles"])
def test_linear_split_scale_and_backward(b, c, o, bias, rule, alpha, beta, eps):
    lin = ops.LinearMap(nn.Linear(c, o, bias=bias))
    x, r = sparse_input(b, c), torch.randn(b, o)
    ref = ops.split_scale(lin, x, r, rule, alpha, beta, eps)
    got = kernels.split_scale(lin, x, r, rule, alpha, beta, eps)
    for g, f in zip(got, ref):
        assert_matches(g, f)
    split = ops.SPLIT_RULES[rule]
    for target in (None, r.sum(1)):
        assert_matches(kernels.split_backward(lin, x, *ref, split, target),
                       ops.split_backward(lin, x, *ref, split, target))


def _copy_fp32(module):
    """An fp32 copy of a half-precision layer (its rounded weights, exactly)."""
    return copy.deepcopy(module).float()


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rule", ["rap-conv", "alphabeta"])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_half_precision_split_gemms(layer, rule, dtype):
    """fp16 / bf16 in and out, fp32 accumulation: against the fp32 reference on the same
    inputs.  (Under the interpreter a bf16 dot multiplies exact fp32 copies: epilogue.dot.)"""
    if layer == "conv":
        lin, x, r = conv_case(*CONVS[1], dtype=dtype)
    else:
        lin = ops.LinearMap(nn.Linear(37, 19).to(dtype))
        x, r = sparse_input(3, 37, dtype=dtype), torch.randn(3, 19, dtype=dtype)
    ref_lin = ops.LinearMap(_copy_fp32(lin.module))
    got = kernels.split_scale(lin, x, r, rule, 2.0, 1.0, 1e-2)
    ref = ops.split_scale(ref_lin, x.float(), r.float(), rule, 2.0, 1.0, 1e-2)
    for g, f in zip(got, ref):
        assert g.dtype == dtype
        assert_matches(g, f, rtol=1e-2, atol=1e-2)
    split, target = ops.SPLIT_RULES[rule], r.flatten(1).sum(1)
    c = kernels.split_backward(lin, x, *got, split, target)
    assert c.dtype == dtype
    assert_matches(c, ops.split_backward(ref_lin, x.float(), *(g.float() for g in got), split, target.float()),
                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (64, 2, 3, 3), (3, 2, 1500)], ids=["b1", "b64", "blocks"])
def test_shift_nonzero(shape):
    c = torch.randn(*shape).relu() * torch.randn(*shape).sign()
    c[-1] = 0                                            # no non-zero entry: the shift is SD(., 0) = 0
    excess = torch.randn(shape[0], *([1] * (len(shape) - 1)))
    excess[0] = 0
    assert_matches(kernels.shift_nonzero(c, excess), ops.shift_nonzero(c, excess))


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (64, 2, 3, 3), (3, 2, 1500)], ids=["b1", "b64", "blocks"])
def test_ae_masses(shape):
    r = torch.randn(*shape)
    r[0] = r[0].abs()                                    # no negative mass: O = 0
    r[-1] = 0                                            # nothing at all: T = O = 0
    got, ref = kernels.ae_masses(r), ops.ae_masses(r)
    for g, f in zip(got, ref):
        assert_matches(g, f)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_shift_and_masses(dtype):
    c = (torch.randn(3, 4, 50).relu() * torch.randn(3, 4, 50).sign()).to(dtype)
    excess = torch.randn(3, 1, 1).to(dtype)
    got = kernels.shift_nonzero(c, excess)
    assert got.dtype == dtype
    assert_matches(got, ops.shift_nonzero(c.float(), excess.float()), rtol=1e-2, atol=1e-2)
    for g, f in zip(kernels.ae_masses(c), ops.ae_masses(c.float())):
        assert g.dtype == dtype
        assert_matches(g, f, rtol=1e-2, atol=1e-2)


@pytest.fixture
def no_gemm_kernels(monkeypatch):
    """Any launch of a split GEMM fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched for a call that must fall back")
    for mod in (split_conv, split_linear):
        for name in ("split_scale", "split_backward"):
            monkeypatch.setattr(mod, name, refuse)


@pytest.mark.parametrize("why", ["float64", "groups"])
def test_uncovered_calls_fall_back_to_the_reference(no_gemm_kernels, why):
    dtype = torch.float64 if why == "float64" else torch.float32
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2 if why == "groups" else 1)
    lin = ops.LinearMap(conv.to(dtype))
    x = sparse_input(2, 4, 5, 6, dtype=dtype)
    r = torch.randn(2, 6, 5, 6, dtype=dtype)
    ref = ops.split_scale(lin, x, r, "rap-conv")
    got = kernels.split_scale(lin, x, r, "rap-conv")
    for g, f in zip(got, ref):
        torch.testing.assert_close(g, f, rtol=0, atol=0)
    torch.testing.assert_close(kernels.split_backward(lin, x, *ref, "pa", r.flatten(1).sum(1)),
                               ops.split_backward(lin, x, *ref, "pa", r.flatten(1).sum(1)), rtol=0, atol=0)


def test_float64_shift_and_masses_fall_back():
    c = torch.randn(2, 3, 4, dtype=torch.float64)
    excess = torch.randn(2, 1, 1, dtype=torch.float64)
    assert torch.equal(kernels.shift_nonzero(c, excess), ops.shift_nonzero(c, excess))
    assert all(torch.equal(g, f) for g, f in zip(kernels.ae_masses(c), ops.ae_masses(c)))


# ---------------------------------------------------------------- whole networks

def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(6, 5, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 3 * 3, 7), nn.ReLU(), nn.Linear(7, 3)).eval()


@pytest.fixture
def reference_disabled(monkeypatch):
    """Make the reference fused primitives unreachable, so every call must run a kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("the triton backend fell back to the reference")
    for name in ("split_scale", "split_backward", "shift_nonzero", "ae_masses"):
        monkeypatch.setattr(ops, name, refuse)


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
