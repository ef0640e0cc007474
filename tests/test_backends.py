"""Backend dispatch: every fused primitive of a rule goes through the chosen backend, the
choice follows the input's device, and unavailable backends say why."""
import importlib
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn as nn

import relprop
from relprop import ops

backends = importlib.import_module("relprop.backends")   # the module (relprop.backends is the function)

PRIMITIVES = ("split_scale", "split_backward", "shift_nonzero", "ae_masses")


def _tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 2 * 2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


@pytest.fixture
def counting_backend(monkeypatch):
    """A 'triton' backend that delegates to the reference and counts each primitive's calls."""
    calls = dict.fromkeys(PRIMITIVES, 0)
    fake = types.ModuleType("fake_backend")
    for name in PRIMITIVES:
        def wrapped(*args, _name=name, **kwargs):
            calls[_name] += 1
            return getattr(ops, _name)(*args, **kwargs)
        setattr(fake, name, wrapped)
    monkeypatch.setitem(sys.modules, "fake_backend", fake)
    monkeypatch.setitem(backends._MODULES, "triton", "fake_backend")
    monkeypatch.setattr(backends, "unavailable", lambda name, device: None)
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
    assert backends.operations("torch") is ops


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
    assert info == {"available": False, "reason": info["reason"]} and "relprop._C is not built" in info["reason"]
