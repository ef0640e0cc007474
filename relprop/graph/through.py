"""Library modules that :mod:`.capture` traces *through*: each is re-written here with the
operations relprop has rules for, in inference mode (dropout off), and called on fx proxies
by ``capture._Tracer.call_module`` instead of the module's own forward, whose fx-opaque calls
(torchvision's fx-wrapped Swin functions, the fused MultiheadAttention kernel) have no rule.

* ``nn.MultiheadAttention``: in-projection (a functional linear on the module's packed
  ``in_proj_weight``: nodes.InProjection), heads, ``scaled_dot_product_attention`` with the
  call's masks merged into one additive constant mask, out-projection
  (:func:`multi_head_attention`; refusals: :func:`mha_refusal`).
* torchvision's ``transforms.Normalize`` in front of a classifier (:func:`normalize`):
  ``(x - mean) / std`` with constants made on the input's device and dtype.
* torchvision's Swin ``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2``
  (:func:`shifted_window_attention`) and ``PatchMerging`` / ``PatchMergingV2``
  (:func:`patch_merging`).

Sizes that torchvision's code branches on (whether a window is shifted) and the constant
tensors it builds from sizes (the shifted windows' mask, the merged attention masks) are
computed by the fx-wrapped functions below: the captured graph calls them at every forward,
so it works at any input size; their nodes are size helpers (:data:`SIZE_FUNCTIONS`) or
constants (computed from sizes and model tensors only: capture._constants).
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------ fx-wrapped helpers
def window_shifts(size: tuple, window: list, shift: list, sign: int) -> tuple:
    """Swin's cyclic shift (times ``sign``) of a padded ``size`` map: none along a dim that one
    window covers (torchvision's rule)."""
    return tuple(0 if w >= n else sign * s for n, w, s in zip(size, window, shift))


def shift_mask(size: tuple, window: list, shifts: tuple, like: torch.Tensor) -> torch.Tensor:
    """The additive mask ``(windows, N, N)`` of shifted windows (0 within a region, -100 across
    regions; torchvision's and Swin's code), all zeros where there is no shift."""
    (ph, pw), (wh, ww) = size, window
    windows, n = (ph // wh) * (pw // ww), wh * ww
    if not any(shifts):
        return torch.zeros((windows, n, n), dtype=like.dtype, device=like.device)
    sh, sw = (-s for s in shifts)
    mask = torch.zeros((ph, pw), dtype=like.dtype, device=like.device)
    count = 0
    for h in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w in ((0, -ww), (-ww, -sw), (-sw, None)):
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    mask = mask.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(windows, n)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def additive_mask(attn_mask, key_padding_mask, batch: int, heads: int, like: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's ``attn_mask`` ((L, S) or (B * heads, L, S)) and
    ``key_padding_mask`` ((B, S)) as one additive float mask broadcasting to (B, heads, L, S):
    a boolean mask's True entries (not allowed) are -inf, a float mask is added as given."""
    def additive(m):
        if m is None:
            return None
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf"))
        return m.to(like.dtype)

    a, p = additive(attn_mask), additive(key_padding_mask)
    if a is not None:
        a = a.view(1, 1, *a.shape) if a.dim() == 2 else a.view(batch, heads, *a.shape[-2:])
    if p is not None:
        p = p.view(batch, 1, 1, p.shape[-1])
    return p if a is None else a if p is None else a + p


def continuous_position_bias(coords: torch.Tensor, index: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                             w2: torch.Tensor, window: list, heads: int) -> torch.Tensor:
    """Swin V2's relative position bias: its MLP ``Linear(2, 512) -> ReLU -> Linear(512, heads)``
    of the log-spaced relative coordinates, gathered per window position pair, ``16 *
    sigmoid(...)`` (torchvision's ``ShiftedWindowAttentionV2.get_relative_position_bias``): a
    constant, computed from the model's tensors only."""
    from torchvision.models.swin_transformer import _get_relative_position_bias
    table = F.linear(F.relu(F.linear(coords, w1, b1)), w2).view(-1, heads)
    return 16 * torch.sigmoid(_get_relative_position_bias(table, index, window))


def unexplained_weights(output: torch.Tensor) -> None:
    """Stands for the attention weights that ``nn.MultiheadAttention(..., need_weights=True)``
    also returns: a node that is refused if anything reads it (capture._resolve_helpers);
    unread, it is a helper computing nothing."""
    return None


for _name in ("window_shifts", "shift_mask", "additive_mask", "continuous_position_bias", "unexplained_weights"):
    torch.fx.wrap(_name)

# Wrapped functions whose result is a size (never a tensor): helpers.
SIZE_FUNCTIONS = (window_shifts,)
UNEXPLAINED_WEIGHTS_WHY = ("the attention weights returned by MultiheadAttention(need_weights=True) are "
                           "not explained; use only its output [0], or need_weights=False")


# ------------------------------------------------------------------ nn.MultiheadAttention
def _mha_args(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
              average_attn_weights=True, is_causal=False):
    return query, key, value, key_padding_mask, need_weights, attn_mask, is_causal


def mha_refusal(m: nn.MultiheadAttention, *args, **kwargs) -> str:
    """Why relprop cannot trace this call of ``m`` through (empty: it can): a packed
    in-projection (one ``in_proj_weight``), no ``bias_k``/``bias_v``, no ``add_zero_attn``,
    and ``is_causal`` only with its ``attn_mask`` (as the module itself requires)."""
    query, key, value, padding_mask, need_weights, attn_mask, is_causal = _mha_args(*args, **kwargs)
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return ("only a packed in-projection (kdim = vdim = embed_dim), no bias_k/bias_v and no add_zero_attn "
                "are supported")
    if is_causal and attn_mask is None:
        return "is_causal=True needs the causal attn_mask (nn.MultiheadAttention's own requirement)"
    return ""


def multi_head_attention(m: nn.MultiheadAttention, *args, **kwargs):
    """``nn.MultiheadAttention(query, key, value, ...)`` in inference mode, written with the
    operations relprop has rules for: the packed in-projection (a functional linear on the
    module's own tensors: nodes.InProjection), the heads, the fused attention with the merged
    additive mask (:func:`additive_mask`; ``is_causal`` is the module's hint that ``attn_mask``
    is causal, so the mask is used), the out-projection.  Self-attention (query is key is
    value) projects once; otherwise each input is projected by the whole packed map and its
    rows (q, k or v) are taken, so relevance reaches each input through its own rows only
    (under CP-LRP the query and key receive none: README, Conventions).  Returns
    ``(output, weights)`` like the module, ``weights`` a node refused if read
    (:func:`unexplained_weights`) or None with ``need_weights=False``."""
    query, key, value, padding_mask, need_weights, attn_mask, _ = _mha_args(*args, **kwargs)
    e, h = m.embed_dim, m.num_heads
    inputs = [query, key, value]
    if not m.batch_first:   # (L, B, E): one transpose per distinct input
        seen: dict[int, object] = {}
        for t in inputs:
            if id(t) not in seen:
                seen[id(t)] = t.transpose(0, 1)
        inputs = [seen[id(t)] for t in inputs]
    query, key, value = inputs

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)

    if query is key is value:
        b, n = query.shape[0], query.shape[1]
        qkv = F.linear(query, m.in_proj_weight, m.in_proj_bias).reshape(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        projected: dict[int, object] = {}

        def rows(t, i):
            if id(t) not in projected:
                projected[id(t)] = F.linear(t, m.in_proj_weight, m.in_proj_bias)
            return heads(projected[id(t)][..., i * e:(i + 1) * e])

        q, k, v = rows(query, 0), rows(key, 1), rows(value, 2)
    mask = None
    if attn_mask is not None or padding_mask is not None:
        mask = additive_mask(attn_mask, padding_mask, query.shape[0], h, m.in_proj_weight)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = m.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], e))
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, (unexplained_weights(out) if need_weights else None)


# ------------------------------------------------------------------ torchvision's Swin
def shifted_window_attention(m: nn.Module, x):
    """torchvision's ``shifted_window_attention`` in inference mode, for Swin V1
    (``ShiftedWindowAttention``) and V2 (``ShiftedWindowAttentionV2``): zero padding to whole
    windows, the cyclic shift (``torch.roll``, by :func:`window_shifts`), window partition, the
    logits, softmax, ``@ v``, the projection, the reverse partition and shift, and the crop of
    the padding.  The logits are, V1: ``q * scale @ k^T`` plus the relative position bias
    (torchvision's fx-wrapped ``_get_relative_position_bias`` of the model's table: a constant);
    V2 (cosine attention): ``normalize(q) @ normalize(k)^T`` times the clamped, exponentiated
    logit scale (a constant) plus 16 sigmoid of the position bias MLP
    (:func:`continuous_position_bias`, a constant), with the key bias, which V2 zeroes in its
    forward, subtracted from the keys (an offset by a constant); then, both, plus the shifted
    windows' mask (:func:`shift_mask`, all zeros without shift: adding it is exact)."""
    b, hh, ww, c = x.shape
    (wh, wwin), heads, dim = m.window_size, m.num_heads, m.proj.in_features
    v2 = hasattr(m, "logit_scale")
    x = F.pad(x, (0, 0, 0, (wwin - ww % wwin) % wwin, 0, (wh - hh % wh) % wh))
    ph, pw = x.shape[1], x.shape[2]
    x = torch.roll(x, shifts=window_shifts((ph, pw), m.window_size, m.shift_size, -1), dims=(1, 2))
    windows, n = (ph // wh) * (pw // wwin), wh * wwin
    x = x.view(b, ph // wh, wh, pw // wwin, wwin, dim).permute(0, 1, 3, 2, 4, 5).reshape(b * windows, n, dim)
    q, k, v = m.qkv(x).reshape(b * windows, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if v2:
        if m.qkv.bias is not None:
            k = k + (-m.qkv.bias[dim:2 * dim]).view(heads, 1, dim // heads)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(m.logit_scale, max=math.log(100.0)).exp()
        bias = continuous_position_bias(m.relative_coords_table, m.relative_position_index, m.cpb_mlp[0].weight,
                                        m.cpb_mlp[0].bias, m.cpb_mlp[2].weight, m.window_size, heads)
    else:
        attn = (q * (dim // heads) ** -0.5).matmul(k.transpose(-2, -1))
        bias = m.get_relative_position_bias()
    attn = attn + bias
    mask = shift_mask((ph, pw), m.window_size, window_shifts((ph, pw), m.window_size, m.shift_size, -1), bias)
    attn = (attn.view(-1, windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
    x = F.softmax(attn, dim=-1).matmul(v).transpose(1, 2).reshape(b * windows, n, dim)
    x = m.proj(x)
    x = x.view(b, ph // wh, pw // wwin, wh, wwin, dim).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, dim)
    x = torch.roll(x, shifts=window_shifts((ph, pw), m.window_size, m.shift_size, 1), dims=(1, 2))
    return x[:, :hh, :ww, :].contiguous()


def patch_merging(m: nn.Module, x):
    """torchvision's ``PatchMerging`` (norm, then reduction) and ``PatchMergingV2`` (reduction,
    then norm): ``_patch_merging_pad`` written out as zero padding to even sizes, four strided
    slices and their concatenation."""
    hh, ww = x.shape[-3], x.shape[-2]
    x = F.pad(x, (0, 0, 0, ww % 2, 0, hh % 2))
    x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
    return m.norm(m.reduction(x)) if type(m).__name__ == "PatchMergingV2" else m.reduction(m.norm(x))


_SWIN = "torchvision.models.swin_transformer"
# Modules traced through by their re-writing, known by module path and class name.
def normalize(m: nn.Module, x):
    """torchvision's ``transforms.Normalize``: ``(x - mean) / std`` over the channels (dim -3),
    an offset and a scale by constants (``x.new_tensor``: on the input's device and dtype)
    instead of its functional form, whose type checks fail on a proxy.  Its ``inplace``
    changes nothing here: relprop's forward computes out of place."""
    def values(v):
        return v.tolist() if torch.is_tensor(v) else [float(e) for e in v]
    return (x - x.new_tensor(values(m.mean)).view(-1, 1, 1)) / x.new_tensor(values(m.std)).view(-1, 1, 1)


REWRITES = {("torchvision.transforms.transforms", "Normalize"): normalize,
            (_SWIN, "ShiftedWindowAttention"): shifted_window_attention,
            (_SWIN, "ShiftedWindowAttentionV2"): shifted_window_attention, (_SWIN, "PatchMerging"): patch_merging,
            (_SWIN, "PatchMergingV2"): patch_merging}
# Opaque (fx-wrapped) library functions left in the graph, and why they have no rule.
OPAQUE_WHY = {(_SWIN, "shifted_window_attention"): (
    "torchvision's shifted_window_attention is traced through only as called by ShiftedWindowAttention and "
    "ShiftedWindowAttentionV2 (relprop.graph.through)")}


def rewrite(m: nn.Module):
    """The re-writing of module ``m``'s forward, or None."""
    return REWRITES.get((type(m).__module__, type(m).__name__))


def opaque_why(fn) -> str:
    return OPAQUE_WHY.get((getattr(fn, "__module__", None), getattr(fn, "__name__", None)), "")
