"""The C++/CUDA extension backend (csrc/, relprop.ops.cuda), beyond the per-primitive
comparisons of tests/test_primitives.py.

* every .cu kernel file compiles with plain nvcc for Hopper (no torch headers), with no spills;
* the CUDA binding (csrc/cuda_ops.cpp) passes a syntax-only compile against the CUDA torch headers;
* the op library's CPU part (csrc/ops.cpp) is JIT-built once per session (cached under
  build/relprop-ext-cpu); the raw ops take a presplit ``[W+; V2]`` or a plain ``W``, pass
  torch.library.opcheck, reject bad arguments, and run end to end through
  relprop.Explainer(backend="cuda").

No GPU is needed; the CUDA kernels' numerics are checked on a GPU machine (csrc/README.md).
"""
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn as nn

import relprop
from conftest import CountingOps
from op_cases import LAYERS, RULE_IDS, RULES, make_layer
from relprop import ops
from relprop.ops import dispatch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _cuda_home():
    """A CUDA toolkit root holding bin/nvcc and include/cuda_runtime_api.h, or None."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                 "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def _nvcc():
    home = _cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


# ------------------------------------------------------------------ compile checks (no torch)
CU_FILES = sorted(CSRC.glob("*.cu"))


@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_kernels_compile_for_hopper_without_torch(cu, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin): cannot compile-check the kernels")
    proc = subprocess.run([nvcc, "-std=c++17", "-O3", "-c", str(cu), "-o", str(tmp_path / "k.o"),
                           "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr)]
    assert spills and not any(spills), "register spills:\n" + proc.stderr


def _torch_includes():
    from torch.utils.cpp_extension import include_paths
    return include_paths()


def test_cuda_binding_compiles_against_torch_headers():
    torch_inc = _torch_includes()
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in torch_inc):
        pytest.skip("torch is a CPU-only build: it ships no c10/cuda headers to compile csrc/cuda_ops.cpp against")
    nvcc, cxx = _nvcc(), shutil.which("c++") or shutil.which("g++")
    if nvcc is None or cxx is None:
        pytest.skip("needs nvcc (for the CUDA runtime headers) and a C++ compiler")
    cuda_inc = os.path.join(_cuda_home(), "include")
    extra = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "include"))
    cmd = [cxx, "-std=c++20", "-fsyntax-only", str(CSRC / "cuda_ops.cpp")]
    cmd += [f"-I{p}" for p in [*torch_inc, cuda_inc]] + [f for p in extra for f in ("-idirafter", p)]   # as setup.py
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ the CPU op library
# the ``ext`` fixture (relprop.extension on the installed or JIT-built op library) is in conftest.py

R = lambda: torch.ops.relprop  # noqa: E731

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def close(got, ref, dtype):
    if ref is None:
        assert got is None or got.numel() == 0
        return
    scale = ref.abs().nan_to_num(0, 0, 0).max().item() or 1.0
    tol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True)


OP_RULE = {"zplus": "alphabeta"}   # Gu's z+ is the op's one-sided alpha-beta without a bias
DTYPES = [torch.float32, torch.float64]


def geometry(lin):
    m = lin.module
    return (list(m.stride), list(m.padding), list(m.dilation)) if lin.is_conv else ([1], [0], [1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("layer", LAYERS)
def test_split_scale_op_takes_presplit_and_plain_weights(ext, layer, rule, dtype):
    name, alpha, beta, eps = rule
    lin, x, r = make_layer(layer, dtype)
    ref = ops.split_scale(lin, x, r, name, alpha, beta, eps)
    bias = lin.bias if name == "alphabeta" else None
    for w in (lin.split(ops.EPILOGUES[name].split), lin.weight):   # presplit [W+; V2] and plain W
        s1, s2 = R().split_scale(x, w, r, bias, *geometry(lin), OP_RULE.get(name, name), alpha, beta, eps)
        close(s1, ref[0], dtype)
        close(s2, ref[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift", [False, True], ids=["plain", "shift"])
@pytest.mark.parametrize("split, two", [("pa", True), ("pn", True), ("pn", False)], ids=["pa", "pn", "pos-only"])
@pytest.mark.parametrize("layer", LAYERS)
def test_split_backward_op_takes_presplit_and_plain_weights(ext, layer, split, two, shift, dtype):
    lin, x, r = make_layer(layer, dtype)
    rule = "rap-conv" if split == "pa" else "alphabeta-repo"
    s1, s2 = ops.split_scale(lin, x, r, rule, 1.0, 1.0 if two else 0.0)
    shift_to = r.reshape(r.shape[0], -1).sum(1) if shift else None
    ref = ops.split_backward(lin, x, s1, s2, split, shift_to)
    for w in (lin.split(split), lin.weight):
        close(R().split_backward(x, s1, s2, w, *geometry(lin), split, shift_to), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 9, 11), (64, 7, 2, 3), (1, 13), (4, 3, 6)], ids=str)
def test_raw_shift_nonzero_and_ae_masses_ops(ext, shape, dtype):
    """The raw ops' own conventions: ``excess`` as a flat (B,) vector; T sums to 1, O = 0
    where a sample has no negative relevance."""
    c = torch.randn(*shape, dtype=dtype).relu() - torch.randn(*shape, dtype=dtype).relu()
    excess = torch.randn(shape[0], *[1] * (len(shape) - 1), dtype=dtype)
    close(R().shift_nonzero(c, excess.reshape(-1)), ops.shift_nonzero(c, excess), dtype)
    r = torch.randn(*shape, dtype=dtype)
    r[0] = r[0].abs()             # a sample without negative relevance: O = 0 there
    r.view(-1)[::5] = 0
    t, o = R().ae_masses(r)
    assert torch.all(o[0] == 0)
    torch.testing.assert_close(t.reshape(shape[0], -1).sum(1), torch.ones(shape[0], dtype=dtype))


def test_ops_pass_opcheck(ext):
    lin, x, r = make_layer("3x3-s2-p1", torch.float64)
    lin_l, xl, rl = make_layer("linear-odd", torch.float64)
    geo, geo_l = geometry(lin), geometry(lin_l)
    w, wl = lin.split("pa"), lin_l.split("pn")
    s1, s2 = ops.split_scale(lin, x, r, "rap-conv")
    cases = [
        (R().split_scale.default, (x, w, r, None, *geo, "rap-conv", 1.0, 0.0, 0.0)),
        (R().split_scale.default, (x, lin.split("pn"), r, lin.bias, *geo, "alphabeta", 2.0, 1.0, 1e-6)),
        (R().split_scale.default, (x, lin.weight, r, None, *geo, "alphabeta", 1.0, 0.0, 1e-6)),   # eps: no NaN
        (R().split_scale.default, (xl, wl, rl, None, *geo_l, "alphabeta-repo", 1.0, 1.0, 0.0)),
        (R().split_backward.default, (x, s1, s2, w, *geo, "pa", r.flatten(1).sum(1))),
        (R().split_backward.default, (x, s1, None, w, *geo, "pa", None)),
        (R().split_backward.default, (xl, rl, rl, wl, *geo_l, "pn", None)),
        (R().shift_nonzero.default, (x, torch.randn(x.shape[0], dtype=x.dtype))),
        (R().ae_masses.default, (r,)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)   # schema, autograd registration, fake tensors, aot dispatch (dynamic)


def test_ops_reject_bad_arguments(ext):
    lin, x, r = make_layer("1x1", torch.float32)
    with pytest.raises(RuntimeError, match="unknown split rule 'zplus'"):
        R().split_scale(x, lin.weight, r, None, *geometry(lin), "zplus", 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        R().split_scale(x.double(), lin.weight, r, None, *geometry(lin), "rap-conv", 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="excess must have shape"):
        R().shift_nonzero(x, torch.zeros(x.shape[0] + 1))


# ------------------------------------------------------------------ whole networks
def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 2 * 2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


# the extension's op calls per explanation of _tiny_cnn: one split_scale + split_backward per
# hidden conv/linear with a ReLU input (conv 2, linear 6, and the output linear 8 except for
# RAP, whose first propagation is its own rule), twice for the two seeds of CLRP and SGLRP;
# AE's masses and RSP's shift at the one conv below init_layer "3".
NATIVE_CALLS = {
    "rap": {"split_scale": 2, "split_backward": 2}, "lrp-alphabeta": {"split_scale": 3, "split_backward": 3},
    "lrp-zplus": {"split_scale": 3, "split_backward": 3}, "lrp-epsilon-plus": {"split_scale": 1, "split_backward": 1},
    "lrp-rap-repo": {"split_scale": 3, "split_backward": 3}, "clrp": {"split_scale": 6, "split_backward": 6},
    "sglrp": {"split_scale": 6, "split_backward": 6}, "ae": {"ae_masses": 1, "shift_nonzero": 1},
    "rsp": {"shift_nonzero": 1},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", list(NATIVE_CALLS))
def test_explainer_on_the_extension_matches_the_torch_backend(ext, monkeypatch, method, dtype):
    assert relprop.backends("cpu")["cuda"]["available"]   # the JIT-built library stands in for _C
    dispatch.self_check("cuda", "cpu", dtype)             # once per process; not counted below
    counting = CountingOps(ext._OPS)
    monkeypatch.setattr(ext, "_OPS", counting)
    model, x = _tiny_cnn().to(dtype), torch.rand(2, 3, 9, 9, dtype=dtype)
    init = {"init_layer": "3"} if method in ("ae", "rsp") else {}
    ref = relprop.Explainer(model, method, backend="torch", **init)(x)
    got = relprop.Explainer(model, method, backend="cuda", **init)(x)
    assert counting.calls == NATIVE_CALLS[method], "the extension's ops were not all called"
    tol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=tol["rtol"], atol=tol["atol"] * ref.abs().max().item())


@pytest.mark.slow
def test_cmake_builds_the_standalone_kernels(tmp_path):
    cmake, nvcc = shutil.which("cmake"), _nvcc()
    if cmake is None or nvcc is None:
        pytest.skip("needs cmake and nvcc")
    env = {**os.environ, "CUDACXX": nvcc}
    conf = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path), "-DRELPROP_WITH_TORCH=OFF"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert conf.returncode == 0, conf.stdout + conf.stderr
    build = subprocess.run([cmake, "--build", str(tmp_path), "--target", "relprop_kernels", "-j", "2"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr


# ------------------------------------------------------------------ CUDA kernels (GPU machines)
# (their values against the reference: tests/test_primitives.py, which runs on CUDA tensors there)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ops_pass_opcheck_on_gpu(ext, dtype):
    if not relprop.backends("cuda")["cuda"]["available"]:
        pytest.skip("needs a CUDA device and relprop._C built with its CUDA kernels (setup.py on a GPU machine)")
    lin, x, r = make_layer("3x3-s2-p1", dtype)
    lin = ops.LinearMap(lin.module.cuda())
    x, r = x.cuda(), r.cuda()
    c = x - x.roll(1, 0)
    excess = torch.randn(c.shape[0], dtype=dtype, device="cuda")
    for op, args in [(R().split_scale.default, (x, lin.split("pa"), r, None, *geometry(lin), "rap-conv", 1.0, 0.0, 0.0)),
                     (R().split_backward.default, (x, r, r, lin.split("pa"), *geometry(lin), "pa", excess)),
                     (R().ae_masses.default, (r,)), (R().shift_nonzero.default, (c, excess))]:
        torch.library.opcheck(op, args)
