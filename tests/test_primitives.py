"""Every fused primitive of every fast backend against the reference: backend (triton, cuda)
x primitive x layer case (tests/op_cases.py) x dtype, and the one table of epilogue codes
(``relprop.ops.EPILOGUES``) against the kernels' constants.

A call the backend covers (its ``covers`` says True) runs the backend and is compared with
the reference; the test also asserts which calls are covered, so a backend that silently
fell back everywhere cannot pass.  A call it does not cover goes through the dispatch and
must equal the reference exactly.  Outputs are allocated NaN-poisoned (Triton's
``_common.POISON``, the op library's ``RELPROP_POISON_OUTPUTS``), so an element a kernel
forgets to write fails.

Where: the ``cuda`` backend runs the op library (``relprop._C``, or csrc/ops.cpp JIT-built
with CPU kernels by the ``ext`` fixture); Triton runs compiled on CUDA tensors where a GPU is
visible, else under its interpreter only in a process started with ``TRITON_INTERPRET=1``
(``make test`` runs ``pytest -k triton`` on this file so).

Tolerances, relative to the reference's largest magnitude: float64 1e-12; float32 1e-5
(the order of summation differs; TF32 off on CUDA); float16/bfloat16 2e-2 against the
reference run in float32 on the same rounded inputs (the kernels accumulate in float32 and
round once when storing).  Half-precision cases widen ``eps`` to 1e-2: ``R / 1e-6`` does not
fit in float16, by design rather than by a kernel's fault.
"""
import importlib
import os
import pathlib
import re

import pytest
import torch

from op_cases import CONVS, HALF, LAYERS, LINEARS, RULE_IDS, RULES, make_layer, sparse_input
from relprop import ops
from relprop.ops import dispatch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-2),
       torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture(autouse=True)
def _on_device():
    """Every tensor and layer lives on DEVICE; the CUDA reference in full fp32."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(params=["triton", "cuda"])
def backend(request, monkeypatch):
    """``(name, module)`` of a fast backend that can run on DEVICE here."""
    name = request.param
    if name == "triton":
        if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU runs only under TRITON_INTERPRET=1 "
                        "(make test: TRITON_INTERPRET=1 pytest tests/test_primitives.py -k triton)")
        pytest.importorskip("triton")
        from relprop.kernels import _common
        monkeypatch.setattr(_common, "POISON", float("nan"))
    else:
        request.getfixturevalue("ext")     # relprop._C, or the JIT-built CPU op library
        monkeypatch.setenv("RELPROP_POISON_OUTPUTS", "1")
    reason = dispatch.unavailable(name, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable on {DEVICE.type}: {reason}")
    return name, importlib.import_module(dispatch._MODULES[name])


def expected_cover(name: str, layer: str, dtype: torch.dtype) -> bool:
    """What each backend is documented to cover among these cases (kernels/__init__.py,
    relprop/ops/cuda.py): Triton has no float64 kernels and takes Linear inputs as (B, C) only."""
    if name == "triton":
        return dtype != torch.float64 and layer != "linear-3d"
    return True


def run(backend, primitive: str, args: tuple, expect_covered: bool | None):
    """The backend's result for a covered call (asserting the coverage expected), else the
    dispatch's result, which must equal the reference computed on the same arguments."""
    name, module = backend
    covered = module.covers(primitive, *args)
    if expect_covered is not None:
        assert (covered is True) == expect_covered, f"{name} covers {primitive}: {covered}"
    if covered is True:
        return getattr(module, primitive)(*args)
    got = getattr(dispatch.operations(name), primitive)(*args)
    same = getattr(ops, primitive)(*args)
    for g, f in zip(_tuple(got), _tuple(same)):
        assert (g is None and f is None) or torch.equal(g, f)
    return got


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def assert_matches(got, ref, dtype):
    rtol, atol = TOL[dtype]
    for g, f in zip(_tuple(got), _tuple(ref)):
        if f is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == f.shape
        torch.testing.assert_close(g.to(f.dtype), f, rtol=rtol, atol=atol * (f.abs().max().item() or 1.0))


def widened(t):
    """The reference's input for ``t``: the same values, in float32 if ``t`` is half precision."""
    return t if t is None or t.dtype not in HALF else t.float()


def reference_of(lin, *tensors):
    """The reference's layer and inputs: the same weights and values, in float32 for half precision."""
    dtype = torch.float32 if lin.dtype in HALF else lin.dtype
    return (ops.LinearMap(lin.module, dtype=dtype),) + tuple(widened(t) for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_split_scale(backend, layer, dtype):
    lin, x, r = make_layer(layer, dtype)
    ref_lin, xr, rr = reference_of(lin, x, r)
    for rule, alpha, beta, eps in RULES:
        eps = max(eps, 1e-2) if dtype in HALF else eps
        got = run(backend, "split_scale", (lin, x, r, rule, alpha, beta, eps), expected_cover(backend[0], layer, dtype))
        assert_matches(got, ops.split_scale(ref_lin, xr, rr, rule, alpha, beta, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_split_backward(backend, layer, dtype):
    lin, x, r = make_layer(layer, dtype)
    shift_to = r.reshape(r.shape[0], -1).sum(1)
    for split, two in (("pa", True), ("pn", True), ("pn", False)):
        rule = "rap-conv" if split == "pa" else "alphabeta-repo"
        s1, s2 = ops.split_scale(lin, x, r, rule, 1.0, 1.0 if two else 0.0)
        for target in (None, shift_to):
            args = (lin, x, s1, s2, split, target)
            got = run(backend, "split_backward", args, expected_cover(backend[0], layer, dtype))
            assert_matches(got, ops.split_backward(*reference_of(lin, x, s1, s2), split, widened(target)), dtype)
            if target is not None and dtype in (torch.float32, torch.float64):
                # the shift's point: each sample sums to its target, where it has an entry to shift
                alive = ops.split_backward(lin, x, s1, s2, split).reshape(x.shape[0], -1).ne(0).any(1)
                assert alive.sum() >= 1
                torch.testing.assert_close(got.reshape(got.shape[0], -1).sum(1)[alive], target[alive],
                                           rtol=1e-4, atol=1e-4)


SHAPES = [(1, 3, 5, 7), (64, 2, 3, 3), (3, 2, 1500), (4, 3, 6), (1, 13)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shift_nonzero(backend, shape, dtype):
    c = (sparse_input(*shape) - sparse_input(*shape)).to(dtype)
    c[-1] = 0                                            # no non-zero entry: the shift is SD(., 0) = 0
    excess = torch.randn(shape[0], *([1] * (len(shape) - 1))).to(dtype)
    excess[0] = 0
    covered = backend[0] != "triton" or dtype != torch.float64
    got = run(backend, "shift_nonzero", (c, excess), covered)
    assert_matches(got, ops.shift_nonzero(widened(c), widened(excess)), dtype)
    whole = torch.randn(shape).to(dtype)                # not one value per sample: the reference runs
    run(backend, "shift_nonzero", (c, whole), False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ae_masses(backend, shape, dtype):
    r = torch.randn(*shape)
    r[0] = r[0].abs()                                    # no negative mass: O = 0
    r[-1] = 0                                            # nothing at all: T = O = 0
    r = r.to(dtype)
    covered = backend[0] != "triton" or dtype != torch.float64
    got = run(backend, "ae_masses", (r,), covered)
    assert_matches(got, ops.ae_masses(widened(r)), dtype)


def test_grouped_convs_and_autograd_go_to_the_reference(backend):
    grouped = ops.LinearMap(torch.nn.Conv2d(4, 6, 3, padding=1, groups=2))
    x, r = sparse_input(2, 4, 6, 6), torch.randn(2, 6, 6, 6)
    for rule in ("rap-conv", "alphabeta"):
        s1, s2 = run(backend, "split_scale", (grouped, x, r, rule, 1.0, 1.0, 1e-2), False)
        run(backend, "split_backward", (grouped, x, s1, s2, ops.EPILOGUES[rule].split, r.flatten(1).sum(1)),
            False)
    lin, x, r = make_layer("1x1")
    xg = x.clone().requires_grad_(True)                  # autograd wants the differentiable reference
    assert run(backend, "split_scale", (lin, xg, r, "alphabeta", 1.0, 0.0, 1e-2), False)[0].requires_grad


# ----------------------------------------------------------------- one table of epilogues

def test_epilogue_table_is_consistent():
    """Rules sharing a kernel code compute the same formulas: z+ is alpha-beta without a bias."""
    by_code = {}
    for name, e in ops.EPILOGUES.items():
        by_code.setdefault(e.code, set()).add(e.kernel)
        assert e.split in ("pa", "pn") and e.one_sided in ("always", "beta=0", "never")
        assert ops.EPILOGUES[e.kernel].code == e.code      # the kernel name is itself a row
    assert all(len(kernels) == 1 for kernels in by_code.values())
    assert sorted(by_code) == list(range(len(by_code)))


def _cpp_enum(path: pathlib.Path, enum: str) -> dict[str, int]:
    body = re.search(r"enum " + enum + r"\s*\{([^}]*)\}", path.read_text()).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


def test_cpp_enums_and_rule_names_match_the_epilogue_table():
    codes = {e.kernel: e.code for e in ops.EPILOGUES.values()}
    camel = {"rap-conv": "kRapConv", "rap-linear": "kRapLinear", "alphabeta": "kAlphaBeta",
             "alphabeta-repo": "kAlphaBetaRepo"}
    assert _cpp_enum(ROOT / "csrc" / "ops.h", "Rule") == {camel[k]: v for k, v in codes.items()}
    upper = {k: "RELPROP_" + k.upper().replace("-", "_") for k in codes}
    assert _cpp_enum(ROOT / "csrc" / "kernels.h", "relprop_rule") == {upper[k]: v for k, v in codes.items()}
    parsed = dict(re.findall(r'if \(rule == "([a-z-]+)"\) return (k\w+);', (ROOT / "csrc" / "ops.cpp").read_text()))
    assert parsed == {k: camel[k] for k in codes}


def test_triton_rule_constants_match_the_epilogue_table():
    pytest.importorskip("triton")
    from relprop.kernels import epilogue
    codes = {e.kernel: e.code for e in ops.EPILOGUES.values()}
    for kernel, code in codes.items():
        assert getattr(epilogue, kernel.upper().replace("-", "_")).value == code


def test_the_op_case_tables_are_the_only_ones():
    """The per-backend test files draw their layer cases from tests/op_cases.py."""
    for name in ("test_triton_kernels.py", "test_extension.py"):
        text = (ROOT / "tests" / name).read_text()
        assert not re.search(r"^(CONVS|LINEARS|RULES)\s*=", text, re.M), name
    assert len(CONVS) >= 8 and len(LINEARS) >= 4 and len(RULE_IDS) == len(RULES)
