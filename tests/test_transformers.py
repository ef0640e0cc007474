"""Vision transformers: torchvision's VisionTransformer (nn.MultiheadAttention, traced through
as in-projection, heads, fused attention, out-projection) and timm's (its Attention, fused
``scaled_dot_product_attention`` or ``q @ k^T`` / softmax / ``attn @ v``), at toy size.

Conventions (README, Conventions; ``relprop.rules``): CP-LRP by default, the attention weights
held constant and the values taking the method's Linear rule; LayerNorm statistics held fixed;
GELU passes relevance; the class token and the position embedding are constants whose share is
dropped like a bias's.  Under them the epsilon-rule relevance (epsilon -> 0) is gradient x input
of the same network with the LayerNorm statistics and the attention weights detached and GELU's
derivative replaced by ``gelu(z) / z``: the float64 oracle here is the model's own forward with
those functionals swapped for detached ones while it runs (the detached attention weights are
torch's own, masks included).  Masks and biases of the attention logits (``attn_mask``,
``is_causal``, ``q @ k^T * scale + bias + mask``) and ``nn.MultiheadAttention``'s masks,
sequence-first layout, cross-attention and unread ``need_weights`` output are tested at the end
on small token models; Swin in tests/test_swin.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
import relprop.graph as g

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

D = torch.float64
METHODS = sorted(relprop.available_methods())
WITH_ATTENTION_RULE = [m for m in METHODS if "attention_rule" in relprop.methods.create(m).params()]
_layer_norm, _gelu, _sdpa, _softmax = F.layer_norm, F.gelu, F.scaled_dot_product_attention, torch.Tensor.softmax
_f_softmax = F.softmax


def _randomise(model: nn.Module) -> nn.Module:
    """Random LayerNorm affines, class token, position embedding and head: the libraries'
    inits (1, 0, zeros, a zero head in torchvision) would hide them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("class_token", "cls_token", "pos_embedding", "pos_embed")):
                p.normal_(0, 0.5)
            elif p.ndim == 1 and name.endswith("weight"):   # LayerNorm scales
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            elif name.startswith("head") and p.ndim == 2:
                p.normal_(0, 0.5)
    return model


def torchvision_vit(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                           num_classes=5)
    return _randomise(model).to(dtype).eval()


def timm_vit(seed: int = 0, fused: bool = True, dtype=torch.float32, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5, **kwargs)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return _randomise(model).to(dtype).eval()


MODELS = {"torchvision": torchvision_vit, "timm": timm_vit, "timm-unfused": lambda **kw: timm_vit(fused=False, **kw)}


# ------------------------------------------------------------------ the oracle
class _SecantGelu(torch.autograd.Function):
    """GELU whose derivative is replaced by ``gelu(z) / z`` (the activation as LRP sees it)."""

    @staticmethod
    def forward(ctx, z, approximate):
        ctx.save_for_backward(z)
        ctx.approximate = approximate
        return _gelu(z, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * _gelu(z, approximate=ctx.approximate) / z, None


def _detached_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True).detach()
    std = (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt().detach()
    y = (x - mean) / std
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def _detached_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The weights are torch's own (its masking conventions): its attention applied to the
    identity as values, then detached."""
    assert dropout_p == 0
    eye = torch.eye(k.shape[-2], dtype=q.dtype).expand(*k.shape[:-1], k.shape[-2])
    weights = _sdpa(q, k, eye, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return weights.detach() @ v


def _detached_softmax(self, *args, **kwargs):
    return _softmax(self, *args, **kwargs).detach()


def _detached_f_softmax(*args, **kwargs):
    return _f_softmax(*args, **kwargs).detach()


def gradient_x_input(model, x, target, detached: bool = True):
    """``x * d logit_target / dx`` and the logits; ``detached``: of the network with the
    LayerNorm statistics and the attention weights detached and GELU's derivative replaced by
    ``gelu(z) / z`` (the model's own forward, its functionals swapped while it runs)."""
    x = x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        if detached:
            mp.setattr(F, "layer_norm", _detached_layer_norm)
            mp.setattr(F, "gelu", lambda z, approximate="none": _SecantGelu.apply(z, approximate))
            mp.setattr(F, "scaled_dot_product_attention", _detached_attention)
            mp.setattr(torch.Tensor, "softmax", _detached_softmax)
            mp.setattr(F, "softmax", _detached_f_softmax)
        out = model(x)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return (x * grad).detach(), out.detach()


def assert_epsilon_oracle(model, x, tolerance: float):
    """lrp-epsilon (epsilon and stabiliser 0, the epsilon rule at the input layer too) computes
    the model's logits and equals :func:`gradient_x_input` within ``tolerance`` (relative L2),
    and plain gradient x input does not (the oracle tells the conventions apart)."""
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same").attribute(x)
    expected, logits = gradient_x_input(model, x, a.target)
    torch.testing.assert_close(a.logits, logits, rtol=1e-12, atol=1e-12)
    error = (a.relevance - expected).norm() / expected.norm()
    assert error < tolerance, f"relative L2 error {error:.3g}"
    plain, _ = gradient_x_input(model, x, a.target, detached=False)
    assert (a.relevance - plain).norm() > 1e-3 * plain.norm()


def assert_method_runs(model, method, x, rtol, atol):
    """``method`` computes the model's logits and a finite, non-zero map per sample shaped like ``x``."""
    a = relprop.Explainer(model, method).attribute(x)
    with torch.no_grad():
        torch.testing.assert_close(a.logits, model(x), rtol=rtol, atol=atol)
    assert a.relevance.shape == x.shape
    assert torch.isfinite(a.relevance).all()
    assert (a.relevance.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_epsilon_lrp_is_gradient_x_input_with_detached_attention(name):
    """lrp-epsilon (epsilon and stabiliser 0, the epsilon rule at the patch embedding too)
    equals the oracle to float64 precision (relative L2 error < 1e-8); plain gradient x input
    does not, so the oracle tells the conventions apart."""
    assert_epsilon_oracle(MODELS[name](dtype=D), torch.randn(3, 3, 32, 32, dtype=D,
                                                            generator=torch.Generator().manual_seed(1)), 1e-8)


# ------------------------------------------------------------------ every method
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(name, method):
    assert_method_runs(MODELS[name](), method, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", WITH_ATTENTION_RULE)
def test_every_method_runs_with_attnlrp(method):
    """On timm's unfused attention (its softmax and both products); the fused attention takes
    the same rules (test_fused_and_unfused_timm_attention_give_the_same_map)."""
    model = timm_vit(fused=False, dtype=D)
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(3))
    cp = relprop.Explainer(model, method).attribute(x)
    a = relprop.Explainer(model, method, attention_rule="attnlrp").attribute(x)
    assert torch.isfinite(a.relevance).all() and (a.relevance.flatten(1).abs().sum(1) > 0).all()
    assert not torch.allclose(a.relevance, cp.relevance)   # relevance now also flows through q and k


@pytest.mark.parametrize("attention_rule", ["cp-lrp", "attnlrp"])
@pytest.mark.parametrize("method", ["lrp-epsilon", "lrp-zplus", "lrp-gamma", "rap", "clrp", "sglrp"])
def test_fused_and_unfused_timm_attention_give_the_same_map(method, attention_rule):
    """``scaled_dot_product_attention`` and ``softmax(q @ k^T * scale) @ v`` take the same rules."""
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(4))
    fused = relprop.Explainer(timm_vit(fused=True, dtype=D), method, attention_rule=attention_rule)(x, 1)
    unfused = relprop.Explainer(timm_vit(fused=False, dtype=D), method, attention_rule=attention_rule)(x, 1)
    torch.testing.assert_close(fused, unfused, rtol=1e-9, atol=1e-12 * fused.abs().max().item())


@pytest.mark.parametrize("name", ["torchvision", "timm-unfused"])
@pytest.mark.parametrize("method", ["lrp-epsilon", "rap", "rsp", "clrp"])
def test_batch_equals_single_samples(name, method):
    model = MODELS[name](dtype=D)
    x = torch.randn(3, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(5))
    explainer = relprop.Explainer(model, method)
    batch = explainer(x, 2)
    for i in range(3):
        torch.testing.assert_close(batch[i:i + 1], explainer(x[i:i + 1], 2), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ conservation
def _bias_free_timm(fused: bool) -> nn.Module:
    return timm_vit(fused=fused, dtype=D, qkv_bias=False, proj_bias=False)


@pytest.mark.parametrize("fused", [True, False])
def test_cp_lrp_attention_and_bias_free_projections_conserve(fused):
    """CP-LRP's value map ``a @ v`` has no bias: relevance is conserved through the attention
    (fused or not) and the bias-free qkv and output projections, whatever the method's Linear
    rule (epsilon here; z+ conserves where its denominators are positive)."""
    model = _bias_free_timm(fused)
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(6))
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12).attribute(x, layer_sums=True)
    sums = a.layer_sums
    graph = g.capture(model)
    attention = [n for n in graph.nodes if n.kind in (g.ATTENTION, g.MATMUL)]
    assert len(attention) == (2 if fused else 4)
    for block in range(2):
        out = sums[f"blocks.{block}.attn.proj"]        # relevance at the projection's input
        assert (out.abs() > 1e-3 * a.logits.abs().max()).all()
        torch.testing.assert_close(sums[f"blocks.{block}.attn.qkv"], out, rtol=1e-9, atol=0)
    reached = [n for n in attention if n.name in sums]   # q @ k^T takes no relevance under CP-LRP
    assert len(reached) == 2
    for n in reached:   # relevance at the attention's inputs = at its output (its consumer's inputs)
        consumer = graph.nodes[graph.consumers[n.index][0]]
        torch.testing.assert_close(sums[n.name], sums[consumer.name], rtol=1e-9, atol=0)


def test_attnlrp_product_rule_splits_half_half_and_conserves():
    """AttnLRP's rule for ``a @ b`` with two non-constant operands: each operand takes half
    of the relevance (gradient x input with the gradient halved)."""
    from relprop import rules
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 3, 4, 5, dtype=D, generator=gen), torch.randn(2, 3, 5, 6, dtype=D, generator=gen)
    z = a @ b
    r = torch.randn(z.shape, dtype=D, generator=gen)
    ra, rb = rules.half_product(a, b, r, z, lambda r_, z_: r_ / z_)
    torch.testing.assert_close(ra.sum((1, 2, 3)), r.sum((1, 2, 3)) / 2)
    torch.testing.assert_close(rb.sum((1, 2, 3)), r.sum((1, 2, 3)) / 2)
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad((ag @ bg * (r / z)).sum(), [ag, bg])
    torch.testing.assert_close(ra, a * ga / 2)
    torch.testing.assert_close(rb, b * gb / 2)


def test_attnlrp_softmax_rule():
    """``R_in = x * (R - s * sum_j R_j)`` over the last dim (Achtibat et al. 2024)."""
    from relprop import rules
    x = torch.tensor([[1.0, 2.0, -1.0]], dtype=D)
    s = x.softmax(-1)
    r = torch.tensor([[0.5, -1.0, 2.0]], dtype=D)
    torch.testing.assert_close(rules.softmax_rule(x, s, r), x * (r - s * 1.5))


# ------------------------------------------------------------------ capture, options and errors
def test_capture_kinds_of_a_torchvision_vit():
    graph = g.capture(torchvision_vit())
    prefix = "encoder.layers.encoder_layer_0.self_attention"
    assert graph.node(prefix + ".in_proj").kind == g.LINEAR
    assert isinstance(graph.node(prefix + ".in_proj").module, g.InProjection)
    assert graph.node(prefix + ".out_proj").kind == g.LINEAR
    assert graph.node(prefix).kind == g.LINEAR           # the module's output: its out-projection
    assert sum(n.kind == g.ATTENTION for n in graph.nodes) == 2
    assert sum(n.kind == g.OFFSET for n in graph.nodes) == 1      # + pos_embedding
    assert graph.node("conv_proj").first_layer


def test_the_in_projection_reads_the_model_at_every_call():
    """Nothing derived from in_proj_weight is kept across calls (InProjection is a view)."""
    model = torchvision_vit(dtype=D)
    x = torch.randn(1, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(8))
    explainer = relprop.Explainer(model, "lrp-epsilon")
    before = explainer(x, 0)
    with torch.no_grad():
        model.encoder.layers[0].self_attention.in_proj_weight.mul_(-0.5)
    after = explainer(x, 0)
    torch.testing.assert_close(after, relprop.Explainer(model, "lrp-epsilon")(x, 0))
    assert not torch.allclose(before, after)


def test_bad_attention_rule_is_refused_naming_the_method():
    with pytest.raises(ValueError) as e:
        relprop.Explainer(timm_vit(), "lrp-epsilon", attention_rule="attn-lrp")
    assert str(e.value) == ("method 'lrp-epsilon': attention_rule must be one of 'cp-lrp', 'attnlrp', "
                            "got 'attn-lrp'")


def test_rsp_and_ae_start_at_the_patch_embedding():
    """A transformer's only (B, C, H, W) feature map is its patch embedding's: RSP, AE and
    Grad-CAM start there by default; a token layer is refused with the reason."""
    from relprop.methods.cam import default_layer
    assert default_layer(g.capture(torchvision_vit())).name == "conv_proj"
    assert default_layer(g.capture(timm_vit())).name == "patch_embed.proj"
    with pytest.raises(ValueError, match=r"^the initial layer 'encoder.ln' must output a \(B, C, H, W\) feature map, "
                                         r"got shape \(1, 17, 16\)$"):
        relprop.Explainer(torchvision_vit(), "rsp", init_layer="encoder")(torch.randn(1, 3, 32, 32), 0)


def test_unsupported_attention_is_listed():
    """A MultiheadAttention with bias_k/bias_v, the attention weights of another one read by the
    model, a softmax that is not attention's and a product of two signals that is not
    attention's are all refused, in one error.  (Swin: tests/test_swin.py.)"""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 4, stride=4)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True, add_bias_kv=True)
            self.mha2 = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)
            h, _ = self.mha(t, t, t)
            h2, w = self.mha2(t, t, t)        # need_weights defaults to True: its weights are read
            p = (t @ t.transpose(1, 2)).softmax(-1)
            return (p @ h + h.relu() @ h.transpose(1, 2) @ h + w @ h2).mean(1)

    with pytest.raises(relprop.UnsupportedModelError) as err:
        relprop.Explainer(Net(), "lrp-epsilon")
    msg = str(err.value)
    assert ("mha (MultiheadAttention): only a packed in-projection (kdim = vdim = embed_dim), no bias_k/bias_v and "
            "no add_zero_attn are supported") in msg
    assert ("unexplained_weights (call_function unexplained_weights): the attention weights returned by "
            "MultiheadAttention(need_weights=True) are not explained; use only its output [0], or "
            "need_weights=False") in msg
    assert ("matmul_2 (call_function matmul): only attention's products are supported: q @ k^T feeding a "
            "softmax (through scales, additive constants and reshapes), and softmax(...) @ v") in msg


# ------------------------------------------------------------------ full-size models (slow)
@pytest.fixture(scope="module", params=["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def timm_model(request):
    torch.manual_seed(0)
    return request.param, _randomise(timm.create_model(request.param, pretrained=False)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_timm_vit_and_deit(timm_model, method):
    name, model = timm_model
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    a = relprop.Explainer(model, method).attribute(x)
    with torch.no_grad():
        torch.testing.assert_close(a.logits, model(x), rtol=1e-4, atol=1e-5, msg=f"{name} {method}: logits")
    assert a.relevance.shape == x.shape
    assert torch.isfinite(a.relevance).all() and a.relevance.abs().sum() > 0, f"{name} {method}"


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("attention_rule", ["cp-lrp", "attnlrp"])
def test_input_relevance_sums_to_the_logit_without_biases(fused, attention_rule):
    """A ViT with every bias, the class token and the position embedding zero and its
    LayerNorms removed (their offsets are biases of the z-rule) conserves: the epsilon map
    (epsilon -> 0) sums to the target logit under CP-LRP.  AttnLRP's softmax rule does not
    conserve, so there the sum differs."""
    model = timm_vit(fused=fused, dtype=D)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "cls_token", "pos_embed")):
                p.zero_()
    for block in model.blocks:
        block.norm1, block.norm2 = nn.Identity(), nn.Identity()
    model.norm = nn.Identity()
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(10))
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12, first_layer="same",
                          attention_rule=attention_rule).attribute(x)
    logit = a.logits.gather(1, a.target[:, None])[:, 0]
    total = a.relevance.flatten(1).sum(1)
    if attention_rule == "cp-lrp":
        torch.testing.assert_close(total, logit, rtol=1e-8, atol=0)
    else:
        assert not torch.allclose(total, logit, rtol=1e-3)


class _HalfMatmul(torch.autograd.Function):
    """``a @ b`` whose gradients are halved (AttnLRP's uniform rule as gradient x input)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _matmul(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return _matmul(grad, b.transpose(-2, -1)) / 2, _matmul(a.transpose(-2, -1), grad) / 2


_matmul = torch.Tensor.__matmul__


def _half_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    assert not is_causal
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = _HalfMatmul.apply(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return _HalfMatmul.apply(logits.softmax(-1), v)


@pytest.mark.parametrize("name", list(MODELS))
def test_attnlrp_epsilon_is_gradient_x_input_with_halved_products(name):
    """AttnLRP's softmax rule ``x * (R - s * sum R)`` is gradient x input through the softmax
    (its Jacobian), and its product rule gradient x input with halved gradients: with epsilon
    -> 0 the map is gradient x input of the network with the LayerNorm statistics detached,
    GELU's derivative ``gelu(z) / z`` and both attention products' gradients halved."""
    model = MODELS[name](dtype=D)
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(11))
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same",
                          attention_rule="attnlrp").attribute(x)
    xg = x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "layer_norm", _detached_layer_norm)
        mp.setattr(F, "gelu", lambda z, approximate="none": _SecantGelu.apply(z, approximate))
        mp.setattr(F, "scaled_dot_product_attention", _half_attention)
        mp.setattr(torch.Tensor, "__matmul__", lambda s, o: _HalfMatmul.apply(s, o))
        out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, a.target[:, None]).sum(), xg)
    expected = x * grad
    error = (a.relevance - expected).norm() / expected.norm()
    assert error < 1e-8, f"relative L2 error {error:.3g}"


# ------------------------------------------------------------------ masks, biases, MultiheadAttention
class _Tokens(nn.Module):
    """A 4x4-patch embedding of a 16 x 16 image (16 tokens of 8 features), a LayerNorm, one
    attention block (``attend(tokens, image)``) with a residual, the token mean and a head."""

    def __init__(self, heads: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)
        self.heads = heads

    def tokens(self, x):
        return self.embed(x).flatten(2).transpose(1, 2)

    def split(self, t):
        b, n, _ = t.shape
        return self.qkv(self.norm(t)).reshape(b, n, 3, self.heads, 8 // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def merge(self, o):
        return self.proj(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], 8))

    def forward(self, x):
        t = self.tokens(x)
        t = t + self.attend(t, x)
        return self.head(t.mean(1))


def _random_mask(shape, boolean: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if boolean:   # True = may attend (sdpa's convention); two keys per query stay, so no row is empty with padding
        rows, cols = torch.arange(shape[-2])[:, None], torch.arange(shape[-1])
        return (torch.rand(shape, generator=gen) > 0.4) | (rows % shape[-1] == cols) | ((rows + 1) % shape[-1] == cols)
    return torch.randn(shape, generator=gen)


class _SdpaMasked(_Tokens):
    """``scaled_dot_product_attention(q, k, v, attn_mask=...)``: a float or boolean buffer, a mask
    computed from sizes (a causal one by ``tril``) or ``is_causal=True``."""

    def __init__(self, mask: str):
        super().__init__()
        self.mask = mask
        self.register_buffer("float_mask", _random_mask((16, 16), False, 20))
        self.register_buffer("bool_mask", _random_mask((16, 16), True, 21))

    def attend(self, t, x):
        q, k, v = self.split(t)
        if self.mask == "causal":
            return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        mask = {"float": self.float_mask, "bool": self.bool_mask,
                "from-sizes": t.new_ones(t.shape[1], t.shape[1], dtype=torch.bool).tril()}[self.mask]
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


class _ExplicitBias(_Tokens):
    """``softmax(q @ k^T * scale + bias + mask) @ v`` with a learned bias per head (as timm's Swin)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 2, 16, 16))
        self.register_buffer("float_mask", _random_mask((16, 16), False, 22))

    def attend(self, t, x):
        q, k, v = self.split(t)
        attn = (q @ k.transpose(-2, -1)) * 0.5 + self.bias + self.float_mask.unsqueeze(0)
        return self.merge(attn.softmax(-1) @ v)


class _Mha(_Tokens):
    """``nn.MultiheadAttention`` with masks, sequence-first or batch-first, need_weights True or
    False, self- or cross-attention (the keys and values from a coarser patch embedding: 4
    tokens)."""

    def __init__(self, batch_first=True, attn_mask=None, padding_mask=None, need_weights=False, cross=False,
                 is_causal=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.coarse = nn.Conv2d(3, 8, 8, stride=8) if cross else None
        s = 4 if cross else 16
        if attn_mask is not None:
            m = _random_mask((16, s), True, 23)   # MultiheadAttention: True = may NOT attend
            m = ~m if attn_mask == "bool" else torch.zeros(16, s).masked_fill(~m, -1e4) if attn_mask == "float" else \
                torch.ones(16, s, dtype=torch.bool).triu(1)
            self.register_buffer("attn_mask", m)
        else:
            self.attn_mask = None
        self.register_buffer("padding_mask", None if padding_mask is None else
                             torch.tensor([[False] * (s - 1) + [True], [True] + [False] * (s - 1)]))
        self.batch_first, self.need_weights, self.is_causal = batch_first, need_weights, is_causal

    def attend(self, t, x):
        q = self.norm(t)
        kv = self.coarse(x).flatten(2).transpose(1, 2) if self.coarse is not None else q
        if not self.batch_first:
            q, kv = q.transpose(0, 1), (kv.transpose(0, 1) if self.coarse is not None else None)
            kv = q if kv is None else kv
        out = self.mha(q, kv, kv, key_padding_mask=self.padding_mask, attn_mask=self.attn_mask,
                       need_weights=self.need_weights, is_causal=self.is_causal)[0]
        return out if self.batch_first else out.transpose(0, 1)


MASKED = {
    "sdpa-float-mask": lambda: _SdpaMasked("float"), "sdpa-bool-mask": lambda: _SdpaMasked("bool"),
    "sdpa-mask-from-sizes": lambda: _SdpaMasked("from-sizes"), "sdpa-causal": lambda: _SdpaMasked("causal"),
    "explicit-bias-and-mask": _ExplicitBias,
    "mha-bool-attn-mask": lambda: _Mha(attn_mask="bool"), "mha-float-attn-mask": lambda: _Mha(attn_mask="float"),
    "mha-key-padding-mask": lambda: _Mha(padding_mask=True),
    "mha-causal": lambda: _Mha(attn_mask="causal", is_causal=True),
    "mha-sequence-first": lambda: _Mha(batch_first=False, attn_mask="bool", padding_mask=True),
    "mha-need-weights": lambda: _Mha(need_weights=True),
    "mha-cross": lambda: _Mha(cross=True, attn_mask="bool", padding_mask=True),
    "mha-cross-sequence-first": lambda: _Mha(cross=True, batch_first=False),
}


def _masked(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise(MASKED[name]()).to(D).eval()


@pytest.mark.parametrize("name", list(MASKED))
def test_masked_attention_epsilon_is_gradient_x_input(name):
    """Masks and additive biases of the attention logits are constants: the captured graph
    computes the model's logits, and lrp-epsilon (epsilon -> 0) equals the oracle (torch's own
    masked attention weights, detached) to float64 precision, which plain gradient x input
    does not."""
    x = torch.randn(2, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(12))
    assert_epsilon_oracle(_masked(name), x, 1e-10)


@pytest.mark.parametrize("name", ["sdpa-float-mask", "sdpa-bool-mask", "sdpa-causal", "explicit-bias-and-mask",
                                  "mha-key-padding-mask"])
def test_masked_attention_attnlrp_is_gradient_x_input_with_halved_products(name):
    """Under AttnLRP a mask or bias is an additive constant of the logits (its share dropped, as
    a bias's): gradient x input with halved products and the softmax's Jacobian; a -inf logit
    (boolean and padding masks) gets no relevance."""
    model = _masked(name)
    x = torch.randn(2, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(13))
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=0, stabilizer=0, first_layer="same",
                          attention_rule="attnlrp").attribute(x)
    xg = x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "layer_norm", _detached_layer_norm)
        mp.setattr(F, "scaled_dot_product_attention", _half_attention_causal)
        mp.setattr(torch.Tensor, "__matmul__", lambda s, o: _HalfMatmul.apply(s, o))
        out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, a.target[:, None]).sum(), xg)
    expected = x * grad
    assert torch.isfinite(a.relevance).all()
    error = (a.relevance - expected).norm() / expected.norm()
    assert error < 1e-10, f"relative L2 error {error:.3g}"


def _half_attention_causal(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return _half_attention(q, k, v, attn_mask, dropout_p, False, scale)


def test_cross_attention_gives_the_query_no_relevance():
    """Cross-attention under CP-LRP: the attention weights are constants, so the query's input
    (here the fine patch embedding's tokens, through the residual only) takes relevance through
    the residual and not through the attention; the keys' and values' input (the coarse patch
    embedding) takes it through the values."""
    model = _masked("mha-cross")
    x = torch.randn(2, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(14))
    a = relprop.Explainer(model, "lrp-epsilon", epsilon=1e-12, stabilizer=1e-12).attribute(x, layer_sums=True)
    graph = g.capture(model)
    projections = [n for n in graph.nodes if n.name.startswith("mha.in_proj")]
    assert len(projections) == 2                       # the query's and the key/value's
    assert projections[0].name not in a.layer_sums     # the query's projection: no relevance
    assert (a.layer_sums[projections[1].name].abs() > 0).all()
    assert (a.layer_sums["coarse"].abs() > 0).all()


def test_mha_need_weights_output_unused_is_a_helper():
    graph = g.capture(_masked("mha-need-weights"))
    weights = [n for n in graph.nodes if n.target is g.through.unexplained_weights]
    assert len(weights) == 1 and weights[0].kind == g.HELPER


@pytest.mark.parametrize("name", ["sdpa-bool-mask", "explicit-bias-and-mask", "mha-float-attn-mask",
                                  "mha-cross-sequence-first"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_masked_attention(name, method):
    model = _masked(name)
    x = torch.randn(2, 3, 16, 16, dtype=D, generator=torch.Generator().manual_seed(15))
    a = relprop.Explainer(model, method).attribute(x)
    assert torch.isfinite(a.relevance).all() and (a.relevance.flatten(1).abs().sum(1) > 0).all()
    explainer = relprop.Explainer(model, method)
    batch = explainer(x, 1)
    torch.testing.assert_close(batch[1:], explainer(x[1:], 1), rtol=1e-9, atol=1e-13)


def test_an_attention_mask_computed_from_the_input_is_refused():
    class Net(_Tokens):
        def attend(self, t, x):
            q, k, v = self.split(t)
            return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=t.detach()[:, None, :, :1] > 0))

    with pytest.raises(relprop.UnsupportedModelError, match=r"an attn_mask computed from model tensors and sizes "
                                                            r"\(not from the input\)"):
        relprop.Explainer(Net(), "lrp-epsilon")
