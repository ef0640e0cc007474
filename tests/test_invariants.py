"""Per-rule invariants of methods.md §8, checked in float64 against dense references.

Every single-layer test builds the dense matrix ``M`` (``n_out x n_in``) of the bias-free
layer map from its Jacobian (the way Zennit tests its rules), re-implements the rule with
plain matrix products on flattened per-sample vectors, and compares with relprop's rule
applied to the same layer.  The end-to-end tests check the documented sums on a small
VGG built with the golden builders.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import relprop
import relprop.graph as g
from relprop import ops, rules
from relprop.engine import Layer
from relprop.methods import ae as ae_mod
from relprop.methods import lrp as lrp_mod
from relprop.methods import rap as rap_mod
from relprop.methods import rsp as rsp_mod
from relprop.methods.cam import default_layer
from relprop.ops import LinearMap

D = torch.float64

# name: (c_in, c_out, kernel, stride, padding, (H, W))
CONVS = {
    "3x3": (4, 5, 3, 1, 1, (7, 7)),
    "3x3_s2": (4, 5, 3, 2, 1, (7, 7)),
    "3x3_s2_outpad": (3, 5, 3, 2, 1, (6, 6)),      # needs output_padding 1 in the transpose
    "3x3_nopad": (3, 5, 3, 1, 0, (6, 6)),
    "rect": (3, 5, (3, 2), (2, 1), (1, 0), (7, 6)),  # non-square kernel/stride/padding
    "1x1": (4, 5, 1, 1, 0, (6, 6)),
}
CONV_IDS = list(CONVS)
NON1X1 = [k for k in CONV_IDS if k != "1x1"]


# ============================================================================ helpers
@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny float64 tensors: intra-op threads only add synchronisation cost (on a loaded
    2-core machine each conv call waits ~30 ms for the second thread).  Restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close(actual, expected, rtol=1e-10, atol_rel=1e-12):
    """assert_close with an absolute tolerance of atol_rel * max(1, max|expected|)."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_rel * max(scale, 1.0))


def SD(a, b):
    """Dense safe divide: a/b where b != 0, exactly 0 where b == 0."""
    out = torch.zeros_like(a)
    nz = b != 0
    out[nz] = a[nz] / b[nz]
    return out


def stab(z, eps):
    """z + eps*sign(z), sign(0) = +1."""
    return torch.where(z >= 0, z + eps, z - eps)


def make_conv(name, bias=True, seed=0):
    c_in, c_out, k, s, p, hw = CONVS[name]
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, bias=bias).to(D)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=D))
        if bias:
            conv.bias.copy_(0.3 * torch.randn(c_out, generator=gen, dtype=D))
    return conv, (c_in, *hw)


def make_linear(d_in=9, d_out=6, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias).to(D)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=D))
        if bias:
            lin.bias.copy_(0.3 * torch.randn(d_out, generator=gen, dtype=D))
    return lin


def _basis_push(fn, n_in):
    """Dense matrix of a linear map by pushing the basis vectors through it: (n_out, n_in)."""
    eye = torch.eye(n_in, dtype=D)
    return fn(eye).reshape(n_in, -1).T.contiguous()


def dense_matrix(module, in_shape):
    """Matrix (Jacobian) of the bias-free layer map x -> fwd(x, W), flattened: (n_out, n_in)."""
    w = module.weight.detach()
    n_in = math.prod(in_shape)
    if isinstance(module, nn.Conv2d):
        return _basis_push(lambda e: F.conv2d(e.reshape(n_in, *in_shape), w, None, module.stride, module.padding),
                           n_in)
    return _basis_push(lambda e: F.linear(e, w), n_in)


def kernel_matrix(kernel, conv, in_shape):
    """Dense matrix of the conv map with an arbitrary kernel (stride/padding of ``conv``)."""
    n_in = math.prod(in_shape)
    return _basis_push(lambda e: F.conv2d(e.reshape(n_in, *in_shape), kernel, None, conv.stride, conv.padding),
                       n_in)


def dense_bias(module, in_shape):
    """Bias of every output element, flattened."""
    if module.bias is None:
        return torch.zeros(module.weight.shape[0], dtype=D)
    if isinstance(module, nn.Conv2d):
        with torch.no_grad():
            z0 = F.conv2d(torch.zeros(1, *in_shape, dtype=D), module.weight, module.bias, module.stride,
                          module.padding)
        return z0.reshape(-1)
    return module.bias.detach().clone()


def make_layer(module, x, nonneg):
    """A relprop ``Layer`` for ``module`` applied to ``x`` (ReLU in front when ``nonneg``)."""
    model = nn.Sequential(nn.ReLU(), module) if nonneg else nn.Sequential(module)
    graph = g.capture(model)
    node = next(n for n in graph.nodes if n.kind in (g.CONV, g.LINEAR))
    with torch.no_grad():
        y = module(x)
    return Layer(node, [x], y, args=(x,), kwargs={}, lin=LinearMap(module), z=y, x_nonneg=nonneg)


def run_rule(rule, module, x, r, nonneg):
    with torch.no_grad():
        out = rule(make_layer(module, x, nonneg), r)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].shape == x.shape
    return out[0]


def per_sample(fn, x, r, *args, **kw):
    """Apply a dense per-sample reference ``fn(x_vec, r_vec, *args)`` to every sample."""
    outs = [fn(x[b].reshape(-1), r[b].reshape(-1), *args, **kw) for b in range(x.shape[0])]
    return torch.stack(outs).reshape(x.shape)


def conv_data(name, nonneg=True, seed=1, batch=2, bias=True):
    conv, in_shape = make_conv(name, bias=bias, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, *in_shape, generator=gen, dtype=D)
    if nonneg:
        x = x.clamp(min=0)
    with torch.no_grad():
        out_shape = conv(x).shape
    r = torch.randn(out_shape, generator=gen, dtype=D)
    return conv, in_shape, x, r


def psum(t):
    return t.flatten(1).sum(1)


# ------------------------------------------------------------------ dense rules
def d_term(xv, V, R):
    """xv * V^T SD(R, V xv): one z-rule term."""
    return xv * (V.T @ SD(R, V @ xv))


def d_rap_repo(x, R, M, alpha):
    """RAP repository LRP-alpha-beta (methods.md §1.4), no bias; for signed x each sign group
    shares one denominator (Transformer-Explainability's fix of the repository's double count)."""
    beta = alpha - 1
    Mp, Mn = M.clamp(min=0), M.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    sa, sb = SD(R, Mp @ xp + Mn @ xn), SD(R, Mn @ xp + Mp @ xn)
    return (alpha * (xp * (Mp.T @ sa) + xn * (Mn.T @ sa))
            - beta * (xp * (Mn.T @ sb) + xn * (Mp.T @ sb)))


def d_zennit_ab(x, R, M, b, alpha, beta, eps):
    """Zennit alpha-beta: one stabilised denominator per sign group, bias split b+/b-."""
    Mp, Mn = M.clamp(min=0), M.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    zp = Mp @ xp + Mn @ xn + b.clamp(min=0)
    zn = Mn @ xp + Mp @ xn + b.clamp(max=0)
    sp, sn = R / stab(zp, eps), R / stab(zn, eps)
    act = xp * (Mp.T @ sp) + xn * (Mn.T @ sp)
    inh = xp * (Mn.T @ sn) + xn * (Mp.T @ sn)
    return alpha * act - beta * inh


def d_epsilon(x, R, M, b, eps):
    z = M @ x + b
    return x * (M.T @ (R / stab(z, eps)))


def d_zbox(x, R, M, lo, hi, divide):
    """z^B with per-input-element bound vectors lo, hi."""
    Mp, Mn = M.clamp(min=0), M.clamp(max=0)
    Z = M @ x - Mp @ lo - Mn @ hi
    S = divide(R, Z)
    return x * (M.T @ S) - lo * (Mp.T @ S) - hi * (Mn.T @ S)


def d_flat(R, M, eps):
    """Uniform over the receptive field: R_i = sum_j [i in RF(j)] R_j / (|RF(j)| + eps)."""
    A = (M != 0).to(D)
    n = A.sum(1)
    return A.T @ (R / (n + eps))


def d_shift(C, total):
    """Uniform shift of the non-zero entries of C so that sum = total."""
    nz = (C != 0).to(D)
    cnt = nz.sum()
    if cnt == 0:
        return C
    return C - nz * (C.sum() - total) / cnt


def d_rap_pos_prop(a, R, M, conv_routing, total=None):
    """RAP pos_prop for a >= 0 (methods.md §2.4 Linear math / §2.5 Conv math) + shift to
    ``total`` (default sum R)."""
    Mp, Ma = M.clamp(min=0), (-M).clamp(min=0)
    Zp, Zn = Mp @ a, Ma @ a
    Rp, Rn = R.clamp(min=0), R.clamp(max=0)
    if conv_routing:
        C = a * (Mp.T @ SD(Rp, Zp)) + a * (Ma.T @ SD(Rn, Zn)) + a * (Ma.T @ SD(Rp + Rn, Zp + Zn))
    else:
        C = a * (Mp.T @ SD(Rp + Rn, Zp)) + a * (Ma.T @ SD(Rp + Rn, Zp + Zn))
    return d_shift(C, R.sum() if total is None else total)


def d_rap_hidden(x, R, M, conv_routing):
    """RAP hidden rule; a signed x splits R between the x+ and |x-| passes by absolute
    contribution, R- = R |M| |x-| / (|M| x+ + |M| |x-|), each pass shifted to its share's sum."""
    if not (x < 0).any():
        return d_rap_pos_prop(x.clamp(min=0), R, M, conv_routing)
    a, n = x.clamp(min=0), (-x).clamp(min=0)
    share = SD(M.abs() @ n, M.abs() @ a + M.abs() @ n)
    rn = R * share
    return (d_rap_pos_prop(a, R - rn, M, conv_routing, total=R.sum() - rn.sum())
            + d_rap_pos_prop(n, rn, M, conv_routing))


def d_rap_first(x, pd, M, b):
    """RAP first propagation, pseudo-code of methods.md §2.3 (signed x allowed)."""
    Mp, Mn = M.clamp(min=0), M.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z1, z2, z3, z4 = Mp @ xp, Mn @ xp, Mp @ xn, Mn @ xn
    rpp, rpn, rnp, rnn = z1 * pd, z2 * pd, z3 * pd, z4 * pd
    pos, neg = (rpp + rnn).sum(), (rpn + rnp).sum()
    bp = b * pd * SD(pos, pos + neg)
    bn = b * pd * SD(neg, pos + neg)
    C = (xp * (Mp.T @ SD(rpp, z1)) + xp * (Mn.T @ SD(rpn, z2)) + xn * (Mp.T @ SD(rnp, z3))
         + xn * (Mn.T @ SD(rnn, z4)) + xp * (Mp.T @ SD(bp, z1)) + xp * (Mn.T @ SD(bn, z2)))
    P, N = C.clamp(min=0), C.clamp(max=0)
    tot = (P - N).sum()
    return (SD(P, tot) - SD(N, tot)) * (P + N).sum()


def d_rsp(a_signed, R, conv, in_shape):
    """RSP conv rule (methods.md §3.2) for one sample, with the weight-gradient kernels
    computed by autograd and the conv maps as dense matrices."""
    a = a_signed.clamp(min=0)
    P, N = R.clamp(min=0), (-R).clamp(min=0)
    out_shape = (conv.out_channels, -1)

    def kernel(rel):
        wv = torch.zeros_like(conv.weight, requires_grad=True)
        with torch.enable_grad():
            y = F.conv2d(a.reshape(1, *in_shape), wv, None, conv.stride, conv.padding)
            (gk,) = torch.autograd.grad((y.reshape(out_shape) * rel.reshape(out_shape)).sum(), wv)
        return gk

    Gp, Gn = kernel(P), kernel(N)
    MGp, MGn = kernel_matrix(Gp, conv, in_shape), kernel_matrix(Gn, conv, in_shape)
    C = a * (MGp.T @ SD(P, MGp @ a)) - a * (MGn.T @ SD(N, MGn @ a))
    if tuple(conv.kernel_size) == (1, 1):
        return C
    return d_shift(2 * C, (P - N).sum())


def d_ae(x, R, M, ratio, is_1x1):
    """AE hedge conv rule (methods.md §4.2) for one sample."""
    Wa = M.abs()
    a = x.clamp(min=0)
    Rp, Rn = R.clamp(min=0), R.clamp(max=0)
    T = SD(Rp, Rp.sum())
    O = -SD(Rn, Rn.sum())
    Tr = ratio * T
    Z = Wa @ a
    act, ina = (x > 0).to(D), (x <= 0).to(D)
    A = act * (Wa.T @ SD(T, (Wa @ act) * (R >= 0)))
    B = ina * (Wa.T @ SD(O, (Wa @ ina) * (R <= 0)))
    if is_1x1:
        return a * (Wa.T @ SD(T, Z * (T != 0))) + a * (Wa.T @ SD(O, Z * (O != 0))) + A + B
    C1 = a * (Wa.T @ SD(Tr, Z * (Tr != 0))) + a * (Wa.T @ SD(O, Z * (O != 0)))
    nz = (C1 != 0).to(D)
    C1s = C1 - nz * SD(torch.ones((), dtype=D), nz.sum())
    return C1s + A + B


# ============================================================================ 0. reference
@pytest.mark.parametrize("name", CONV_IDS)
def test_dense_matrix_is_the_layer_map(name):
    """The dense reference M is the bias-free conv map (M v = conv(v)) and M^T its
    autograd vector-Jacobian product (M^T s = d<conv(v), s>/dv), i.e. M is the Jacobian."""
    conv, in_shape = make_conv(name)
    M = dense_matrix(conv, in_shape)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(1, *in_shape, generator=gen, dtype=D, requires_grad=True)
    with torch.enable_grad():
        y = F.conv2d(v, conv.weight.detach(), None, conv.stride, conv.padding)
        s_ = torch.randn(y.shape, generator=gen, dtype=D)
        (vjp_,) = torch.autograd.grad(y, v, s_)
    close(M @ v.detach().reshape(-1), y.detach().reshape(-1), rtol=1e-12)
    close(M.T @ s_.reshape(-1), vjp_.reshape(-1), rtol=1e-12)
    assert M.shape == (y.numel(), v.numel())


# ============================================================================ 1. ops
def test_safe_divide_exact_zero_and_plain_division():
    """SD(a, 0) == 0 exactly (also 0/0, -0.0, inf/0); a/b bit-for-bit elsewhere."""
    a = torch.tensor([1.5, -2.0, 0.0, 3.0, float("inf"), 7.0, -1e-300], dtype=D)
    b = torch.tensor([0.0, -0.0, 0.0, 2.0, 0.0, -3.0, 1e-300], dtype=D)
    out = ops.safe_divide(a, b)
    assert torch.equal(out[:3], torch.zeros(3, dtype=D))
    assert out[4] == 0
    assert not torch.isnan(out).any()
    nz = b != 0
    assert torch.equal(out[nz], a[nz] / b[nz])
    # tiny denominators are not regularised
    assert ops.safe_divide(torch.tensor([1.0], dtype=D), torch.tensor([1e-12], dtype=D)).item() == 1e12
    # broadcasting like a / b
    aa, bb = torch.randn(3, 4, dtype=D), torch.tensor([[0.0], [2.0], [-0.5]], dtype=D)
    out = ops.safe_divide(aa, bb)
    assert torch.equal(out[0], torch.zeros(4, dtype=D))
    assert torch.equal(out[1:], aa[1:] / bb[1:])


def test_stabilize_sign_zero_is_plus_one():
    """stabilize(z, eps) = z + eps*sign(z) with sign(0) = +1."""
    z = torch.tensor([-2.0, 0.0, 3.0, -1e-9, 1e-9], dtype=D)
    out = ops.stabilize(z, 0.5)
    assert torch.equal(out, torch.tensor([-2.5, 0.5, 3.5, -1e-9 - 0.5, 1e-9 + 0.5], dtype=D))
    assert (ops.stabilize(z, 1e-6) != 0).all()


def test_shift_nonzero_and_psum():
    """shift_nonzero moves only the non-zero entries, uniformly, per sample; no shift if all zero."""
    c = torch.tensor([[[1.0, 0.0], [2.0, -3.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=D)
    assert torch.equal(ops.psum(c).reshape(-1), torch.tensor([0.0, 0.0], dtype=D))
    excess = torch.tensor([3.0, 5.0], dtype=D).reshape(2, 1, 1)
    out = ops.shift_nonzero(c, excess)
    exp = torch.tensor([[[0.0, 0.0], [1.0, -4.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=D)
    assert torch.equal(out, exp)


# ============================================================== 2. RAP-repo LRP alpha-beta
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("name", CONV_IDS)
def test_rap_repo_alphabeta_conv_dense(name, alpha):
    """lrp-rap-repo alpha-beta on a conv with x >= 0 equals the dense formula (§1.4)."""
    conv, in_shape, x, r = conv_data(name)
    M = dense_matrix(conv, in_shape)
    out = run_rule(lrp_mod.alphabeta_rap_repo(alpha), conv, x, r, nonneg=True)
    close(out, per_sample(d_rap_repo, x, r, M, alpha))
    # the same input without the non-negativity flag gives the same result (x- terms vanish)
    close(run_rule(lrp_mod.alphabeta_rap_repo(alpha), conv, x, r, nonneg=False), out)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("name", ["3x3", "3x3_s2_outpad", "1x1"])
def test_rap_repo_alphabeta_conserves_nonneg(name, alpha):
    """z+ / alpha2beta1 on x >= 0 conserve sum R per sample, except for outputs with a zero
    denominator: sum R_in = alpha sum_j R_j [z+_j != 0] - beta sum_j R_j [z-_j != 0]."""
    conv, in_shape, x, r = conv_data(name)
    M = dense_matrix(conv, in_shape)
    out = run_rule(lrp_mod.alphabeta_rap_repo(alpha), conv, x, r, nonneg=True)
    exp = []
    for b in range(x.shape[0]):
        xb, rb = x[b].reshape(-1), r[b].reshape(-1)
        zp, zn = M.clamp(min=0) @ xb, M.clamp(max=0) @ xb
        exp.append(alpha * (rb * (zp != 0)).sum() - (alpha - 1) * (rb * (zn != 0)).sum())
    close(psum(out), torch.stack(exp))
    # with every denominator non-zero (x > 0, every output channel has weights of both signs)
    # the sum is exactly conserved
    with torch.no_grad():
        conv.weight[:, 0] = conv.weight[:, 0].abs()
        conv.weight[:, 1] = -conv.weight[:, 1].abs()
    xpos = x.abs() + 0.1
    close(psum(run_rule(lrp_mod.alphabeta_rap_repo(alpha), conv, xpos, r, nonneg=True)), psum(r))


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("name", CONV_IDS + ["linear"])
def test_rap_repo_alphabeta_signed_input_conserves(name, alpha):
    """Signed input (not in the authors' nets): each sign group shares one denominator
    (Transformer-Explainability's fix), so sum R_in = sum R; equals the dense formula.  The
    repository's own code gives each signed term its own denominator and doubles the sum
    (methods.md §1.4 / §8.7): that result is asserted not to be returned."""
    if name == "linear":
        mod, in_shape = make_linear(d_in=16, seed=4), (16,)
        gen = torch.Generator().manual_seed(6)
        x = torch.randn(3, 16, generator=gen, dtype=D)
        r = torch.rand(3, 6, generator=gen, dtype=D) + 0.1
    else:
        mod, in_shape, x, r = conv_data(name, nonneg=False, seed=4)
    M = dense_matrix(mod, in_shape)
    Mp, Mn = M.clamp(min=0), M.clamp(max=0)
    kept = []   # sum R conserved except where a shared denominator is 0 (SD drops that R_j)
    for xb, rb in zip(x, r):
        xp, xn, rv = xb.reshape(-1).clamp(min=0), xb.reshape(-1).clamp(max=0), rb.reshape(-1)
        za, zb = Mp @ xp + Mn @ xn, Mn @ xp + Mp @ xn
        kept.append(alpha * (rv * (za != 0)).sum() - (alpha - 1) * (rv * (zb != 0)).sum())
    out = run_rule(lrp_mod.alphabeta_rap_repo(alpha), mod, x, r, nonneg=False)
    close(out, per_sample(d_rap_repo, x, r, M, alpha))
    close(psum(out), torch.stack(kept))
    if name == "linear":
        close(psum(out), psum(r))

    def repo_double_count(xv, rv):
        xp, xn = xv.clamp(min=0), xv.clamp(max=0)
        return (alpha * (d_term(xp, Mp, rv) + d_term(xn, Mn, rv))
                - (alpha - 1) * (d_term(xp, Mn, rv) + d_term(xn, Mp, rv)))
    if name == "linear":   # all four separate denominators are non-zero there
        close(psum(per_sample(repo_double_count, x, r)), 2 * psum(r))
    assert not torch.allclose(out, per_sample(repo_double_count, x, r), rtol=1e-3)
    # for non-negative input it is the repository's rule (one denominator per weight sign)
    xp = x.clamp(min=0)
    close(run_rule(lrp_mod.alphabeta_rap_repo(alpha), mod, xp, r, nonneg=True),
          per_sample(lambda xv, rv: alpha * d_term(xv, Mp, rv) - (alpha - 1) * d_term(xv, Mn, rv), xp, r))


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("name", CONV_IDS + ["linear"])
def test_gu_zplus_dense_and_conserves_on_signed_input(name, negate):
    """Gu's z+ (bias ignored, ``+1e-9``; CLRP2's output layer with -W): ``x W+`` on ReLU
    inputs; on inputs not provably >= 0 one non-negative denominator ``x+ V+ + x- V-``
    (Zennit's z+), so relevance is conserved there too, except where that denominator is 0."""
    if name == "linear":
        mod = make_linear(seed=3)
        in_shape = (9,)
        gen = torch.Generator().manual_seed(8)
        x, r = torch.randn(3, 9, generator=gen, dtype=D), torch.randn(3, 6, generator=gen, dtype=D)
    else:
        mod, in_shape, x, r = conv_data(name, nonneg=False, seed=5)
    M = -dense_matrix(mod, in_shape) if negate else dense_matrix(mod, in_shape)
    no_bias = torch.zeros(M.shape[0], dtype=D)
    rule = lrp_mod.zplus_plain(negate=negate)
    out = run_rule(rule, mod, x, r, nonneg=False)
    close(out, per_sample(d_zennit_ab, x, r, M, no_bias, 1.0, 0.0, 1e-9))
    z = [M.clamp(min=0) @ xb.clamp(min=0).reshape(-1) + M.clamp(max=0) @ xb.clamp(max=0).reshape(-1) for xb in x]
    kept = torch.stack([(rb.reshape(-1) * (zb > 0)).sum() for rb, zb in zip(r, z)])  # lost only where z+ == 0
    close(psum(out), kept, rtol=1e-6)
    xp = x.clamp(min=0)
    close(run_rule(rule, mod, xp, r, nonneg=True), per_sample(lambda xv, rv: xv * (M.clamp(min=0).T @ (
        rv / (M.clamp(min=0) @ xv + 1e-9))), xp, r))


# ============================================================ 3. Zennit alpha-beta, epsilon
@pytest.mark.parametrize("params", [(1.0, 0.0, 1e-6), (2.0, 1.0, 1e-6), (2.0, 1.0, 0.25)])
@pytest.mark.parametrize("name", CONV_IDS + ["linear"])
@pytest.mark.parametrize("signed", [False, True])
def test_zennit_alphabeta_dense(name, params, signed):
    """Zennit alpha-beta (bias split b+/b-, one stabilised denominator per sign group,
    signed inputs) equals the dense formula."""
    alpha, beta, eps = params
    if name == "linear":
        mod = make_linear(seed=3)
        in_shape = (9,)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(3, 9, generator=gen, dtype=D)
        r = torch.randn(3, 6, generator=gen, dtype=D)
    else:
        mod, in_shape, x, r = conv_data(name, nonneg=False, seed=3)
    if not signed:
        x = x.clamp(min=0)
    M, b = dense_matrix(mod, in_shape), dense_bias(mod, in_shape)
    out = run_rule(lrp_mod.alphabeta(alpha, beta, eps), mod, x, r, nonneg=not signed)
    close(out, per_sample(d_zennit_ab, x, r, M, b, alpha, beta, eps))


def test_zennit_alphabeta_zplus_conserves_without_bias():
    """z+ (alpha=1, beta=0) without bias conserves sum R up to the eps loss
    sum_j R_j * z+_j / (z+_j + eps)."""
    conv, in_shape, x, r = conv_data("3x3", bias=False)
    M = dense_matrix(conv, in_shape)
    eps = 1e-3
    out = run_rule(lrp_mod.alphabeta(1.0, 0.0, eps), conv, x, r, nonneg=True)
    exp = torch.stack([(r[b].reshape(-1) * (zp := M.clamp(min=0) @ x[b].reshape(-1)) / (zp + eps)).sum()
                       for b in range(x.shape[0])])
    close(psum(out), exp)
    assert not torch.allclose(psum(out), psum(r), rtol=1e-8, atol=0)   # eps really matters here


@pytest.mark.parametrize("eps", [1e-6, 0.25])
@pytest.mark.parametrize("name", CONV_IDS + ["linear"])
def test_epsilon_dense(name, eps):
    """LRP-epsilon: R_in = x * M^T (R / stabilize(Mx + b, eps)), signed x, bias in z."""
    if name == "linear":
        mod, in_shape = make_linear(seed=4), (9,)
        gen = torch.Generator().manual_seed(8)
        x = torch.randn(3, 9, generator=gen, dtype=D)
        r = torch.randn(3, 6, generator=gen, dtype=D)
    else:
        mod, in_shape, x, r = conv_data(name, nonneg=False, seed=4)
    M, b = dense_matrix(mod, in_shape), dense_bias(mod, in_shape)
    out = run_rule(lrp_mod.epsilon(eps), mod, x, r, nonneg=False)
    close(out, per_sample(d_epsilon, x, r, M, b, eps))
    # without bias and a tiny eps the rule conserves: sum R_in = sum_j R_j z_j / stab(z_j)
    if eps == 1e-6:
        with torch.no_grad():
            mod.bias.zero_()
        out0 = run_rule(lrp_mod.epsilon(eps), mod, x, r, nonneg=False)
        exp = torch.stack([(r[i].reshape(-1) * (z := M @ x[i].reshape(-1)) / stab(z, eps)).sum()
                           for i in range(x.shape[0])])
        close(psum(out0), exp)


# ================================================================== 4. z^B and flat
def _bound_vectors(x_vec, in_shape, bounds):
    if bounds == "image":
        return torch.full_like(x_vec, x_vec.min().item()), torch.full_like(x_vec, x_vec.max().item())
    lo, hi = bounds
    vec = []
    for v in (lo, hi):
        t = torch.as_tensor(v, dtype=D)
        if t.ndim == 1:
            t = t.reshape(-1, 1, 1).expand(in_shape)
        else:
            t = t.expand(in_shape)
        vec.append(t.reshape(-1).clone())
    return vec


def _zb_bounds(kind, c_in):
    if kind == "image":
        return "image"
    if kind == "const":
        return (-2.1179, 2.64)
    return ([-2.2 + 0.15 * c for c in range(c_in)], [2.4 + 0.1 * c for c in range(c_in)])   # per channel


@pytest.mark.parametrize("divide", ["sd", "plus1e-9"])
@pytest.mark.parametrize("bounds", ["image", "const", "per_channel"])
@pytest.mark.parametrize("name", ["3x3", "3x3_s2_outpad", "3x3_nopad", "rect", "1x1"])
def test_zbox_dense_and_conserves(name, bounds, divide):
    """z^B: equals the dense formula (zero padding applies to L, H like to x) and conserves
    sum R wherever Z != 0 (exact with SD; up to 1e-9 with +1e-9)."""
    conv, in_shape, x, r = conv_data(name, nonneg=False, seed=6)
    x = x.clamp(-2.0, 2.3)   # inside every bound set
    x[1] *= 0.6              # different per-image min / max for the two samples
    bnd = _zb_bounds(bounds, in_shape[0])
    div = ops.safe_divide if divide == "sd" else rules.plus_divide(1e-9)
    dense_div = SD if divide == "sd" else (lambda a, b: a / (b + 1e-9))
    M = dense_matrix(conv, in_shape)
    out = run_rule(rules.zbox(bnd, div), conv, x, r, nonneg=False)

    def ref(xv, rv):
        lo, hi = _bound_vectors(xv, in_shape, bnd)
        return d_zbox(xv, rv, M, lo, hi, dense_div)

    close(out, per_sample(ref, x, r), rtol=1e-9)
    # Z >= 0 for L <= x <= H; all Z > 0 here, so sum is conserved
    for b in range(x.shape[0]):
        lo, hi = _bound_vectors(x[b].reshape(-1), in_shape, bnd)
        Z = M @ x[b].reshape(-1) - M.clamp(min=0) @ lo - M.clamp(max=0) @ hi
        assert (Z > 1e-6).all()
    close(psum(out), psum(r), rtol=1e-12 if divide == "sd" else 1e-7)


def test_zbox_drops_relevance_where_z_is_zero():
    """With SD, outputs whose Z is exactly 0 (here: an all-zero filter) lose their relevance;
    the rest is conserved."""
    conv, in_shape, x, r = conv_data("3x3", nonneg=False, seed=9)
    with torch.no_grad():
        conv.weight[2] = 0.0
    out = run_rule(rules.zbox("image", ops.safe_divide), conv, x, r, nonneg=False)
    assert torch.isfinite(out).all()
    M = dense_matrix(conv, in_shape)
    close(out, per_sample(lambda xv, rv: d_zbox(xv, rv, M, *_bound_vectors(xv, in_shape, "image"), SD), x, r),
          rtol=1e-9)
    close(psum(out), psum(r) - r[:, 2].flatten(1).sum(1))


@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("name", CONV_IDS + ["linear"])
def test_flat_dense(name, eps):
    """flat: R_i = sum_j [i in RF(j)] R_j / (|RF(j)| + eps), independent of x and W."""
    if name == "linear":
        mod, in_shape = make_linear(), (9,)
        gen = torch.Generator().manual_seed(10)
        x = torch.randn(2, 9, generator=gen, dtype=D)
        r = torch.randn(2, 6, generator=gen, dtype=D)
    else:
        mod, in_shape, x, r = conv_data(name, nonneg=False, seed=10)
    M = dense_matrix(mod, in_shape)
    assert (M[M != 0].abs() > 0).all()
    out = run_rule(rules.flat(eps), mod, x, r, nonneg=False)
    close(out, per_sample(lambda xv, rv: d_flat(rv, M, eps), x, r))
    # conservation up to the eps loss
    n = (M != 0).to(D).sum(1)
    close(psum(out), torch.stack([(r[b].reshape(-1) * n / (n + eps)).sum() for b in range(2)]))


# ======================================================================= 5. RAP
def _first_prop_data(signed=False):
    lin = make_linear(d_in=10, d_out=5, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 10, generator=gen, dtype=D)
    if not signed:
        x = x.clamp(min=0)
    k0, k1 = 1, 3
    with torch.no_grad():   # biases chosen so that z_k0 = 1.3 for sample 0, z_k1 = -0.9 for sample 1
        z = lin(x)
        lin.bias[k0] += 1.3 - z[0, k0]
        lin.bias[k1] += -0.9 - z[1, k1]
    pd = torch.zeros(2, 5, dtype=D)
    pd[0, k0] = 1.0
    pd[1, k1] = 1.0
    return lin, x, pd


def test_rap_first_propagation_closed_form():
    """First propagation on x >= 0: R_i = z_k |x_i w_ki| / sum_i' |x_i' w_ki'|, every entry has
    the sign of z_k, sum = z_k (bias included)."""
    lin, x, pd = _first_prop_data()
    out = run_rule(rap_mod.first_propagation, lin, x, pd, nonneg=True)
    with torch.no_grad():
        z = lin(x)
    ks = pd.argmax(1)
    zk = z[torch.arange(2), ks]
    assert zk[0] > 0 and zk[1] < 0
    W = lin.weight.detach()
    contrib = (x * W[ks]).abs()
    exp = zk[:, None] * contrib / contrib.sum(1, keepdim=True)
    close(out, exp)
    assert ((out * zk[:, None].sign()) >= 0).all()
    assert (out[x == 0] == 0).all()
    close(psum(out), zk)


def test_rap_first_propagation_bias_only_through_zk():
    """Changing the biases of other classes changes nothing; changing b_k rescales by z_k'/z_k."""
    lin, x, pd = _first_prop_data()
    k0, k1 = int(pd[0].argmax()), int(pd[1].argmax())
    others = [k for k in range(5) if k not in (k0, k1)]
    out = run_rule(rap_mod.first_propagation, lin, x, pd, nonneg=True)
    with torch.no_grad():
        z_before = lin(x)
        lin.bias[others[0]] += 3.0
        lin.bias[others[1]] -= 2.0
    close(run_rule(rap_mod.first_propagation, lin, x, pd, nonneg=True), out)
    with torch.no_grad():
        lin.bias[k0] += 0.5
        z_after = lin(x)
    ratio = z_after[0, k0] / z_before[0, k0]
    out2 = run_rule(rap_mod.first_propagation, lin, x, pd, nonneg=True)
    close(out2[0], out[0] * ratio)
    close(out2[1], out[1])


def test_rap_first_propagation_signed_input_closed_form():
    """First propagation with signed x (not in the authors' nets): the closed form of §2.3,
    ``R_i = z_k |x_i w_ki| / sum |x w_k|``, which sums to z_k.  The authors' pseudo-code differs
    there (its bias shares flow through the x+ paths only): asserted not to be returned."""
    lin, x, pd = _first_prop_data(signed=True)
    M, b = dense_matrix(lin, (10,)), dense_bias(lin, (10,))
    out = run_rule(rap_mod.first_propagation, lin, x, pd, nonneg=False)
    with torch.no_grad():
        z = lin(x)
    ks = pd.argmax(1)
    zk = z[torch.arange(2), ks]
    contrib = (x * M[ks]).abs()
    close(out, zk[:, None] * contrib / contrib.sum(1, keepdim=True))
    close(psum(out), (z * pd).sum(1))
    assert not torch.allclose(out, per_sample(d_rap_first, x, pd, M, b), rtol=1e-3)
    # a non-negative input flagged signed takes the same closed form as the authors' rule
    xp = x.clamp(min=0)
    close(run_rule(rap_mod.first_propagation, lin, xp, pd, nonneg=False),
          run_rule(rap_mod.first_propagation, lin, xp, pd, nonneg=True))


def _rap_linear_data(seed=13, batch=3):
    lin = make_linear(d_in=12, d_out=7, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 12, generator=gen, dtype=D).clamp(min=0)
    r = torch.randn(batch, 7, generator=gen, dtype=D)
    r[0, 2] = 0.0    # a zero output relevance (masked out of Z)
    return lin, x, r


def test_rap_hidden_linear_dense_and_conserves():
    """RAP hidden Linear (§2.4 math, R- routed through W+/Z+) + uniform shift; sum R_in = sum R
    per sample for signed R."""
    lin, x, r = _rap_linear_data()
    assert (r > 0).any() and (r < 0).any()
    M = dense_matrix(lin, (12,))
    out = run_rule(rap_mod.hidden, lin, x, r, nonneg=True)
    close(out, per_sample(d_rap_hidden, x, r, M, False))
    close(psum(out), psum(r))
    # bi-polar and zero where the input is zero
    assert (out[x == 0] == 0).all()
    assert (out > 0).any() and (out < 0).any()


@pytest.mark.parametrize("name", CONV_IDS)
def test_rap_hidden_conv_dense_and_conserves(name):
    """RAP hidden Conv (§2.5 math, R- routed through |W-|/Z-) + uniform shift; conserves sum R."""
    conv, in_shape, x, r = conv_data(name, seed=14)
    M = dense_matrix(conv, in_shape)
    out = run_rule(rap_mod.hidden, conv, x, r, nonneg=True)
    close(out, per_sample(d_rap_hidden, x, r, M, True))
    close(psum(out), psum(r))
    assert (out[x == 0] == 0).all()


def test_rap_linear_and_conv_routings_differ():
    """The Linear and Conv routings of R- give different results; relprop uses the Linear one
    for nn.Linear and the Conv one for nn.Conv2d (fails if either used the other's)."""
    lin, x, r = _rap_linear_data()
    M = dense_matrix(lin, (12,))
    out = run_rule(rap_mod.hidden, lin, x, r, nonneg=True)
    ref_lin = per_sample(d_rap_hidden, x, r, M, False)
    ref_conv = per_sample(d_rap_hidden, x, r, M, True)
    assert (ref_lin - ref_conv).abs().max() > 1e-3 * ref_lin.abs().max()
    close(out, ref_lin)
    assert not torch.allclose(out, ref_conv, rtol=1e-6, atol=1e-9)

    conv, in_shape, xc, rc = conv_data("3x3", seed=15)
    Mc = dense_matrix(conv, in_shape)
    outc = run_rule(rap_mod.hidden, conv, xc, rc, nonneg=True)
    ref_c = per_sample(d_rap_hidden, xc, rc, Mc, True)
    ref_l = per_sample(d_rap_hidden, xc, rc, Mc, False)
    assert (ref_c - ref_l).abs().max() > 1e-3 * ref_c.abs().max()
    close(outc, ref_c)
    assert not torch.allclose(outc, ref_l, rtol=1e-6, atol=1e-9)

    # with R >= 0 the two routings coincide
    rp = r.abs()
    close(per_sample(d_rap_hidden, x, rp, M, False), per_sample(d_rap_hidden, x, rp, M, True))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_rap_hidden_signed_input_conserves(kind):
    """Signed layer input (not in the authors' nets): the x+ and |x-| passes share R by absolute
    contribution and are each shifted to their share, so sum R_in = sum R; equals the dense
    formula.  The authors' code shifts both passes to sum R (sum R_in = 2 sum R, §2.4/§8.7):
    asserted not to be what is returned."""
    if kind == "linear":
        lin = make_linear(d_in=12, d_out=7, seed=16)
        gen = torch.Generator().manual_seed(17)
        x = torch.randn(2, 12, generator=gen, dtype=D)
        r = torch.randn(2, 7, generator=gen, dtype=D)
        M, mod = dense_matrix(lin, (12,)), lin
    else:
        mod, in_shape, x, r = conv_data("3x3", nonneg=False, seed=16)
        M = dense_matrix(mod, in_shape)
    out = run_rule(rap_mod.hidden, mod, x, r, nonneg=False)
    close(out, per_sample(d_rap_hidden, x, r, M, kind == "conv"))
    close(psum(out), psum(r))

    def authors(xv, rv):
        return (d_rap_pos_prop(xv.clamp(min=0), rv, M, kind == "conv")
                + d_rap_pos_prop((-xv).clamp(min=0), rv, M, kind == "conv"))
    close(psum(per_sample(authors, x, r)), 2 * psum(r))
    # the shares are the absolute-contribution split: a sample whose x- is 0 takes the x+ pass alone
    x1 = x.clone()
    x1[0] = x1[0].clamp(min=0)
    close(run_rule(rap_mod.hidden, mod, x1, r, nonneg=False)[0],
          per_sample(d_rap_pos_prop, x1[:1].clamp(min=0), r[:1], M, kind == "conv")[0])


# ======================================================================= 6. RSP
@pytest.mark.parametrize("name", CONV_IDS)
def test_rsp_conv_dense_one_sample(name):
    """RSP conv (§3.2): weight-gradient kernels G+-, C = 2(C+ - C-) + shift (1x1: neither)."""
    conv, in_shape, x, r = conv_data(name, seed=18, batch=1)
    out = run_rule(rsp_mod.conv, conv, x, r, nonneg=True)
    close(out, per_sample(d_rsp, x, r, conv, in_shape), rtol=1e-9, atol_rel=1e-11)


@pytest.mark.parametrize("name", CONV_IDS)
def test_rsp_conv_weight_invariant_and_conserves(name):
    """RSP conv ignores W (re-randomised W: identical output) and conserves sum R per sample."""
    conv, in_shape, x, r = conv_data(name, seed=19)
    out = run_rule(rsp_mod.conv, conv, x, r, nonneg=True)
    conv2, _ = make_conv(name, seed=99)
    assert not torch.equal(conv2.weight, conv.weight)
    out2 = run_rule(rsp_mod.conv, conv2, x, r, nonneg=True)
    assert torch.equal(out, out2)
    assert (out[x == 0] == 0).all()
    if name != "1x1":      # the shift restores sum R whatever the zero denominators
        close(psum(out), psum(r), rtol=1e-9)


def test_rsp_1x1_conserves_without_shift():
    """1x1 RSP conserves sum R without any shift: entries are exactly the two z-rule terms
    (zero where the input is zero, no factor 2)."""
    conv, in_shape, x, r = conv_data("1x1", seed=20)
    x[:, 0] = x[:, 0].abs() + 0.1      # every pixel has an active input: G a != 0 everywhere
    out = run_rule(rsp_mod.conv, conv, x, r, nonneg=True)
    close(psum(out), psum(r), rtol=1e-9)
    ref = per_sample(d_rsp, x, r, conv, in_shape)
    close(out, ref, rtol=1e-9)
    # with dead pixels (all inputs 0) their relevance is dropped: sum = sum R over live pixels
    xd = x.clone()
    xd[..., :2, :] = 0.0
    outd = run_rule(rsp_mod.conv, conv, xd, r, nonneg=True)
    close(psum(outd), psum(r[..., 2:, :]), rtol=1e-9)
    # if a factor 2 + shift were applied to 1x1 as to 3x3, the result would differ
    shifted = torch.stack([d_shift(2 * ref[b].reshape(-1), r[b].sum()) for b in range(2)]).reshape(ref.shape)
    assert not torch.allclose(out, shifted, rtol=1e-6)


@pytest.mark.parametrize("name", ["3x3", "3x3_s2_outpad", "1x1"])
def test_rsp_per_sample_independence(name):
    """RSP on a batch of 2 equals two batches of 1 (kernels are per sample)."""
    conv, in_shape, x, r = conv_data(name, seed=21)
    both = run_rule(rsp_mod.conv, conv, x, r, nonneg=True)
    singles = torch.cat([run_rule(rsp_mod.conv, conv, x[i:i + 1], r[i:i + 1], nonneg=True) for i in range(2)])
    close(both, singles, rtol=1e-11)


# ======================================================================== 7. AE
@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("name", CONV_IDS)
def test_ae_conv_dense(name, ratio):
    """AE hedge conv (§4.2), T/O normalised per sample: equals the dense formula."""
    conv, in_shape, x, r = conv_data(name, seed=22)
    M = dense_matrix(conv, in_shape)
    out = run_rule(ae_mod.conv(ratio), conv, x, r, nonneg=True)
    close(out, per_sample(d_ae, x, r, M, ratio, name == "1x1"))


@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("name", NON1X1)
def test_ae_conv_sum_is_r_minus_2(name, ratio):
    """Per non-1x1 conv: sum R_in = r - 2 per sample (R of both signs); r = 2: sum pos = -sum neg."""
    conv, in_shape, x, r = conv_data(name, seed=23)
    assert (r > 0).any() and (r < 0).any()
    # preconditions of exact conservation: every receptive field has active and inactive inputs
    M = dense_matrix(conv, in_shape).abs()
    for b in range(2):
        xv = x[b].reshape(-1)
        assert ((M @ (xv > 0).to(D)) > 0).all() and ((M @ (xv <= 0).to(D)) > 0).all()
    out = run_rule(ae_mod.conv(ratio), conv, x, r, nonneg=True)
    close(psum(out), torch.full((2,), ratio - 2, dtype=D), rtol=1e-10, atol_rel=1e-10)
    if ratio == 2.0:
        pos, neg = out.clamp(min=0).flatten(1).sum(1), out.clamp(max=0).flatten(1).sum(1)
        assert (pos > 0.5).all()
        close(pos, -neg, rtol=1e-10)
    # the scale of R is discarded: 7 * R gives the same output
    close(run_rule(ae_mod.conv(ratio), conv, x, 7 * r, nonneg=True), out)


def test_ae_1x1_sums_to_zero():
    """Per 1x1 conv: no ratio, no shift, sum R_in = 0."""
    conv, in_shape, x, r = conv_data("1x1", seed=24)
    x[:, 0] = x[:, 0].abs() + 0.1     # active everywhere
    x[:, 1] = 0.0                      # inactive everywhere
    out = run_rule(ae_mod.conv(2.0), conv, x, r, nonneg=True)
    close(psum(out), torch.zeros(2, dtype=D), atol_rel=1e-12)
    assert out.abs().sum() > 0.1
    # ratio has no effect on 1x1
    close(run_rule(ae_mod.conv(1.0), conv, x, r, nonneg=True), out)


# ================================================================ 8./9. end to end
VGG_SPEC = {"family": "vgg", "cfg": [8, "M", 16, "M", 16, "M"], "batch_norm": False,
            "hidden": [16, 16], "num_classes": 5, "avgpool": [7, 7]}
MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=D).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=D).reshape(1, 3, 1, 1)


def _init_weights(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=D) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=gen, dtype=D))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.6 + 0.8 * torch.rand(m.weight.shape, generator=gen, dtype=D))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen, dtype=D))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen, dtype=D))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=D))
    return model


def _image(batch=2, size=56, seed=31):
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 7, 7, generator=gen, dtype=D)
    img = 0.75 * F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    img = (img + 0.25 * torch.rand(batch, 3, size, size, generator=gen, dtype=D)).clamp(0, 1)
    return (img - MEAN) / STD


@pytest.fixture(scope="module")
def vgg(golden_models):
    model = _init_weights(golden_models.build(VGG_SPEC).to(D), seed=31).eval()
    x = _image()
    with torch.no_grad():
        z = model(x)
    top = z.argmax(1)
    second = z.argsort(1, descending=True)[:, 1]
    target = torch.stack([top[0], second[1]])
    return model, x, z, target


def _zt(z, t):
    return z[torch.arange(z.shape[0]), t]


def _cam(model, x, t):
    """Grad-CAM channel map at relprop's default layer: A * mean_hw(dz_t/dA)."""
    name = default_layer(g.capture(model)).name
    store = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            z = model(x.clone().requires_grad_(True))
            a = store["a"]
            (grad,) = torch.autograd.grad(_zt(z, t).sum(), a)
    finally:
        h.remove()
    return name, a.detach() * grad.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("method,params", [("lrp-rap-repo", {"alpha": 1.0}), ("lrp-rap-repo", {"alpha": 2.0}),
                                           ("rap", {})])
def test_end_to_end_sum_is_logit(vgg, method, params):
    """lrp-rap-repo (alpha 1, 2) and RAP: sum(map) = z_t, and every layer's input relevance
    sums to z_t (per-layer conservation; for RAP the head turns the one-hot into z_t)."""
    model, x, z, t = vgg
    res = relprop.Explainer(model, method, **params).attribute(x, t, layer_sums=True)
    zt = _zt(z, t)
    rtol = 1e-8 if method == "rap" else 1e-7   # rap-repo's z^B adds 1e-9 to Z
    close(psum(res.relevance), zt, rtol=rtol, atol_rel=0)
    assert set(res.layer_sums) >= {"features.0", "features.3", "features.6", "classifier.0", "classifier.6"}
    for name, s in res.layer_sums.items():
        close(s, zt, rtol=rtol, atol_rel=0)
    if method == "rap":
        hm = res.relevance.sum(1)
        assert (hm > 0).any() and (hm < 0).any()      # bi-polar


class _SignedNet(nn.Module):
    """A net whose hidden convs and linears read signed inputs (GELU, a signed residual add,
    no ReLU), as in ConvNeXt- and ViT-style nets, which the authors' code never meets."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.fc2 = nn.Linear(24, 10), nn.Linear(10, 5)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = x + self.conv2(F.gelu(self.conv1(x)))
        x = self.pool(x).flatten(1)
        return self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("method,params", [("rap", {}), ("rap-split", {}), ("lrp-rap-repo", {"alpha": 1.0}),
                                           ("lrp-rap-repo", {"alpha": 2.0})])
def test_end_to_end_signed_inputs_conserve(method, params):
    """On signed hidden inputs RAP, rap-split and lrp-rap-repo still conserve: every layer's
    input relevance sums to z_t (the authors' double count at each signed layer would give
    2x per signed conv/linear, 16x here)."""
    torch.manual_seed(5)
    model = _SignedNet().double().eval()
    x = _image(batch=3, size=8, seed=9)
    with torch.no_grad():
        z = model(x)
    t = z.argmax(1)
    res = relprop.Explainer(model, method, **params).attribute(x, t, layer_sums=True)
    zt = _zt(z, t)
    close(psum(res.relevance), zt, rtol=1e-7, atol_rel=0)
    sums = res.layer_sums
    for name in ("fc2", "fc1", "pool", "add", "stem"):   # the main path carries z_t
        close(sums[name], zt, rtol=1e-7, atol_rel=0)
    close(sums["conv1"], sums["conv2"], rtol=1e-7, atol_rel=0)   # the residual branch keeps its share
    assert not torch.allclose(sums["conv2"], zt, rtol=1e-2)


@pytest.mark.parametrize("method", ["rap", "rap-split"])
def test_rap_keeps_a_layer_of_tiny_signed_activations(method):
    """A GELU net whose first layer's outputs are all ~1e-7: RAP's signed-zero threshold is
    relative to the layer's largest magnitude there, so the layer keeps its entries and the map
    sums to the logit (with the fixed 2^-21 every entry counted as zero: an all-zero map)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.GELU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-7)
        model[0].bias.mul_(1e-7)
        model[2].weight.mul_(1e7)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert model[:2](x).abs().max() < rap_mod.SIGNED_ZERO
    maps = {}
    for dtype in (torch.float32, D):
        att = relprop.Explainer(copy.deepcopy(model).to(dtype), method).attribute(x.to(dtype), target=1)
        close(psum(att.relevance).double(), att.logits[:, 1].double(), rtol=1e-5 if dtype == torch.float32 else 1e-9)
        assert (att.relevance != 0).float().mean() > 0.9
        maps[dtype] = att.relevance.double()
    err = (maps[torch.float32] - maps[D]).flatten(1).norm(dim=1) / maps[D].flatten(1).norm(dim=1)
    assert (err < 1e-4).all(), err


def test_rap_head_on_signed_input_loses_nothing_where_x_plus_w_plus_is_zero():
    """RAP's output layer on a signed input whose ``x+ W+`` is 0 at the target (possible after
    a GELU): the authors' pseudo-code sends the bias shares through the x+ paths only and loses
    them (here the map would sum to ~20x the logit); the closed form conserves z_k."""
    torch.manual_seed(5)
    model = _SignedNet().double().eval()
    x = _image(batch=3, size=8, seed=9)
    graph = g.capture(model)
    with torch.no_grad():
        values = graph.forward(x)
    node = graph.node("fc2")
    xin, z = values[node.parents[0]], values[node.index]
    t = z.argmax(1)
    M, b = dense_matrix(model.fc2, (10,)), dense_bias(model.fc2, (10,))
    assert (M.clamp(min=0)[t[0]] @ xin[0].clamp(min=0)) == 0 and (xin < 0).any()
    layer = Layer(node, [xin], z, args=(xin,), kwargs={}, lin=LinearMap(model.fc2), z=z, x_nonneg=False)
    pd = F.one_hot(t, 5).to(D)
    with torch.no_grad():
        out = rap_mod.first_propagation(layer, pd)[0]
    zt = _zt(z, t)
    close(psum(out), zt)
    contrib = (xin * M[t]).abs()
    close(out, zt[:, None] * contrib / contrib.sum(1, keepdim=True))
    authors = per_sample(d_rap_first, xin, pd, M, b)
    assert (psum(authors)[0] - zt[0]).abs() > 10 * zt[0].abs()


def test_end_to_end_rap_per_layer_dense(vgg):
    """Spot-check the RAP graph pass against the dense rules: the relevance at the input of the
    last hidden Linear from the one at its output."""
    model, x, z, t = vgg
    graph = g.capture(model)
    with torch.no_grad():
        values = graph.forward(x)
    lin = model.classifier[3]
    node = graph.node("classifier.3")
    xin = values[node.parents[0]]
    r_out = torch.randn(2, 16, dtype=D)
    M = dense_matrix(lin, (16,))
    layer = Layer(node, [xin], values[node.index], args=(xin,), kwargs={}, lin=LinearMap(lin),
                  z=values[node.index], x_nonneg=graph.nodes[node.parents[0]].nonneg)
    assert layer.x_nonneg
    with torch.no_grad():
        out = rap_mod.hidden(layer, r_out)[0]
    close(out, per_sample(d_rap_hidden, xin, r_out, M, False))


def test_end_to_end_rsp_sum_is_cam_sum(vgg):
    """RSP: sum(map) = sum R0, R0 = cam / (max cam + 1e-9) per sample at the default layer;
    every layer below conserves it."""
    model, x, z, t = vgg
    name, cam = _cam(model, x, t)
    r0 = cam / (cam.amax(dim=(1, 2, 3), keepdim=True) + 1e-9)
    assert (r0 < 0).any()
    res = relprop.Explainer(model, "rsp").attribute(x, t, layer_sums=True)
    close(psum(res.relevance), psum(r0), rtol=1e-8, atol_rel=0)
    for n, s in res.layer_sums.items():
        close(s, psum(r0), rtol=1e-8, atol_rel=0)
    assert name in res.layer_sums


@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0])
def test_end_to_end_ae_sum(vgg, ratio):
    """AE: sum(map) = r - 2 per sample; every conv's input relevance sums to r - 2."""
    model, x, z, t = vgg
    _, cam = _cam(model, x, t)
    assert ((cam > 0).flatten(1).any(1) & (cam < 0).flatten(1).any(1)).all()
    # exactness needs an active and an inactive input in every receptive field (§4.2: B
    # loses mass where a whole field is active); true for this model and input
    graph = g.capture(model)
    with torch.no_grad():
        values = graph.forward(x)
    for name in ("features.3", "features.6"):
        xin, conv = values[graph.node(name).parents[0]], model.get_submodule(name)
        for m in (xin > 0, xin <= 0):
            assert (F.conv2d(m.to(D), conv.weight.abs(), None, 1, 1) > 0).all()
    res = relprop.Explainer(model, "ae", ratio=ratio).attribute(x, t, layer_sums=True)
    exp = torch.full((2,), ratio - 2, dtype=D)
    close(psum(res.relevance), exp, rtol=1e-9, atol_rel=1e-12)
    for n in ("features.0", "features.3", "features.6"):
        close(res.layer_sums[n], exp, rtol=1e-9, atol_rel=1e-12)


def test_end_to_end_ae_seed_scale_invariance(vgg):
    """AE map is invariant to a positive rescaling of the seed, and changes for a negative one."""
    model, x, z, t = vgg
    onehot = F.one_hot(t, 5).to(D)
    ex = relprop.Explainer(model, "ae")
    base = ex(x, initial_relevance=onehot)
    close(ex(x, t), base, rtol=1e-10)
    for c in (0.37, 5.0, 123.0):
        close(ex(x, initial_relevance=c * onehot), base, rtol=1e-9, atol_rel=1e-11)
    assert not torch.allclose(ex(x, initial_relevance=-onehot), base, rtol=1e-3)


@pytest.mark.parametrize("variant", ["clrp1", "clrp2"])
def test_end_to_end_clrp_gu_sums(vgg, variant):
    """Gu CLRP: sum LRP = |z_t|; sum dual = sum_{i != t} |z_i| (clrp1) or |z_t| (clrp2);
    the normalised difference sums to 0."""
    model, x, z, t = vgg
    zt = _zt(z, t).abs()
    lrp = relprop.Explainer(model, "clrp", variant=variant, style="gu", output="lrp")(x, t)
    dual = relprop.Explainer(model, "clrp", variant=variant, style="gu", output="dual")(x, t)
    cl = relprop.Explainer(model, "clrp", variant=variant, style="gu")(x, t)
    close(psum(lrp), zt, rtol=1e-6, atol_rel=0)
    exp_dual = z.abs().sum(1) - zt if variant == "clrp1" else zt
    close(psum(dual), exp_dual, rtol=1e-6, atol_rel=0)
    close(cl, lrp / psum(lrp)[:, None, None, None] - dual / psum(dual)[:, None, None, None], rtol=1e-12)
    close(psum(cl), torch.zeros(2, dtype=D), atol_rel=1e-12)
    if variant == "clrp2":
        assert not torch.allclose(lrp, dual, rtol=1e-3)


def test_end_to_end_clrp_agf_and_sglrp(vgg):
    """AGF-style CLRP and SGLRP: R_t - R_o * sum R_t / sum R_o with R_t, R_o the RAP-repo LRP
    (alpha=1) maps of their seeds; both sum to 0."""
    model, x, z, t = vgg
    C = z.shape[1]
    onehot = F.one_hot(t, C).to(D)
    zt = _zt(z, t)[:, None]
    lrp = relprop.Explainer(model, "lrp-rap-repo", alpha=1.0)

    def combine(seed_t, seed_o):
        rt, ro = lrp(x, initial_relevance=seed_t), lrp(x, initial_relevance=seed_o)
        return rt - ro * (psum(rt) / psum(ro))[:, None, None, None]

    clrp = relprop.Explainer(model, "clrp", variant="clrp1", style="agf")(x, t)
    close(clrp, combine(zt * onehot, (1 - onehot) / (C - 1) * zt), rtol=1e-10, atol_rel=1e-12)
    close(psum(clrp), torch.zeros(2, dtype=D), atol_rel=1e-10)
    # the target map of agf-CLRP is lrp-rap-repo alpha=1 of the logit
    close(relprop.Explainer(model, "clrp", variant="clrp1", style="agf", output="lrp")(x, t), lrp(x, t))

    p = z.softmax(1)
    pt = (p * onehot).sum(1, keepdim=True)
    sg = relprop.Explainer(model, "sglrp")(x, t)
    close(sg, combine(onehot * (p * (1 - p) + 1e-8), (1 - onehot) * pt * p), rtol=1e-10, atol_rel=1e-12)
    close(psum(sg), torch.zeros(2, dtype=D), atol_rel=1e-10)
    assert sg.abs().sum() > 0


def test_batchnorm_authors_rule_single_layer():
    """Authors' BN rule R_in = x * SD(R, x*w) * w, w = gamma / sqrt(var^2 + eps) (§1.4, §2.7):
    the identity except where x*w == 0 (zero input or zero gamma), where relevance is dropped."""
    bn = nn.BatchNorm2d(4).to(D).eval()
    gen = torch.Generator().manual_seed(50)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(4, generator=gen, dtype=D))
        bn.weight[2] = 0.0
        bn.bias.copy_(torch.randn(4, generator=gen, dtype=D))
        bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=D))
        bn.running_var.copy_(0.5 + torch.rand(4, generator=gen, dtype=D))
    x = torch.randn(2, 4, 5, 5, generator=gen, dtype=D)
    x[x.abs() < 0.3] = 0.0
    r = torch.randn(2, 4, 5, 5, generator=gen, dtype=D)
    node = next(n for n in g.capture(nn.Sequential(bn)).nodes if n.kind == g.BN)
    with torch.no_grad():
        layer = Layer(node, [x], bn(x), args=(x,), kwargs={})
        out = rules.batchnorm_authors(layer, r)[0]
    w = (bn.weight / torch.sqrt(bn.running_var ** 2 + bn.eps)).detach().reshape(1, -1, 1, 1)
    exp = x * SD(r, x * w) * w
    close(out, exp, rtol=1e-12)
    keep = (x != 0) & (w != 0)
    close(out[keep], r[keep], rtol=1e-12)
    assert (out[~keep] == 0).all() and (~keep).any()


def _fold_bn_model(golden_models, bn_model):
    """The BN-free VGG whose convs have the BatchNorms folded in (identical forward)."""
    spec = dict(VGG_SPEC)
    plain = golden_models.build(spec).to(D).eval()
    bn_feats = list(bn_model.features)
    convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    pairs = [(m, bn_feats[i + 1]) for i, m in enumerate(bn_feats) if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for dst, (conv, bn) in zip(convs, pairs):
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            dst.weight.copy_(conv.weight * s.reshape(-1, 1, 1, 1))
            dst.bias.copy_((conv.bias - bn.running_mean) * s + bn.bias)
        plain.classifier.load_state_dict(bn_model.classifier.state_dict())
    return plain


@pytest.mark.parametrize("method,params,rtol", [("lrp-rap-repo", {"alpha": 1.0}, 1e-7),
                                                ("lrp-rap-repo", {"alpha": 2.0}, 1e-7),
                                                ("rap", {}, 1e-8)])
def test_batchnorm_is_identity(golden_models, method, params, rtol):
    """BN (and ReLU) steps are identities: relevance sums before/after every BN/ReLU node are
    equal, and the BN model's map equals that of the same network with BN folded into the
    convs (positive BN scales cancel in these rules)."""
    spec = dict(VGG_SPEC, batch_norm=True)
    model = _init_weights(golden_models.build(spec).to(D), seed=40).eval()
    plain = _fold_bn_model(golden_models, model)
    x = _image(seed=41)
    with torch.no_grad():
        z = model(x)
        close(plain(x), z)
    t = z.argmax(1)
    res = relprop.Explainer(model, method, **params).attribute(x, t, layer_sums=True)
    graph = g.capture(model)
    bns = [n for n in graph.nodes if n.kind in (g.BN, g.RELU) and n.name.startswith("features")]
    assert sum(n.kind == g.BN for n in bns) == 3
    for n in bns:
        (c,) = graph.consumers[n.index]
        close(res.layer_sums[n.name], res.layer_sums[graph.nodes[c].name], rtol=1e-12, atol_rel=0)
    ref = relprop.Explainer(plain, method, **params)(x, t)
    close(res.relevance, ref, rtol=rtol, atol_rel=rtol * 1e-2)
    close(psum(res.relevance), _zt(z, t), rtol=1e-7, atol_rel=0)
