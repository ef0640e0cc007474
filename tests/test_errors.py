"""Bad input gets one clear error naming the problem."""
import re

import pytest
import torch
import torch.nn as nn

import relprop


@pytest.fixture
def model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5))


def test_unsupported_layers_are_all_listed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.act = nn.Tanh()
            self.gate = nn.Sigmoid()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.act(self.conv(x))
            return self.fc((self.gate(y) + y * y).sum((2, 3)))

    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(Net(), "rap")
    msg = str(err.value)
    for part in ("act (Tanh)", "gate (Sigmoid): supported only as the gate of a product (squeeze-excitation)",
                 "mul (call_function mul): only a signal times a Sigmoid/Hardsigmoid gate", "sum"):
        assert part in msg


@pytest.mark.parametrize("product", ["signals", "gates", "over a tensor", "zero"])
def test_products_other_than_a_gated_or_scaled_signal_are_refused(product):
    class Net(nn.Module):
        def forward(self, x):
            if product == "over a tensor":
                return (2.0 / x).flatten(1)
            if product == "zero":
                return (x * 0).flatten(1)
            a, b = (x, x.relu()) if product == "signals" else (torch.sigmoid(x), x.sigmoid())
            return (a * b).flatten(1)

    op = "truediv" if product == "over a tensor" else "mul"
    with pytest.raises(relprop.UnsupportedModelError,
                       match=rf"{op} \(call_function {op}\): only a signal times a Sigmoid/Hardsigmoid gate "
                             r"\(squeeze-excitation\) or a tensor times or over a constant number is supported"):
        relprop.Explainer(Net(), "rap")


def test_a_functional_batch_norm_on_foreign_tensors_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.register_buffer("mean", torch.zeros(4))

        def forward(self, x):
            y = nn.functional.batch_norm(self.conv(x), self.mean, self.bn.running_var, self.bn.weight, self.bn.bias)
            return y.flatten(1)

    with pytest.raises(relprop.UnsupportedModelError, match=r"batch_norm \(call_function batch_norm\): a functional "
                                                            r"batch_norm must read the tensors of one BatchNorm2d"):
        relprop.Explainer(Net(), "rap")


def test_a_sigmoid_that_is_not_a_gate_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 5, 5))
    with pytest.raises(relprop.UnsupportedModelError,
                       match=r"1 \(Sigmoid\): supported only as the gate of a product \(squeeze-excitation\)"):
        relprop.Explainer(net, "rap")


class _Mean(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.mean(*self.dims)


@pytest.mark.parametrize("dims, match", [((), r"mean \(call_method mean\): a mean over dim=None averages across "
                                               r"the batch; average over the feature dims only, e.g. x.mean\(\(2, 3\)\)"),
                                         (((0, 2, 3),), r"a mean over dim=\(0, 2, 3\) averages across the batch")])
def test_means_over_the_batch_are_refused(dims, match):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Mean(*dims))
    with pytest.raises(relprop.UnsupportedModelError, match=match):
        relprop.Explainer(net, "rap")


def test_a_negative_dim_that_is_the_batch_is_refused_when_run(model):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Mean((-4, -1)), nn.Linear(4, 2))
    ex = relprop.Explainer(net, "rap")  # -4 is only known to be the batch once the input is 4-d
    with pytest.raises(relprop.UnsupportedModelError, match=r"mean over dims \(-4, -1\) of a 4-d tensor averages "
                                                           r"across the batch \(dim 0\)"):
        ex(torch.rand(1, 3, 6, 6))


def test_negative_leaky_relu_slope_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(-0.5), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(relprop.UnsupportedModelError,
                       match=r"1 \(LeakyReLU\): negative_slope=-0.5: only a constant slope >= 0 keeps the sign"):
        relprop.Explainer(net, "rap")


def test_unevenly_padding_same_conv_and_other_padding_modes_say_why():
    net = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1,
                        padding_mode="reflect"), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 6, 6))
    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(net, "rap")
    msg = str(err.value)
    assert "0 (Conv2d): padding='same' with kernel (2, 2) and dilation (1, 1) pads unevenly" in msg
    assert "2 (Conv2d): padding_mode='reflect' has no transposed map" in msg


def test_untraceable_model():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(relprop.UnsupportedModelError, match="could not capture Branchy with torch.fx"):
        relprop.Explainer(Branchy(), "rap")


def test_model_must_return_one_tensor():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = self.fc(x)
            return y, y

    with pytest.raises(relprop.UnsupportedModelError, match="single tensor"):
        relprop.Explainer(Two(), "rap")


@pytest.mark.parametrize("x, match", [
    (torch.randn(3, 8, 8), r"input must have shape \(B, C, H, W\).*got 3 dims"),
    (torch.randn(1, 4, 8, 8), "input has 4 channels but the first layer '0' expects 3"),
    (torch.randn(0, 3, 8, 8), "empty batch"),
    (torch.randn(2, 3, 8, 8, dtype=torch.float64), "input is torch.float64 on cpu but the model is torch.float32"),
    (torch.ones(2, 3, 8, 8, dtype=torch.long), "floating-point"),
])
def test_bad_input_shapes_and_types(model, x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        relprop.explain(model, x, method="rap")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(model, bad):
    x = torch.randn(2, 3, 8, 8)
    x[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"^input contains NaN or Inf \(1 of 384 values, in sample\(s\) \[1\]\)$"):
        relprop.explain(model, x, method="rap")


@pytest.mark.parametrize("target, match", [
    (5, "target 5 out of range for a model with 5 classes"),
    ([0, -1], "target -1 out of range"),
    ([0, 1, 2], "got 3 targets for a batch of 2"),
    (1.5, "integer class indices"),
])
def test_bad_targets(model, target, match):
    with pytest.raises((ValueError, TypeError), match=match):
        relprop.explain(model, torch.randn(2, 3, 8, 8), target, method="rap")


def test_unknown_method_and_parameter(model):
    with pytest.raises(ValueError, match="unknown method 'rapp'; choose one of: .*rap.*rsp"):
        relprop.Explainer(model, "rapp")
    with pytest.raises(TypeError, match="method 'ae' has no parameter\\(s\\) 'alpha'; its parameters are: ratio, init_layer"):
        relprop.Explainer(model, "ae", alpha=1)
    # a parameter no rule of the method reads is refused, not ignored (z+ has no epsilon)
    with pytest.raises(TypeError, match="method 'lrp-zplus' has no parameter\\(s\\) 'epsilon'; its parameters are: "
                                        "stabilizer, first_layer"):
        relprop.Explainer(model, "lrp-zplus", epsilon=10.0)
    with pytest.raises(ValueError, match="ratio r must lie in"):
        relprop.Explainer(model, "ae", ratio=3)


def test_per_channel_zb_bounds_of_the_wrong_length(model):
    """Checked when the explainer is built where the input goes into a conv; else at the call,
    against the input (a torch broadcasting error before)."""
    with pytest.raises(ValueError, match=r"^method 'lrp-epsilon': zb_bounds has 2 per-channel values, but the "
                                         r"model's first layer takes 3 channels$"):
        relprop.Explainer(model, "lrp-epsilon", zb_bounds=((-2.0, -2.0), (2.0, 2.0)))
    relprop.Explainer(model, "lrp-epsilon", zb_bounds=((-2.0, -2.0, -2.0), (2.0, 2.0, 2.0)))
    relprop.Explainer(model, "lrp-epsilon", zb_bounds=(-2.0, 2.0))
    from relprop.rules import _channel_tensor
    with pytest.raises(ValueError, match=r"^zb_bounds has 2 per-channel values, but the input has 3 channels$"):
        _channel_tensor((1.0, 2.0), torch.zeros(1, 3, 4, 4))


def test_an_empty_target_list_is_named_as_such(model):
    with pytest.raises(ValueError, match=r"^got 0 targets for a batch of 2$"):
        relprop.Explainer(model, "rap")(torch.randn(2, 3, 8, 8), target=[])


def test_bad_initial_relevance(model):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"initial_relevance must have shape \(2, 5\)"):
        relprop.Explainer(model, "lrp-epsilon")(x, initial_relevance=torch.ones(2, 4))
    # a vector of the wrong length: the same message, not torch's expand error
    with pytest.raises(ValueError, match=r"^initial_relevance must have shape \(2, 5\) \(or \(5,\)\), got \(3,\)$"):
        relprop.Explainer(model, "lrp-epsilon")(x, initial_relevance=torch.ones(3))
    with pytest.raises(ValueError, match="builds its own target and dual seeds"):
        relprop.Explainer(model, "clrp")(x, initial_relevance=torch.ones(2, 5))


def test_unknown_init_layer_fails_when_the_explainer_is_built(model):
    with pytest.raises(ValueError, match="^method 'rsp': no layer named 'features.29' in the model"):
        relprop.Explainer(model, "rsp", init_layer="features.29")


@pytest.mark.parametrize("method, params, error, message", [
    ("lrp-epsilon", {"epsilon": "abc"}, TypeError, "method 'lrp-epsilon': epsilon must be a number, got str 'abc'"),
    ("lrp-epsilon", {"epsilon": -1}, ValueError, "method 'lrp-epsilon': epsilon must be >= 0, got -1"),
    ("lrp-epsilon-plus", {"stabilizer": float("nan")}, ValueError,
     "method 'lrp-epsilon-plus': stabilizer must be finite, got nan"),
    ("lrp-epsilon", {"epsilon": True}, TypeError, "method 'lrp-epsilon': epsilon must be a number, got bool True"),
    ("lrp-alphabeta", {"alpha": "2", "beta": 1}, TypeError, "method 'lrp-alphabeta': alpha must be a number, got str '2'"),
    ("lrp-rap-repo", {"alpha": None}, TypeError, "method 'lrp-rap-repo': alpha must be a number, got NoneType None"),
    ("ae", {"ratio": "2"}, TypeError, "method 'ae': ratio must be a number, got str '2'"),
    ("ae", {"init_layer": 3}, TypeError, "method 'ae': init_layer must be a layer name (str) or None, got int 3"),
    ("rsp", {"init_layer": ["0"]}, TypeError, "method 'rsp': init_layer must be a layer name (str) or None, got list ['0']"),
    ("lrp-epsilon", {"zb_bounds": (1, 0)}, ValueError, "method 'lrp-epsilon': zb_bounds must be finite with low <= high, got (1, 0)"),
    ("lrp-epsilon", {"zb_bounds": "imag"}, ValueError, "method 'lrp-epsilon': zb_bounds must be 'image' or (low, high), got 'imag'"),
    ("ae", {"ratio": 3}, ValueError, "method 'ae': ratio r must lie in [1, 2], got 3"),
    ("clrp", {"variant": "clrp3"}, ValueError, "method 'clrp': variant must be 'clrp1' or 'clrp2', got 'clrp3'"),
    ("clrp", {"style": "x"}, ValueError, "method 'clrp': style must be 'gu' or 'agf', got 'x'"),
    ("lrp-alphabeta", {"alpha": 3, "beta": 1}, ValueError,
     "method 'lrp-alphabeta': alpha-beta needs alpha - beta = 1 and beta >= 0, got alpha=3, beta=1"),
    ("lrp-rap-repo", {"alpha": 0.5}, ValueError, "method 'lrp-rap-repo': alpha must be >= 1 (beta = alpha - 1), got 0.5"),
    ("clrp", {"zb_bounds": ("a", 1)}, TypeError,
     "method 'clrp': zb_bounds must be 'image' or (low, high) numbers or per-channel sequences, got ('a', 1)"),
    ("lrp-epsilon-plus", {"first_layer": "zbox"}, ValueError,
     "method 'lrp-epsilon-plus': first_layer must be one of 'zb', 'flat', 'same', got 'zbox'"),
    ("lrp-alphabeta", {"first_layer": None}, ValueError,
     "method 'lrp-alphabeta': first_layer must be one of 'zb', 'flat', 'same', got None"),
    ("lrp-epsilon-plus", {"zb_bounds": (-1, 1)}, ValueError,
     "method 'lrp-epsilon-plus': zb_bounds is used by first_layer='zb' only, got first_layer='same'"),
    ("lrp-gamma", {"gamma": -0.5}, ValueError, "method 'lrp-gamma': gamma must be >= 0, got -0.5"),
    ("lrp-gamma", {"gamma": "0.25"}, TypeError, "method 'lrp-gamma': gamma must be a number, got str '0.25'"),
    ("lrp-gamma", {"stabilizer": -1}, ValueError, "method 'lrp-gamma': stabilizer must be >= 0, got -1"),
    ("lrp-gamma", {"first_layer": "box"}, ValueError,
     "method 'lrp-gamma': first_layer must be one of 'zb', 'flat', 'same', got 'box'"),
    ("lrp-epsilon-gamma-box", {"gamma": float("inf")}, ValueError,
     "method 'lrp-epsilon-gamma-box': gamma must be finite, got inf"),
    ("lrp-epsilon-gamma-box", {"epsilon": -1e-6}, ValueError,
     "method 'lrp-epsilon-gamma-box': epsilon must be >= 0, got -1e-06"),
    ("lrp-epsilon-gamma-box", {"zb_bounds": (0, -1)}, ValueError,
     "method 'lrp-epsilon-gamma-box': zb_bounds must be finite with low <= high, got (0, -1)"),
])
def test_bad_parameters_fail_when_the_explainer_is_built(model, method, params, error, message):
    with pytest.raises(error) as err:
        relprop.Explainer(model, method, **params)
    assert str(err.value) == message


@pytest.mark.parametrize("target", ["3", b"3", ["1", "2"], object()])
def test_targets_that_are_not_class_indices(model, target):
    with pytest.raises(TypeError) as err:
        relprop.explain(model, torch.randn(2, 3, 8, 8), target, method="rap")
    assert str(err.value) == ("target must be None, an int class index, a sequence or tensor of them, or a "
                              "callable on the model output (or a sequence of per-sample callables); "
                              f"got {type(target).__name__} {target!r}")


def test_an_input_too_small_for_the_model_names_the_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(2),
                        nn.Flatten())
    with pytest.raises(ValueError) as err:
        relprop.explain(net, torch.randn(1, 3, 3, 3), method="rap")
    assert str(err.value) == ("the model cannot take an input of shape (1, 3, 3, 3): 3 (MaxPool2d) failed: "
                              "Given input size: (4x1x1). Calculated output size: (4x0x0). Output size is too small")


def test_an_input_the_models_own_check_refuses_is_a_value_error():
    """A model that asserts its input size (timm's patch embedding): a ValueError naming the
    check, with the sizes' names instead of the tracing proxies of its message, not a bare
    AssertionError reading 'Proxy(getitem)'."""
    class Checked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 2, 3, padding=1), nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            torch._assert(x.shape[2] == 8, f"Input height ({x.shape[2]}) doesn't match model (8).")
            return self.fc(self.conv(x).flatten(1))

    explainer = relprop.Explainer(Checked().eval(), "rap")
    explainer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError) as err:
        explainer(torch.randn(1, 3, 16, 8))
    assert re.fullmatch(r"the model cannot take an input of shape \(1, 3, 16, 8\): its check _assert \(call_function "
                        r"_assert\) failed: Input height \(<getitem\w*>\) doesn't match model \(8\)\.",
                        str(err.value)), str(err.value)


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        relprop.Explainer(lambda x: x, "rap")


def test_non_finite_relevance_is_reported(model, monkeypatch):
    ex = relprop.Explainer(model, "rap")
    run = ex.method.run
    monkeypatch.setattr(ex.method, "run", lambda ctx: run(ctx).index_fill(0, torch.tensor([1]), float("nan")))
    with pytest.warns(RuntimeWarning, match=r"method 'rap' gave NaN or Inf relevance for sample\(s\) \[1\]: a division "
                                            r"in its rules overflowed torch.float32; try float64"):
        rel = ex(torch.rand(3, 3, 8, 8))
    assert rel[1].isnan().all() and rel[[0, 2]].isfinite().all()


@pytest.mark.parametrize("index", ["tensor", "mask"])
def test_advanced_indexing_is_refused(index):
    class Net(nn.Module):
        def forward(self, x):
            return (x[:, torch.tensor([0, 2])] if index == "tensor" else x[x > 0]).flatten(1)

    with pytest.raises(relprop.UnsupportedModelError,
                       match=r"getitem \(call_function getitem\): only basic indexing \(ints, slices, None, \.\.\.\) "
                             r"of a tensor is supported"):
        relprop.Explainer(Net(), "rap")


def test_bicubic_upsampling_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2, mode="bicubic"), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 5, 5))
    with pytest.raises(relprop.UnsupportedModelError, match=r"1 \(Upsample\): mode='bicubic': only nearest, "
                                                            r"nearest-exact, bilinear, linear, area interpolate with "
                                                            r"weights >= 0"):
        relprop.Explainer(net, "rap")


def test_unpacking_an_unsupported_layers_output_names_that_layer():
    """nn.LSTM's ``(output, (h, c))``: the items taken from it blame the LSTM, not indexing."""
    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lstm, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.LSTM(4, 5, batch_first=True), \
                torch.nn.Linear(5, 2)

        def forward(self, x):
            out, _ = self.lstm(self.conv(x).flatten(2).transpose(1, 2))
            return self.fc(out[:, -1])

    with pytest.raises(relprop.UnsupportedModelError) as info:
        relprop.Explainer(Recurrent(), "rap")
    text = str(info.value)
    assert "  lstm (LSTM)" in text
    assert "getitem (call_function getitem): takes an item of the output of lstm, itself unsupported" in text
    assert "only basic indexing" not in text


def test_target_and_initial_relevance_together_are_refused(model):
    """The seed replaces the target's one-hot: a target passed with it would be reported in
    Attribution.target but not explained."""
    ex = relprop.Explainer(model, "lrp-epsilon")
    x = torch.randn(2, 3, 8, 8)
    message = ("pass target= or initial_relevance=, not both: initial_relevance seeds the output itself, "
               "so the target would be ignored")
    for entry in (ex, ex.heatmap, ex.attribute):
        with pytest.raises(ValueError) as err:
            entry(x, 1, initial_relevance=torch.ones(5))
        assert str(err.value) == message
        with pytest.raises(ValueError, match="not both"):
            entry(x, [0, 1], initial_relevance=lambda logits: logits)


def test_batch_norm_without_running_statistics_says_why():
    message = ("1 (BatchNorm2d): track_running_stats=False: relprop explains with inference semantics, which "
               "normalise by the running mean and variance; this BatchNorm keeps none and normalises by the "
               "statistics of the batch, which would make each sample's map depend on the other samples in the "
               "batch; build it with track_running_stats=True and estimate its statistics on training data "
               "(forward passes in train mode) before explaining")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(net, "rap")
    assert str(err.value).endswith("\n  " + message)

    class Functional(nn.BatchNorm2d):   # a subclass that torch.fx traces through (timm's BatchNormAct2d)
        def forward(self, x):
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            True, 0.1, self.eps)

    net[1] = Functional(4, track_running_stats=False)
    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(net, "rap")
    assert str(err.value).endswith("\n  " + message.replace("(BatchNorm2d)", "(Functional)"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_modules_are_refused_with_what_to_pass(model):
    x = torch.randn(2, 3, 8, 8)
    for scripted, name in [(torch.jit.script(model), "RecursiveScriptModule"),
                           (torch.jit.trace(model, x), "TopLevelTracedModule")]:
        with pytest.raises(relprop.UnsupportedModelError) as err:
            relprop.Explainer(scripted, "rap")
        assert str(err.value) == (f"TorchScript modules cannot be captured ({name}); pass the eager nn.Module "
                                  "(the model before torch.jit.script / torch.jit.trace)")
    model[0] = torch.jit.script(model[0])
    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(model, "rap")
    assert str(err.value) == ("TorchScript modules cannot be captured, and these submodules are TorchScript: "
                              "0 (RecursiveScriptModule); pass the eager nn.Module (the submodules before "
                              "torch.jit.script / torch.jit.trace)")


def test_a_parametrized_module_is_refused_with_what_to_do():
    """weight_norm / spectral_norm (torch.nn.utils.parametrize) compute the weight on access:
    refused, naming the layer and the remedy; the remedy then works."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3)), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(model, "rap")
    assert str(err.value) == (
        "relprop has no relevance rule for these operations of Sequential:\n"
        "  0 (ParametrizedConv2d): a parametrized module (torch.nn.utils.parametrize: weight_norm, spectral_norm, "
        "...); explain a copy of the model with torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') "
        "applied")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    parametrize.remove_parametrizations(model[0], "weight")
    att = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-9).attribute(x)
    torch.testing.assert_close(att.logits, expected)
