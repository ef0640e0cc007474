"""Float32 and half-precision maps against float64 (README, Numerics).

The contract: a float32 map agrees with the float64 map of the same model and input, or the
explainer says per sample why not (``Attribution.error`` above the trusted bound, with a
RuntimeWarning).  Where float64 is itself unstable -- a 1e-7 relative change of the input
moves its map -- no precision can agree with it; those samples are identified by the oracle
here (float64 perturbation, or a forward decision -- a ReLU sign, a max-pool winner -- that
differs between float32 and float64), never by the library, which only estimates.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
from relprop import engine
from relprop import graph as g
from relprop.benchmark import models, shapes
from relprop.benchmark.models import ShapesResNet, small_vgg
from relprop.explainer import trusted_error

ALL_METHODS = sorted(relprop.available_methods())
GRADIENTS = ("gradient", "gradient-x-input")


def rel_l2(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a - b).norm(dim=1) / b.norm(dim=1)


def realistic(model, seed, size=16):
    """Trained-looking BatchNorm: affine parameters away from 1/0 and running statistics of
    real activations (a few training-mode passes with cumulative averages)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 1 + 0.3 * torch.randn(m.weight.shape, generator=gen)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=gen)
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 3, size, size, generator=gen))
    return model.eval()


def explain_quietly(explainer, x, target):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return explainer.attribute(x, target)


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_float32_agrees_with_float64_where_float64_is_stable(arch, seed):
    torch.manual_seed(seed)
    model = realistic(small_vgg(8, 10) if arch == "vgg" else ShapesResNet(10, (8, 12, 16)), seed)
    model64 = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(6, 3, 16, 16, generator=gen)
    x64 = x.double()
    nudged = x64 * (1 + 1e-7 * torch.randn(x64.shape, generator=gen, dtype=torch.float64))
    target = model64(x64).argmax(1)
    checked = 0
    for method in ALL_METHODS:
        e32, e64 = relprop.Explainer(model, method), relprop.Explainer(model64, method)
        r32 = explain_quietly(e32, x, target).relevance
        r64 = explain_quietly(e64, x64, target).relevance
        stable = rel_l2(explain_quietly(e64, nudged, target).relevance, r64) < 1e-5
        err = rel_l2(r32, r64)
        assert (err[stable] <= 1e-4).all(), (method, err.tolist(), stable.tolist())
        checked += int(stable.sum())
    # (RAP on random ResNets is often float64-unstable; everything else is checked)
    assert checked >= 0.75 * len(ALL_METHODS) * x.shape[0], "float64 unstable almost everywhere: the test checks little"


def decision_flips(model, model64, x):
    """Per sample: does a ReLU sign or a max-pool winner differ between the float32 and
    float64 forward passes?  (The map is then discontinuous right there.)"""
    graph32, graph64 = g.capture(model), g.capture(model64)
    with torch.no_grad():
        v32, v64 = graph32.forward(x), graph64.forward(x.double())
    flips = torch.zeros(x.shape[0], dtype=torch.bool)
    for n in graph64.nodes:
        if n.kind == g.RELU:
            a, b = v32[n.parents[0]], v64[n.parents[0]]
            flips |= ((a > 0) != (b > 0)).flatten(1).any(1)
        elif n.kind == g.MAXPOOL:     # a different winner, or a different number of tied winners
            m = n.module
            flips |= (_winners(v32[n.parents[0]], m) != _winners(v64[n.parents[0]], m)).flatten(1).any(1)
    return flips


def _winners(x, m):
    """Per window of max pool ``m`` (no padding, no ceil mode: the built-in models'), which
    entries equal the window's maximum: (B, C * k * k, windows) booleans."""
    assert m.padding == 0 and not m.ceil_mode
    cols = F.unfold(x, m.kernel_size, m.dilation, 0, m.stride or m.kernel_size)
    b, c = x.shape[:2]
    cols = cols.reshape(b, c, -1, cols.shape[-1])
    return cols == cols.amax(2, keepdim=True)


@pytest.fixture(scope="module")
def benchmark_images():
    data = shapes.ShapesDataset(200, size=models.INPUT_SIZE, seed=0, split="test")
    return shapes.normalise(torch.stack([data[i]["image"] for i in range(len(data))]))


# Where the estimate reports most maps (README, Numerics): RAP's signed residual split on every
# residual model (its float64 maps move by up to ~0.1-0.2 under a 1e-7 change of the input;
# 30-94 % of its float32 maps are above 1e-3 on the ResNet, ConvNeXt and ViT); on the ResNet the
# same signed split in LRP-alphabeta, CLRP and SGLRP (34, 42 and 33 maps reported of 200, 3, 7
# and 5 above 1e-3): the maps are still never wrong unreported.  (SGLRP and lrp-rap-repo on the
# ConvNeXt were here, 192 and 168 maps reported, until their signed layers stopped doubling
# the relevance: now 10 and 4, none above 1e-3.)
REPORTED_BY_DESIGN = {("shapes-resnet", "rap"), ("shapes-convnext", "rap"), ("shapes-vit", "rap"),
                      ("shapes-resnet", "lrp-alphabeta"), ("shapes-resnet", "clrp"), ("shapes-resnet", "sglrp")}


@pytest.mark.slow
@pytest.mark.parametrize("name", models.MODELS)
def test_builtin_models_float32_maps_agree_or_are_reported(name, benchmark_images):
    """Every method, every image of the benchmark's test split: float32 within 1e-3 of
    float64, or reported (error estimate above the bound), or at a forward decision that
    float32 and float64 take differently, or where the float64 map itself moves by more than
    1e-4 under a 1e-7 relative change of the input (no float32 result can then be closer).  The
    estimate must not cry wolf either: apart from REPORTED_BY_DESIGN, at most 15% of the maps
    are reported."""
    model = models.load(name)
    model64 = copy.deepcopy(model).double()
    x = benchmark_images
    x64 = x.double()
    gen = torch.Generator().manual_seed(0)
    target = model64(x64).argmax(1)
    flips = decision_flips(model, model64, x)
    assert flips.float().mean() <= 0.03
    for method in ALL_METHODS:
        e32, e64 = relprop.Explainer(model, method), relprop.Explainer(model64, method)
        parts = [explain_quietly(e32, x[i:i + 50], target[i:i + 50]) for i in range(0, len(x), 50)]
        r32 = torch.cat([p.relevance for p in parts])
        reported = torch.cat([p.error for p in parts]) > trusted_error(torch.float32)
        r64 = torch.cat([explain_quietly(e64, x[i:i + 50].double(), target[i:i + 50]).relevance
                         for i in range(0, len(x), 50)])
        err = rel_l2(r32, r64)
        unexplained = (err > 1e-3) & ~reported & ~flips
        if unexplained.any():        # is float64 itself unstable there? (its map moves under a 1e-7 nudge)
            moved = torch.zeros(int(unexplained.sum()), dtype=torch.bool)
            for _ in range(4):
                nudged = x64[unexplained] * (1 + 1e-7 * torch.randn(x64[unexplained].shape, generator=gen,
                                                                    dtype=torch.float64))
                moved |= rel_l2(explain_quietly(e64, nudged, target[unexplained]).relevance, r64[unexplained]) > 1e-4
            unexplained[unexplained.clone()] = ~moved
        assert not unexplained.any(), (method, unexplained.nonzero()[:, 0].tolist(), err[unexplained].tolist())
        if (name, method) not in REPORTED_BY_DESIGN:
            assert reported.float().mean() <= 0.15, (method, int(reported.sum()))


def test_rap_on_the_builtin_resnet_is_reported(benchmark_images, monkeypatch):
    """The residual splits of RAP on shapes-resnet nearly cancel: the warning names the samples.
    RSP's splits are of one sign: no residual add amplifies anything (RSP maps may still be
    reported for other steps: an input near 0, a max-pool near-tie)."""
    model = models.load("shapes-resnet")
    with pytest.warns(RuntimeWarning, match=r"method 'rap': the map\(s\) of sample\(s\) \[.*\] of this float32 model "
                                            r"may be off by up to ~\de[+-]\d\d \(relative L2\): an ill-conditioned step"):
        att = relprop.Explainer(model, "rap").attribute(benchmark_images[:8])
    assert (att.error > 1e-3).sum() >= 4
    amplifications = []
    measure = engine.split_amplification
    monkeypatch.setattr(engine, "split_amplification", lambda r0, r1: amplifications.append(measure(r0, r1))
                        or amplifications[-1])
    explain_quietly(relprop.Explainer(model, "rsp"), benchmark_images[:8], None)
    assert len(amplifications) == 3 and all(((a - 1).abs() < 1e-5).all() for a in amplifications), amplifications


def test_sglrp_on_a_confident_model_agrees_with_float64():
    """SGLRP's target seed p_t (1 - p_t): with p_t within 1e-6 of 1, 1 - p_t cancels in
    float32; computed as the sum of the other probabilities it does not."""
    torch.manual_seed(0)
    model = realistic(small_vgg(8, 10), 0)
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
        scale = 16 / (top2[:, 0] - top2[:, 1]).median()   # the median logit margin becomes 16
        model[-1][-1].weight.mul_(scale)
        model[-1][-1].bias.mul_(scale)
    model64 = copy.deepcopy(model).double()
    p = model64(x.double()).softmax(1).amax(1)
    keep = (p > 1 - 1e-4) & (p < 1 - 1e-12)   # confident, and 1 - p_t still representable in float64
    x = x[keep]
    assert len(x) >= 4, p
    r32 = relprop.Explainer(model, "sglrp")(x)
    r64 = relprop.Explainer(model64, "sglrp")(x.double())
    assert (rel_l2(r32, r64) < 1e-4).all(), rel_l2(r32, r64)


@pytest.mark.parametrize("dense", [False, True], ids=["classifier", "dense"])
def test_sglrp_on_an_improbable_target_agrees_with_float64(dense):
    """SGLRP's dual seed p_t p_n for a target 150 logits below the others (p_t ~1e-65):
    float32 rounded it to 0, so the dual map was 0 and the map R_t alone (2-4 off float64,
    estimated at 1e-7: unreported).  Scaled per sample in log space it agrees with float64
    (the map divides the dual relevance by its sum, so the scale changes nothing)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    layers += [nn.Conv2d(8, 5, 1)] if dense else [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        model[-1].bias.zero_()
        model[-1].bias[0] = -150.0
    x = torch.randn(4, 3, 8, 8)
    model64 = copy.deepcopy(model).double()
    assert (model(x).softmax(1)[:, 0] == 0).all()     # the case: the target's probability underflows float32
    att = explain_quietly(relprop.Explainer(model, "sglrp"), x, 0)
    err = rel_l2(att.relevance, relprop.Explainer(model64, "sglrp")(x.double(), 0))
    # dense: each position's p_t carries the float32 rounding of its logit (~150 u = 1e-5
    # absolute, so 1e-5 relative); a classifier's one p_t per sample cancels in the scaling
    assert (err < (1e-4 if dense else 1e-5)).all(), err
    assert (att.error < 1e-3).all(), att.error


@pytest.mark.parametrize("method", ["lrp-epsilon", "rap", "rsp", "clrp"])
def test_zbox_input_layer_does_not_cancel_far_from_zero(method):
    """z^B on inputs far from 0 and close together (a bright, low-contrast image on an
    unnormalised scale): the textbook form subtracts sums of size ~1000 * sum|w| to get a Z
    of size ~0.5 * sum|w| (1.5e-4 off float64); the cancellation-free form keeps float32
    exact (2e-7)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()
    x = 1000 + torch.rand(3, 3, 12, 12)
    params = {"zb_bounds": (999.5, 1001.5)} if method == "clrp" else {}
    r32 = relprop.Explainer(model, method, **params)(x, 1)
    r64 = relprop.Explainer(copy.deepcopy(model).double(), method, **params)(x.double(), 1)
    assert (rel_l2(r32, r64) < 1e-5).all(), rel_l2(r32, r64)


# median relative L2 against float64 (README, Numerics); LRP-epsilon (the epsilon rule on every
# layer, with epsilon 1e-6 next to nothing) is the worst-conditioned: measured on these 32 images
# medians of 0.019 (float16) and 0.095 (bfloat16), every other method at most 0.008 and 0.038
HALF_BOUND = {torch.float16: 2e-2, torch.bfloat16: 8e-2}
HALF_BOUND_EPSILON = {torch.float16: 4e-2, torch.bfloat16: 0.15}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models_get_float32_relevance_within_the_stated_bound(dtype, benchmark_images):
    model = models.load("shapes-vgg")
    model64 = copy.deepcopy(model).double()
    half = copy.deepcopy(model).to(dtype)
    x = benchmark_images[:32]
    target = model64(x.double()).argmax(1)
    for method in ALL_METHODS:
        if method in GRADIENTS:
            continue
        att = explain_quietly(relprop.Explainer(half, method), x.to(dtype), target)
        assert att.relevance.dtype == torch.float32 and att.error.dtype == torch.float32
        r64 = relprop.Explainer(model64, method)(x.double(), target)
        err = rel_l2(att.relevance, r64)
        bound = (HALF_BOUND_EPSILON if method == "lrp-epsilon" else HALF_BOUND)[dtype]
        assert err.median() <= bound, (method, err.median().item())


def test_split_amplification_of_exactly_cancelling_shares_is_infinite():
    """Shares of opposite sign that sum to exactly 0 (relevance from nothing) make the
    estimate infinite, so the map is reported; no shares at all leave it at 1."""
    from relprop.engine import split_amplification
    r0 = torch.tensor([[1.0, 2.0], [0.0, 2.0], [3.0, 1.0]])
    r1 = torch.tensor([[-1.0, 2.0], [0.0, 2.0], [1.0, 1.0]])
    amp = split_amplification(r0, r1)
    assert amp[0] == float("inf")
    assert amp[1] == 1.0 and amp[2] == 1.0        # one-signed shares: no amplification
    r0, r1 = torch.tensor([[3.0, -1.0]]), torch.tensor([[-1.0, 2.0]])   # |R| = (2, 1), sum|.| = (4, 3)
    want = torch.tensor([4.0**2 / 2, 3.0**2 / 1]).norm() / torch.tensor([2.0, 1.0]).norm()
    torch.testing.assert_close(split_amplification(r0, r1), want.reshape(1))


def test_split_errors_grow_where_the_shares_cancel():
    """A share's own error is ADD_INPUT_UNITS u |R_k| (1 + kappa), kappa = (|R0| + |R1|) / |R|:
    one-signed shares get 2 units, opposite shares of a small R many more, shares that sum to
    exactly 0 (relevance from nothing) an infinite error, and no shares none; on top, each
    share inherits |R_k / R| of the error e of R and |R_k| times the step's relative error."""
    from relprop.engine import ADD_INPUT_UNITS, split_errors
    r0 = torch.tensor([[1.0, 2.0, 0.0, 3.0]], dtype=torch.float64)
    r1 = torch.tensor([[-1.0, 2.0, 0.0, -2.5]], dtype=torch.float64)
    r = r0 + r1
    u = 2.0 ** -24
    e0, e1 = split_errors(r, r0, r1, None, 0.0, u)
    kappa = torch.tensor([1.0, 0.0, 5.5 / 0.5], dtype=torch.float64)
    assert e0[0, 0] == e1[0, 0] == float("inf")
    assert e0[0, 2] == e1[0, 2] == 0
    torch.testing.assert_close(e0[0, 1:], ADD_INPUT_UNITS * u * (1 + kappa) * r0[0, 1:].abs())
    torch.testing.assert_close(e1[0, 1:], ADD_INPUT_UNITS * u * (1 + kappa) * r1[0, 1:].abs())
    e = torch.tensor([[0.0, 1e-3, 0.0, 2e-3]], dtype=torch.float64)
    f0, f1 = split_errors(r, r0, r1, e, 1e-5, u)
    for rk, got, own in ((r0, f0, e0), (r1, f1, e1)):
        at = [1, 3]     # (entry 0 stays infinite, entry 2 has no shares: 0)
        torch.testing.assert_close(got[0, at], own[0, at] + (rk / r).abs()[0, at] * e[0, at] + rk.abs()[0, at] * 1e-5)
        assert got[0, 0] == float("inf") and got[0, 2] == 0
    assert r0.tolist() == [[1.0, 2.0, 0.0, 3.0]] and r1.tolist() == [[-1.0, 2.0, 0.0, -2.5]]   # read only


def _vit_stream_study():
    """scripts/vit_stream_study.py, whose TinyViT is timm's vit_tiny layout in plain PyTorch."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "vit_stream_study.py"
    spec = importlib.util.spec_from_file_location("vit_stream_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rap_on_a_vit_residual_stream_is_reported(monkeypatch):
    """RAP on an untrained ViT (scripts/vit_stream_study.py, seed 0): its signed residual
    splits put rounding errors into the stream where shares cancel, and the next split meets
    them at the same entries, so they grow from add to add where each add's own amplification
    is modest.  RAP's walk carries its errors entrywise along the stream
    (``Context.propagate_together``): every map more than 2e-3 off float64 (7 of 8 here,
    2.5e-3 to 8.5e-2; the eighth, 1.8e-3, too) is reported, each estimate within 7x of its
    error (the bar below leaves room for another machine's rounding).  The per-step estimate alone (``carries_errors`` off) left three of them unreported
    (2.5e-3, 2.9e-3 and 4.2e-3 off, estimated at 2.3e-4 to 6.5e-4).
    rap-split (one-signed shares) agrees with float64 and is not reported."""
    torch.manual_seed(0)
    model = _vit_stream_study().TinyViT().eval()
    model64 = copy.deepcopy(model).double()
    x = torch.randn(8, 3, 64, 64)
    explainer = relprop.Explainer(model, "rap")
    att = explain_quietly(explainer, x, 1)
    err = rel_l2(att.relevance, relprop.Explainer(model64, "rap")(x.double(), 1))
    off = err > 2e-3      # twice the bar: another machine's float32 rounding moves these maps' errors
    assert off.sum() >= 4, err                         # the case is exercised
    assert (att.error[off] > trusted_error(torch.float32)).all(), (err, att.error)
    assert (att.error >= err / 20).all(), (err, att.error)
    for t in (explainer.method.with_head, explainer.method.without_head):
        monkeypatch.setattr(t, "carries_errors", False)
    per_step = explain_quietly(explainer, x, 1).error
    assert (per_step[off] <= trusted_error(torch.float32)).any(), (err, per_step)   # the carry is what reports them
    split = explain_quietly(relprop.Explainer(model, "rap-split"), x, 1)
    assert (rel_l2(split.relevance, relprop.Explainer(model64, "rap-split")(x.double(), 1)) < 1e-4).all()
    assert (split.error < trusted_error(torch.float32)).all(), split.error


def test_a_pre_activation_near_epsilon_is_reported():
    """LRP-epsilon where a pre-activation of 1e-7 (two products of 0.7 that cancel) sits next to
    epsilon = 1e-6: ``z / (z + eps)`` inherits the 27 % rounding error of that ``z`` in float32,
    so the map is 6.5e-3 off float64 (the earlier built-in VGG had such a pixel on test image
    171).  The epsilon rule's estimate (engine.epsilon_zone_error) reports it, pessimistically
    (15x); with epsilon 0 (the ratio is exactly 1) the map is exact and nothing is reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 1, 1, bias=False), nn.Flatten(),
                          nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))       # the input layer (its own rule)
        model[1].weight.copy_(torch.tensor([0.7, -0.3]).view(1, 2, 1, 1))
    model64 = copy.deepcopy(model).double()
    w0, w1 = model64[1].weight.flatten().tolist()
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    x[0, 0] = torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    x[0, 0, 2, 2], x[0, 1, 2, 2] = 1.0, (w0 - 1e-7) / -w1         # z = w0 + w1 x1 = 1e-7 at pixel (2, 2)
    a = explain_quietly(relprop.Explainer(model, "lrp-epsilon"), x.float(), torch.tensor([0]))
    r64 = relprop.Explainer(model64, "lrp-epsilon").attribute(x, 0).relevance
    err = rel_l2(a.relevance, r64).item()
    assert err > 1e-3 and a.error.item() > trusted_error(torch.float32)
    assert a.error.item() < 50 * err
    exact = relprop.Explainer(model, "lrp-epsilon", epsilon=0).attribute(x.float(), 0)
    exact64 = relprop.Explainer(model64, "lrp-epsilon", epsilon=0).attribute(x, 0).relevance
    assert exact.error.item() < 1e-6 and rel_l2(exact.relevance, exact64).item() < 1e-6


def test_the_epsilon_estimate_follows_samples_through_windows():
    """A Linear over (samples x windows, tokens, channels) rows (Swin's window attention): the
    estimate of each row is gathered to its own sample (Context.add_relative_error)."""
    from relprop.engine import Context
    ctx = Context.__new__(Context)
    ctx.error = torch.zeros(2, dtype=torch.float64)
    err = torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64)      # 2 samples x 2 windows
    ref = torch.tensor([1.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    ctx.add_relative_error(err, ref)
    torch.testing.assert_close(ctx.error, torch.tensor([0.0, 3.0 / 4.0], dtype=torch.float64))
    ctx.add_relative_error(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ctx.error, torch.tensor([1.0, 1.75], dtype=torch.float64))


class MaskedAttention(nn.Module):
    """Four tokens of width 2 -> q, k, v -> attention in which tokens 0-1 and 2-3 see each other
    only through a -100 mask (a Swin's shift mask: weights of ~exp(-100), subnormal in float32)
    -> a head on the mean token; ``fused``: ``scaled_dot_product_attention``, else written out."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.q, self.k, self.v, self.head = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 3)
        mask = torch.zeros(4, 4)
        mask[:2, 2:] = mask[2:, :2] = -100.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        else:
            out = ((q @ k.transpose(-2, -1)) * 2 ** -0.5 + self.mask).softmax(-1) @ v
        return self.head(out.mean(1))


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "written-out"])
@pytest.mark.parametrize("method", ["rap", "rap-split", "sglrp", "lrp-rap-repo"])
def test_subnormal_attention_weights(fused, method, monkeypatch):
    """The values of tokens 0-1 are negative, those of 2-3 positive, so the positive part of the
    first two outputs is a sum of subnormal weights alone: the sign-split quotients overflowed
    float32 (NaN maps).  Now: finite; with sdpa the weights are recomputed in float64 and the map
    is the float64 model's; written out, the subnormal weights' few bits make the map ~8% off,
    and the estimate says so (within a factor 3).  RAP's hidden rule gives the subnormal part its
    share by absolute contribution, a share as small as the weights, so there its map is the
    float64 model's written out too.  (The head's mean over the signed tokens has an estimate of
    its own, rules.report_signed_average, tested apart: left out here.)"""
    monkeypatch.setattr(relprop.rules, "report_signed_average", lambda *args: None)
    torch.manual_seed(0)
    model = MaskedAttention(fused).eval()
    with torch.no_grad():
        model.v.weight.copy_(torch.eye(2))
        model.v.bias.zero_()
    x = torch.tensor([[[-1.0, -2.0], [-0.5, -1.5], [2.0, 1.0], [1.0, 3.0]]])
    want = relprop.Explainer(copy.deepcopy(model).double(), method).attribute(x.double(), target=2).relevance
    got = explain_quietly(relprop.Explainer(model, method), x, torch.tensor([2]))
    assert torch.isfinite(got.relevance).all() and want.abs().sum() > 0
    err = rel_l2(got.relevance.double(), want).item()
    if fused or method in ("rap", "rap-split"):
        assert err < 2e-6 and got.error.item() < 1e-6, (err, got.error)
    else:
        assert err > 1e-2 and err / 3 < got.error.item() < 3 * err, (err, got.error)


def test_rap_split_on_the_builtin_convnext_agrees_with_float64():
    """GELU outputs that float32 rounds to exactly 0 (``1 + erf`` cancels below x = -5.3) and
    float64 keeps changed the count of non-zero entries that RAP's uniform shift goes to, and
    the LayerNorm z-rule amplified the shifted relevance: float32 maps were ~1e-2 off float64.
    Signed entries below rap.SIGNED_ZERO count as zero, LayerNorms pass relevance unchanged."""
    model = models.load("shapes-convnext")
    data = shapes.ShapesDataset(8, size=models.INPUT_SIZE, seed=0, split="test")
    x = shapes.normalise(torch.stack([data[i]["image"] for i in range(len(data))]))
    model64 = copy.deepcopy(model).double()
    target = model64(x.double()).argmax(1)
    r32 = explain_quietly(relprop.Explainer(model, "rap-split"), x, target)
    r64 = relprop.Explainer(model64, "rap-split").attribute(x.double(), target)
    err = rel_l2(r32.relevance, r64.relevance)
    assert (err < 1e-3).all(), err


def test_a_signed_average_pool_is_estimated_on_the_builtin_convnext():
    """ConvNeXt's global average pool reads the signed residual stream: where a channel's
    entries nearly cancel, the proportional shares ``x_i R / mean(x)`` are large, of both signs,
    and magnify the forward's rounding like a two-way residual split.  These three test images'
    rap-split maps were up to 5.5e-3 off float64 (how far depends on the convolution algorithms'
    rounding: 1e-3 to 5.5e-3 on one machine, 6e-5 to 3.5e-3 under CI) and reported by nothing
    (estimate 7e-7); the pool's estimate now reports them, and covers the measured error."""
    model = models.load("shapes-convnext")
    data = shapes.ShapesDataset(200, size=models.INPUT_SIZE, seed=0, split="test")
    items = [147, 171, 195]
    x = shapes.normalise(torch.stack([data[i]["image"] for i in items]))
    model64 = copy.deepcopy(model).double()
    target = model64(x.double()).argmax(1)
    r32 = explain_quietly(relprop.Explainer(model, "rap-split"), x, target)
    r64 = relprop.Explainer(model64, "rap-split").attribute(x.double(), target)
    err = rel_l2(r32.relevance, r64.relevance)
    assert (r32.error > trusted_error(torch.float32)).all() and (r32.error >= err).all(), (r32.error, err)


def test_an_average_pool_of_relu_outputs_is_not_estimated(monkeypatch):
    """A proportional average over non-negative inputs has shares of one sign (k = 1): no
    estimate is computed there; over signed inputs it is."""
    calls = []
    measure = relprop.rules.report_signed_average
    monkeypatch.setattr(relprop.rules, "report_signed_average", lambda *a: calls.append(1) or measure(*a))
    torch.manual_seed(0)
    for act, expected in ((nn.ReLU(), 0), (nn.GELU(), 1)):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
        calls.clear()
        explain_quietly(relprop.Explainer(model, "rap-split"), torch.randn(2, 3, 8, 8), None)
        assert len(calls) == expected, act


def _near_tie_pool(clear: bool):
    """A 1x1 conv (float32 weights 0.7, 0.3) -> 2x2 max pool -> Linear, and an input whose first
    window holds 0.7 * 1 and 0.3 * c, c = 7/3 (1 - 2.8e-8): in float64 the second entry is the
    larger, by 2.9e-8 of its size; float32 rounds the two to a tie, and its pool takes the first
    (PyTorch's first maximum).  ``clear``: c 1e-3 larger, the same winner in both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 1, 1, bias=False), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.7, 0.3]).view(1, 2, 1, 1))
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    x[0, 0] = torch.rand(4, 4, dtype=torch.float64) * 0.5
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 1.0, 0.0
    x[0, 1, 0, 1] = 7 / 3 * (1 + (1e-3 if clear else -2.8e-8))
    return model, x


@pytest.mark.parametrize("method", ["lrp-epsilon", "lrp-epsilon-plus", "lrp-alphabeta", "lrp-gamma", "rap",
                                    "rap-split", "gradient", "gradient-x-input"])
def test_a_max_pool_near_tie_is_reported(method):
    """A max-pool window whose winner is decided by rounding: float32 and float64 send its
    relevance (the gradient baselines: autograd's gradient) to different entries (the maps are
    ~0.3-1.3 apart); the estimate (rules.near_ties_reported; engine.GradientDecisions) says
    so, within a factor 2; a clear winner adds nothing."""
    model, x = _near_tie_pool(clear=False)
    model64 = copy.deepcopy(model).double()
    got = explain_quietly(relprop.Explainer(model, method), x.float(), torch.tensor([0]))
    want = relprop.Explainer(model64, method).attribute(x, 0).relevance
    err = rel_l2(got.relevance, want).item()
    assert err > 0.1 and got.error.item() > trusted_error(torch.float32)
    assert err / 2 < got.error.item() < 2 * err, (err, got.error)
    model, x = _near_tie_pool(clear=True)
    clear = relprop.Explainer(model, method).attribute(x.float(), 0)
    assert clear.error.item() < 1e-6


def _near_zero_relu(clear: bool):
    """A 1x1 input conv (float32 weights 0.7, -0.3) -> ReLU -> two 3x3 convs -> head, and an input
    whose pre-activation at one pixel is 0.7 - 0.3 c, c = 7/3 (1 - 6e-8): +2e-9 in float64 and
    -1.6e-8 in float32 (rounding), so the entry is active in one and 0 in the other; ``clear``:
    c 1e-3 smaller (a pre-activation of 7e-4, active in both)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 1, 1, bias=False), nn.ReLU(), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.7, -0.3]).view(1, 2, 1, 1))
    x = torch.zeros(1, 2, 6, 6, dtype=torch.float64)
    x[0, 0] = torch.rand(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    x[0, 0, 2, 2] = 1.0
    x[0, 1, 2, 2] = 7 / 3 * (1 - (1e-3 if clear else 6e-8))
    return model, x


@pytest.mark.parametrize("method", ["ae", "rsp", "rap", "gradient", "gradient-x-input"])
def test_an_input_within_rounding_of_zero_is_reported(method):
    """The uniform shift of RAP, RSP and AE goes to the non-zero entries, AE gives active and
    inactive inputs different terms, and a ReLU's gradient is 1 or 0: an input within rounding
    of 0 that float32 makes 0 and float64 does not moves the map (AE 1.3, gradient x input 0.17,
    gradient 0.12, RSP 0.11, RAP 0.06 off float64, unreported before).  The rule reads the ReLU's
    pre-activation (rules.near_zero; the forward's, engine.GradientDecisions, for the gradient)
    and reports the crossing, within a factor 4 here; a pre-activation clearly away from 0 adds
    nothing."""
    model, x = _near_zero_relu(clear=False)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        assert model[0](x.float())[0, 0, 2, 2] < 0 < model64[0](x)[0, 0, 2, 2]
    got = explain_quietly(relprop.Explainer(model, method), x.float(), torch.tensor([0]))
    want = relprop.Explainer(model64, method).attribute(x, 0).relevance
    err = rel_l2(got.relevance, want).item()
    assert err > 1e-2 and got.error.item() > trusted_error(torch.float32)
    assert err / 4 < got.error.item() < 4 * err, (err, got.error)
    model, x = _near_zero_relu(clear=True)
    clear = relprop.Explainer(model, method).attribute(x.float(), 0)
    assert clear.error.item() < 1e-6


@pytest.mark.parametrize("slope", [0.1, 0.5])
def test_a_leaky_relu_input_within_rounding_of_zero_is_reported_for_the_gradient(slope):
    """A leaky ReLU's gradient is 1 above 0 and ``slope`` below: _near_zero_relu's crossing
    changes the gradient by (1 - slope) |g| there (0.105 and 0.059 off float64), which the
    estimate reports (it reads the input autograd keeps for the leaky ReLU), within a factor 2."""
    for clear in (False, True):
        model, x = _near_zero_relu(clear=clear)
        model[1] = nn.LeakyReLU(slope)
        model64 = copy.deepcopy(model).double()
        for method in ("gradient", "gradient-x-input"):
            got = explain_quietly(relprop.Explainer(model, method), x.float(), torch.tensor([0]))
            want = relprop.Explainer(model64, method).attribute(x, 0).relevance
            err = rel_l2(got.relevance, want).item()
            if clear:
                assert err < 1e-6 and got.error.item() == 0, (method, err, got.error)
            else:
                assert err > 5e-2 and err / 2 < got.error.item() < 2 * err, (method, err, got.error)


def _derivative(act: nn.Module, z: torch.Tensor) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    act(z).sum().backward()
    return z.grad


def _near_kink(act: nn.Module, point: float, clear: bool):
    """_near_zero_relu's net with ``act`` after the 1x1 conv and an input whose pre-activation
    at one pixel is within rounding of ``point``, where ``act``'s derivative jumps, on the side
    that float32 and float64 differentiate differently (the first such input found, scanning
    outwards in steps of 1e-8); ``clear``: 1e-3 away from it."""
    model, x = _near_zero_relu(clear=True)
    model[1] = act
    x[0, 0] *= 2.5            # inputs of 1.25-3.75, near the size of those at the kink (pre-activations 0.9-2.6)
    a = point
    c0 = (0.7 * a - point) / 0.3                  # 0.7 a - 0.3 c0 = point: c0 = -point
    x[0, 0, 2, 2] = a
    if clear:
        x[0, 1, 2, 2] = c0 * (1 - 1e-3)
        return model, x
    conv64 = copy.deepcopy(model[0]).double()
    for k in sorted(range(-60, 61), key=abs):
        x[0, 1, 2, 2] = c0 * (1 + k * 1e-8)
        with torch.no_grad():
            z64, z32 = conv64(x)[0, 0, 2, 2], model[0](x.float())[0, 0, 2, 2]
        if (_derivative(act, z64) - _derivative(act, z32).double()).abs() > 0.1:
            return model, x
    raise AssertionError(f"no input near {point} that float32 and float64 differentiate differently")


@pytest.mark.parametrize("act, point, jump", [(nn.ReLU6(), 6.0, 1.0), (nn.Hardswish(), 3.0, 0.5),
                                              (nn.Hardswish(), -3.0, 0.5)])
def test_an_input_within_rounding_of_a_kink_is_reported_for_the_gradient(act, point, jump):
    """The derivative of ReLU6 jumps by 1 at 6 and that of Hardswish by 1/2 at -3 and 3: a
    pre-activation within rounding of such a point that float32 and float64 differentiate on
    different sides moves the gradient there by the jump times |g|; the estimate reports it
    (from the input autograd keeps for these activations) within a factor 2 (4 for gradient x
    input, whose estimate is the gradient's relative error: exact where the input at the kink
    is of the size of the input elsewhere), and nothing for an input clearly away from the
    point."""
    model, x = _near_kink(act, point, clear=False)
    model64 = copy.deepcopy(model).double()
    for method in ("gradient", "gradient-x-input"):
        got = explain_quietly(relprop.Explainer(model, method), x.float(), torch.tensor([0]))
        want = relprop.Explainer(model64, method).attribute(x, 0).relevance
        err = rel_l2(got.relevance, want).item()
        factor = 2 if method == "gradient" else 4
        assert err > 5 * trusted_error(torch.float32) and err / factor < got.error.item() < factor * err, \
            (method, err, got.error)
    model, x = _near_kink(act, point, clear=True)
    model64 = copy.deepcopy(model).double()
    for method in ("gradient", "gradient-x-input"):
        got = explain_quietly(relprop.Explainer(model, method), x.float(), torch.tensor([0]))
        want = relprop.Explainer(model64, method).attribute(x, 0).relevance
        assert rel_l2(got.relevance, want).item() < 1e-6 and got.error.item() == 0, (method, got.error)


class _FunctionalPoolNet(nn.Module):
    """_near_tie_pool's net written with functional calls (F.relu, F.max_pool2d with its
    arguments by position and by name)."""

    def __init__(self, model):
        super().__init__()
        self.conv, self.fc = model[0], model[3]

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv(x)), 2, stride=2)
        return self.fc(torch.flatten(y, 1))


def test_functional_max_pool_and_relu_are_reported_for_the_gradient():
    model, x = _near_tie_pool(clear=False)
    net = _FunctionalPoolNet(model).eval()
    net64 = copy.deepcopy(net).double()
    got = explain_quietly(relprop.Explainer(net, "gradient"), x.float(), torch.tensor([0]))
    want = relprop.Explainer(net64, "gradient").attribute(x, 0).relevance
    err = rel_l2(got.relevance, want).item()
    assert err > 0.1 and err / 2 < got.error.item() < 2 * err, (err, got.error)


@pytest.mark.parametrize("method", ["gradcam", "rsp", "ae"])
def test_a_near_tie_after_the_grad_cam_layer_is_not_reported(method):
    """Grad-CAM (and RSP and AE, which start from it) uses the gradient at its layer only through
    each channel's spatial mean, which a move within a max-pool window reading that layer keeps:
    the near tie of _near_tie_pool right after the 1x1 conv changes nothing there (RSP and AE
    within 1e-6 of float64), and is not reported."""
    model, x = _near_tie_pool(clear=False)
    model64 = copy.deepcopy(model).double()
    got = relprop.Explainer(model, method).attribute(x.float(), 0)
    want = relprop.Explainer(model64, method).attribute(x, 0).relevance
    assert got.error.item() == 0
    assert (got.relevance.double() - want).norm() <= 1e-6 * want.norm(), (got.relevance, want)


def test_gradient_decisions_add_up_over_a_batch_and_repeated_calls():
    """The gradient's estimate is per sample and per call: a sample's estimate is the same alone
    and in a batch with a clear one, and a second call on the same explainer gives the same."""
    model, x = _near_tie_pool(clear=False)
    _, x_clear = _near_tie_pool(clear=True)
    explainer = relprop.Explainer(model, "gradient")
    alone = explain_quietly(explainer, x.float(), torch.tensor([0])).error
    batch = explain_quietly(explainer, torch.cat([x_clear, x]).float(), torch.tensor([0, 0])).error
    again = explain_quietly(explainer, torch.cat([x_clear, x]).float(), torch.tensor([0, 0])).error
    assert alone.item() > 0.1 and batch[0] == 0 and torch.allclose(batch[1], alone[0]), (alone, batch)
    assert torch.equal(again, batch)
