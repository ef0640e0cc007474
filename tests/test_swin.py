"""Swin Transformers at toy size: torchvision's ``SwinTransformer``, V1 and V2 (its fx-wrapped
window attention and patch merging traced through as re-written in ``relprop.graph.through``) and
timm's (fused ``scaled_dot_product_attention`` with the bias and mask as ``attn_mask``, or
``q @ k^T + bias + mask`` -> softmax -> ``@ v``).

The input sizes exercise everything Swin does at the borders: 36 x 36 pixels are 9 x 9
patches, padded to 12 x 12 for windows of 4 and cyclically shifted by 2 (with the shift mask);
the patch merging pads 9 to 10 and gives 5 x 5 tokens, padded to 8 x 8 and shifted again.
Conventions (README, Conventions): those of tests/test_transformers.py, plus ``torch.roll`` a
permutation, the padding a constant (its relevance dropped; zero padding receives none), the
relative position bias and the shift mask additive constants on the attention logits (under
CP-LRP the logits take no relevance; under AttnLRP their share is dropped like a bias's).
The float64 oracle is the one of tests/test_transformers.py, on the libraries' own forward.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
import relprop.graph as g

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from test_transformers import (METHODS, WITH_ATTENTION_RULE, _detached_layer_norm, _HalfMatmul,  # noqa: E402
                               _half_attention, _randomise, _SecantGelu, assert_epsilon_oracle, assert_method_runs,
                               gradient_x_input)
from timm.models.swin_transformer import SwinTransformer as TimmSwin  # noqa: E402
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2  # noqa: E402
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin  # noqa: E402

D = torch.float64
SIZE = 36


def _randomise_swin(model: nn.Module) -> nn.Module:
    """Random LayerNorm affines, biases and head (test_transformers._randomise) and relative
    position bias tables (init: std 0.02, nearly zero)."""
    _randomise(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return model


def torchvision_swin(seed: int = 0, dtype=torch.float32, v2: bool = False) -> nn.Module:
    """Swin V1, or V2 (post-norm blocks, cosine attention with a learned logit scale, the position
    bias MLP, the key bias zeroed in the forward: random here, so that it matters)."""
    torch.manual_seed(seed)
    kwargs = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = TorchvisionSwin(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=5, **kwargs)
    model = _randomise_swin(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):   # init log(10) in every head
                p.uniform_(1.0, 3.0)
    return model.to(dtype).eval()


def timm_swin(seed: int = 0, fused: bool = True, dtype=torch.float32, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = TimmSwin(img_size=SIZE, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                     num_classes=5, **kwargs)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return _randomise_swin(model).to(dtype).eval()


MODELS = {"torchvision": torchvision_swin, "torchvision-v2": lambda **kw: torchvision_swin(v2=True, **kw),
          "timm": timm_swin, "timm-unfused": lambda **kw: timm_swin(fused=False, **kw)}


def _input(batch: int, seed: int, dtype=D) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ capture
def test_the_toy_models_pad_shift_and_merge_at_this_size():
    """The sizes exercise padding and shifting in both stages and the patch merging's padding:
    four rolls shift (2 shifted blocks x shift and shift back; torchvision's graph also rolls the
    unshifted blocks, by 0, since whether a block shifts depends on the input size) and every
    pad pads (4 blocks and 1 merging)."""
    x = _input(1, 0, torch.float32)
    for name in MODELS:
        graph = g.capture(MODELS[name]())
        values = graph.forward(x)
        rolls = [n for n in graph.nodes if n.kind == g.ROLL]
        shifting = [n for n in rolls if not torch.equal(values[n.index], values[n.parents[0]])]
        pads = [n for n in graph.nodes if n.kind == g.PAD]
        assert len(rolls) == (8 if name.startswith("torchvision") else 4) and len(shifting) == 4, name
        assert len(pads) == 5, name
        for n in pads:
            assert values[n.index].shape != values[n.parents[0]].shape, f"{name}: {n.name} does not pad"


def test_capture_kinds_of_a_torchvision_swin():
    graph = g.capture(torchvision_swin())
    attn = "features.1.0.attn"
    assert graph.node(attn + ".qkv").kind == g.LINEAR
    assert graph.node(attn).kind == g.PASS                # the module's output: its crop, made contiguous
    assert graph.node("features.2.reduction").kind == g.LINEAR
    assert sum(n.kind == g.SOFTMAX for n in graph.nodes) == 4
    assert sum(n.kind == g.OFFSET for n in graph.nodes) == 8      # + bias, + shift mask in each block
    assert graph.node("features.0.0").first_layer


def test_capture_kinds_of_a_torchvision_swin_v2():
    """Cosine attention: the normalisations are scales (their norms held fixed), the logit scale
    a constant factor, the position bias MLP a constant, the key bias subtracted an offset."""
    graph = g.capture(torchvision_swin(v2=True))
    assert sum(n.kind == g.SCALE and n.target is F.normalize for n in graph.nodes) == 8
    assert sum(n.kind == g.OFFSET for n in graph.nodes) == 12     # - key bias, + position bias, + shift mask
    assert not any(n.name.startswith("features.1.0.attn.cpb_mlp") for n in graph.nodes)   # inside the constant


def test_roll_and_pad_rules():
    """A roll's relevance is rolled back; a pad's relevance is cropped back to the input (the
    padded entries' dropped), a negative pad (a crop) gives the cropped entries none."""
    from relprop import rules
    from relprop.engine import Layer
    x = torch.arange(12.0).reshape(1, 3, 4)
    r = torch.randn(1, 3, 4)
    node = g.Node(0, "roll", g.ROLL, "call_function", torch.roll, (), {})
    layer = Layer(node, [x], torch.roll(x, (1, -2), (1, 2)), (x, (1, -2), (1, 2)), {})
    (back,) = rules.roll(layer, torch.roll(r, (1, -2), (1, 2)))
    torch.testing.assert_close(back, r)
    node = g.Node(0, "pad", g.PAD, "call_function", F.pad, (), {})
    padded = F.pad(r, (0, 2, 1, -1))                  # 2 columns after, 1 row before, the last row cropped
    (back,) = rules.pad(Layer(node, [x], padded, (x, (0, 2, 1, -1)), {}), padded)
    assert back.shape == x.shape
    torch.testing.assert_close(back[:, :2], r[:, :2])
    assert (back[:, 2] == 0).all()


def test_non_constant_padding_is_refused_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.pad(self.conv(x), (1, 1, 1, 1), mode="reflect").mean((2, 3))

    with pytest.raises(relprop.UnsupportedModelError, match=r"pad \(call_function pad\): mode='reflect': only "
                                                            r"constant padding \(mode='constant'\) is supported"):
        relprop.Explainer(Net(), "lrp-epsilon")


# ------------------------------------------------------------------ the oracle
@pytest.mark.parametrize("name", list(MODELS))
def test_epsilon_lrp_is_gradient_x_input_with_detached_attention(name):
    """lrp-epsilon (epsilon and stabiliser 0) equals gradient x input of the library's own
    forward with the LayerNorm statistics and attention weights detached (relative L2 error
    < 1e-10); plain gradient x input does not."""
    assert_epsilon_oracle(MODELS[name](dtype=D), _input(2, 1), 1e-10)


def _detached_normalize(x, p=2.0, dim=1, eps=1e-12, out=None):
    return x / x.norm(p, dim, keepdim=True).clamp_min(eps).detach()


@pytest.mark.parametrize("name", list(MODELS))
def test_attnlrp_epsilon_is_gradient_x_input_with_halved_products(name):
    """Under AttnLRP the relative position bias and the shift mask are additive constants of
    the logits: the z-rule of an offset, gradient x input through them, their share dropped.
    With epsilon -> 0 the map is gradient x input of the network with the LayerNorm statistics
    detached, GELU's secant derivative, the softmax's Jacobian and both attention products'
    gradients halved."""
    model = MODELS[name](dtype=D)
    x = _input(2, 2)
    # epsilon and stabiliser 1e-200, not 0: V2's keys of padded tokens are exactly 0 (their bias
    # subtracted), a 0 / 0 at the offset without a stabiliser
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-200, stabilizer=1e-200, first_layer="same",
                          attention_rule="attnlrp").attribute(x)
    xg = x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "layer_norm", _detached_layer_norm)
        mp.setattr(F, "gelu", lambda z, approximate="none": _SecantGelu.apply(z, approximate))
        mp.setattr(F, "scaled_dot_product_attention", _half_attention)
        mp.setattr(torch.Tensor, "__matmul__", lambda s, o: _HalfMatmul.apply(s, o))
        mp.setattr(torch.Tensor, "matmul", lambda s, o: _HalfMatmul.apply(s, o))   # torchvision's q.matmul(k)
        mp.setattr(F, "normalize", _detached_normalize)   # Swin V2
        out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, a.target[:, None]).sum(), xg)
    expected = x * grad
    error = (a.relevance - expected).norm() / expected.norm()
    assert error < 1e-10, f"relative L2 error {error:.3g}"


# ------------------------------------------------------------------ every method
@pytest.mark.parametrize("name", ["torchvision", "torchvision-v2", "timm"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(name, method):
    """In float64, as the float32 maps of these random toy models are ill-conditioned for RAP
    (the float64 map moves by ~1e-3 under a 1e-7 change of the input).  The shift mask's -100
    gives subnormal float32 attention weights: tests/test_numerics.py, subnormal attention."""
    assert_method_runs(MODELS[name](dtype=D), method, _input(2, 3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["torchvision", "timm"])
def test_sign_split_methods_are_finite_in_float32(name):
    """The shift mask's subnormal float32 weights overflowed RAP's quotients (NaN maps on the
    torchvision toy model); the values' rule now runs in float64 there (rules.subnormal_weights)."""
    model, x = MODELS[name](), _input(2, 3, torch.float32)
    for method in ("rap", "rap-split", "sglrp", "lrp-rap-repo"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = relprop.Explainer(model, method).attribute(x).relevance
        assert torch.isfinite(r).all() and (r.flatten(1).abs().sum(1) > 0).all(), method


@pytest.mark.parametrize("method", WITH_ATTENTION_RULE)
def test_every_method_runs_with_attnlrp(method):
    model = timm_swin(fused=False, dtype=D)
    x = _input(2, 4)
    cp = relprop.Explainer(model, method).attribute(x)
    a = relprop.Explainer(model, method, attention_rule="attnlrp").attribute(x)
    assert torch.isfinite(a.relevance).all() and (a.relevance.flatten(1).abs().sum(1) > 0).all()
    assert not torch.allclose(a.relevance, cp.relevance)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["lrp-epsilon", "lrp-zplus", "rap", "rsp", "clrp"])
def test_batch_equals_single_samples(name, method):
    """Element for element, except where the explainer reports the map as ill-conditioned
    (``Attribution.error`` above 1e-13 in float64: RAP's signed residual split on the V2 toy
    model, estimate 6e-12); such a map agrees within its estimate (measured 2.7e-13 relative L2,
    a few small entries 1e-9 apart: batch and single convolutions round differently)."""
    model = MODELS[name](dtype=D)
    x = _input(2, 5)
    explainer = relprop.Explainer(model, method)
    batch = explainer.attribute(x, 2)
    for i in range(2):
        single = explainer.attribute(x[i:i + 1], 2)
        if batch.error[i] > 1e-13:
            diff = (batch.relevance[i] - single.relevance[0]).norm() / single.relevance[0].norm()
            assert diff <= batch.error[i], (diff, batch.error[i])
        else:
            torch.testing.assert_close(batch.relevance[i:i + 1], single.relevance, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method, attention_rule, params", [
    ("lrp-epsilon", "cp-lrp", {}), ("lrp-zplus", "cp-lrp", {}), ("rap", "cp-lrp", {}),
    ("lrp-epsilon", "attnlrp", {"epsilon": 1e-14, "stabilizer": 1e-14})])
def test_fused_and_unfused_timm_swin_give_the_same_map(method, attention_rule, params):
    """``scaled_dot_product_attention(q, k, v, attn_mask=bias + mask)`` and ``softmax(q @ k^T *
    scale + bias + mask) @ v`` take the same rules.  Under AttnLRP the unfused graph divides by
    the stabilised logits at each offset (bias, then mask) and the fused rule once by the
    logits, mask included: equal as the stabiliser goes to 0."""
    x = _input(2, 6)
    fused = relprop.Explainer(timm_swin(fused=True, dtype=D), method, attention_rule=attention_rule, **params)(x, 1)
    unfused = relprop.Explainer(timm_swin(fused=False, dtype=D), method, attention_rule=attention_rule, **params)(x, 1)
    torch.testing.assert_close(fused, unfused, rtol=1e-9, atol=1e-12 * fused.abs().max().item())


# ------------------------------------------------------------------ conservation
def _bias_free(model: nn.Module) -> nn.Module:
    """Every bias zero and every LayerNorm removed (their offsets are biases of the z-rule);
    the relative position bias and the shift mask stay (they only weight the values)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    for name, m in list(model.named_modules()):
        for child, sub in list(m.named_children()):
            if isinstance(sub, nn.LayerNorm):
                setattr(m, child, nn.Identity())
    return model


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("attention_rule", ["cp-lrp", "attnlrp"])
def test_input_relevance_sums_to_the_logit_without_biases(name, attention_rule):
    """Without biases and LayerNorms the epsilon map (epsilon -> 0) sums to the target logit
    under CP-LRP: the rolls permute, the crops drop nothing (the padded positions' relevance
    is zero), the relative position bias and the mask only weight the values.  AttnLRP's
    softmax rule does not conserve."""
    model = _bias_free(MODELS[name](dtype=D))
    x = _input(2, 7)
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12, first_layer="same",
                          attention_rule=attention_rule).attribute(x)
    logit = a.logits.gather(1, a.target[:, None])[:, 0]
    total = a.relevance.flatten(1).sum(1)
    if attention_rule == "cp-lrp":
        torch.testing.assert_close(total, logit, rtol=1e-8, atol=0)
    else:
        assert not torch.allclose(total, logit, rtol=1e-3)


# Full size (slow): swin_t in tests/test_architectures.py, timm's swin_tiny_patch4_window7_224 in
# tests/test_timm_models.py, every method, in float64.
