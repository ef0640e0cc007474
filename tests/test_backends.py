"""Backend dispatch (relprop.ops.dispatch): every fused primitive of a rule goes through the
chosen backend, the choice follows the input's device, unavailable backends say why, and
``auto`` uses a fast backend only once it has passed its self-check on the device."""
import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn as nn

import relprop
from relprop import cli, ops
from relprop.ops import dispatch as backends
from relprop.ops import reference

PRIMITIVES = backends.PRIMITIVES


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch):
    """Self-check verdicts and warnings are per process: each test starts without any."""
    monkeypatch.setattr(backends, "_CHECKS", {})
    monkeypatch.setattr(backends, "_WARNED", set())


def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 2 * 2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


@pytest.fixture
def counting_backend(monkeypatch):
    """A 'triton' backend that delegates to the reference and counts each primitive's calls."""
    calls = dict.fromkeys(PRIMITIVES, 0)
    fake = types.ModuleType("fake_backend")
    fake.covers = lambda primitive, *args, **kwargs: True
    for name in PRIMITIVES:
        def wrapped(*args, _name=name, **kwargs):
            calls[_name] += 1
            return getattr(reference, _name)(*args, **kwargs)
        setattr(fake, name, wrapped)
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    monkeypatch.setitem(backends._MODULES, "triton", "fake_backend")
    monkeypatch.setattr(backends, "unavailable", lambda name, device: None)
    backends.self_check("triton", "cpu", torch.float32)   # the check's own calls are not the rules'
    calls.update(dict.fromkeys(PRIMITIVES, 0))
    return calls


@pytest.mark.parametrize("method, used", [
    ("rap", {"split_scale": 2, "split_backward": 2}),   # the two hidden layers past the input conv
    ("lrp-alphabeta", {"split_scale": 3, "split_backward": 3}),   # the output layer too
    ("lrp-zplus", {"split_scale": 3, "split_backward": 3}),
    ("lrp-rap-repo", {"split_scale": 3, "split_backward": 3}),
    ("ae", {"ae_masses": 1, "shift_nonzero": 1}),
    ("rsp", {"shift_nonzero": 1}),
])
def test_rules_dispatch_their_fused_primitives(counting_backend, method, used):
    model, x = _tiny_cnn(), torch.rand(2, 3, 9, 9)
    init = {"init_layer": "3"} if method in ("ae", "rsp") else {}
    ref = relprop.Explainer(model, method, backend="torch", **init)(x)
    got = relprop.Explainer(model, method, backend="triton", **init)(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert {k: v for k, v in counting_backend.items() if v} == used


def test_auto_runs_cpu_tensors_on_the_reference():
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert backends.operations("torch") is reference
    assert ops.split_scale is reference.split_scale      # relprop.ops re-exports the reference


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of auto, torch, triton, cuda"):
        relprop.Explainer(_tiny_cnn(), "rap", backend="tpu")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends.backends("cpu")["triton"]["reason"]
    assert "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable for cpu tensors: .*TRITON_INTERPRET"):
        backends.resolve_backend("triton", torch.device("cpu"))


def test_missing_extension_is_reported_not_raised(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "relprop._C" else real(n, *a))
    monkeypatch.setattr(backends, "_ops_registered", lambda: False)
    info = backends.backends("cpu")["cuda"]
    assert info == {"available": False, "reason": info["reason"], "self_check": {}}
    assert "relprop._C is not built" in info["reason"]


# ----------------------------------------------------------------- verified auto
# The cuda backend on the op library's CPU kernels (the ``ext`` fixture) stands in for a fast
# backend on a GPU: ``auto`` is allowed to consider CPU tensors.

@pytest.fixture
def auto_on_cpu(ext, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # triton unavailable on CPU: cuda, else torch
    return ext


@pytest.fixture
def check_runs(monkeypatch):
    """The number of self-checks run (by backend, device, dtype)."""
    runs = []
    real = backends._run_check

    def counted(*key):
        runs.append(key)
        return real(*key)
    monkeypatch.setattr(backends, "_run_check", counted)
    return runs


@pytest.fixture
def noisy_split_scale(auto_on_cpu, monkeypatch):
    """The cuda backend's split_scale, broken: noise added to S1."""
    good = auto_on_cpu.split_scale

    def noisy(*args, **kwargs):
        s1, s2 = good(*args, **kwargs)
        return s1 + 0.1 * s1.abs().max() * torch.rand_like(s1), s2
    monkeypatch.setattr(auto_on_cpu, "split_scale", noisy)


def test_auto_uses_a_fast_backend_that_passed_its_check_once_per_process(auto_on_cpu, check_runs, recwarn):
    model, x = _tiny_cnn(), torch.rand(2, 3, 9, 9)
    ref = relprop.Explainer(model, "rap", backend="torch")(x)
    explainer = relprop.Explainer(model, "rap")
    for _ in range(3):
        torch.testing.assert_close(explainer(x), ref, rtol=1e-5, atol=1e-6)
    assert backends.resolve_backend("auto", torch.device("cpu")) == "cuda"
    assert check_runs == [("cuda", torch.device("cpu"), torch.float32)]          # once, not per call
    check = backends.self_check("cuda", "cpu", torch.float32)
    assert check.passed and "split_scale[conv, rap-conv, beta=0]" in check.results
    assert all(v == "ok" for v in check.results.values())
    assert relprop.backends("cpu")["cuda"]["self_check"] == {"float32": "passed"}
    assert not [w for w in recwarn if "self-check" in str(w.message)]


def test_auto_falls_back_from_a_broken_backend_with_one_warning(noisy_split_scale, check_runs):
    model, x = _tiny_cnn(), torch.rand(2, 3, 9, 9)
    ref = relprop.Explainer(model, "rap", backend="torch")(x)
    explainer = relprop.Explainer(model, "rap")
    with pytest.warns(RuntimeWarning) as record:
        got = [explainer(x) for _ in range(2)]
    messages = [str(w.message) for w in record if "self-check" in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("relprop: backend 'cuda' failed its self-check on cpu float32 tensors (failed: error ")
    assert "in split_scale[conv, rap-conv, beta=0]" in messages[0] and messages[0].endswith("; auto does not use it")
    for g in got:
        assert torch.equal(g, ref)                                   # the reference ran
    assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert len(check_runs) == 1
    verdict = relprop.backends("cpu")["cuda"]["self_check"]["float32"]
    assert verdict.startswith("failed: error") and "split_scale[conv, rap-conv" in verdict


def test_a_backend_named_explicitly_runs_and_says_its_check_failed(noisy_split_scale):
    model, x = _tiny_cnn(), torch.rand(2, 3, 9, 9)
    ref = relprop.Explainer(model, "rap", backend="torch")(x)
    with pytest.warns(RuntimeWarning, match="backend 'cuda' failed its self-check on cpu float32 tensors .*; "
                                            "it runs because it was asked for by name"):
        got = relprop.Explainer(model, "rap", backend="cuda")(x)
    assert not torch.allclose(got, ref, rtol=1e-3, atol=1e-4)        # the broken kernel did run


def test_backends_check_prints_every_case(auto_on_cpu, capsys):
    assert cli.main(["backends", "--check"]) == 0
    out = capsys.readouterr().out
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        assert f"cpu {dtype}: passed" in out
    assert "split_backward[linear, pn, shift]" in out and "ae_masses" in out
    assert "the reference: nothing to check" in out


def test_backends_check_fails_for_a_broken_backend(noisy_split_scale, capsys):
    assert cli.main(["backends", "--check"]) == 1
    out = capsys.readouterr().out
    assert "cpu float32: failed: error" in out
    assert "split_scale[linear, rap-linear, beta=0]" in out
