"""The vocabulary of a captured graph: node kinds and the tables that give each module,
function and tensor method its kind.

Adding an operation is one line in a table here, a branch in :mod:`.capture` if its kind
depends on its settings, and, if it is not evaluated by calling it, one in
:func:`.nodes.evaluate`.  A kind is what the rules are defined on (methods.md §1): two
operations of one kind take the same relevance rule.
"""
from __future__ import annotations

import operator

import torch
import torch.fx._symbolic_trace
import torch.nn as nn
import torch.nn.functional as F

# Relevance kinds.  "relu", "leaky_relu", "activation" and "pass" nodes hand relevance
# through unchanged (elementwise identities for relevance: ReLU, Dropout, Identity, BatchNorm
# in every published method; the other activations by the same rule, as Zennit does).
# "relu" outputs are >= 0 (ReLU, ReLU6), "leaky_relu" keeps the sign, "activation" (SiLU,
# Hardswish, GELU) need not, and "pass" is the identity in the forward pass too.  A "gate"
# multiplies a signal by a "gate_activation" (Sigmoid, Hardsigmoid: squeeze-excitation),
# possibly reshaped or expanded on the way; the signal takes all the relevance.  A "scale"
# multiplies or divides by a constant number, or by a parameter or buffer of the model (a
# ConvNeXt layer scale), which relevance passes unchanged; ``F.normalize`` (Swin V2's cosine
# attention) divides by its norm, held fixed as LayerNorm's statistics are: a scale too.
# A "layernorm" normalises over its last dims (channels-last nn.LayerNorm, torchvision's
# LayerNorm2d): with its statistics held fixed it is an elementwise affine map, whose z-rule it
# takes (rules.layernorm).
# An "rms_norm" (nn.RMSNorm, timm's RmsNorm, RmsNorm2d and their Fp32 variants; timm's
# SimpleNorm* divide by the standard deviation without centring) divides by a statistic over
# its normalised dims: with that held fixed, ``y = a * x`` without an offset, whose z-rule it
# takes (rules.rms_norm; relevance passes unchanged wherever y != 0).
# A "response_norm" is ConvNeXt V2's GlobalResponseNorm ``x + b + w * x * n(x)``: with the
# response ``n(x)`` held fixed, an elementwise affine map too (rules.response_norm).
# Attention (ViT, DeiT, Swin): a "softmax" over the last dim whose output only weights values,
# the "matmul"s of attention (``q @ k^T`` feeding a softmax, possibly through a scale, additive
# constants and reshapes, and ``softmax(...) @ v``) and the fused "attention"
# ``F.scaled_dot_product_attention(q, k, v)``, possibly with a constant mask or causal
# (torchvision's MultiheadAttention and Swin attention are traced through as written out in
# .through).  Their rules are chosen by a method's ``attention_rule`` (rules.attention_layers).
# An "offset" adds a constant (capture._constants: a ViT's position embedding, a Swin's relative
# position bias and shift mask) to a signal: a bias, whose share relevance drops.
# A "roll" (``torch.roll``: Swin's cyclic shift) permutes entries, and relevance goes back where
# it was read; a "pad" (``F.pad``, constant mode: Swin's padding to whole windows, its patch
# merging) adds constant entries whose relevance is dropped like a bias's share (rules.pad).
CONV, LINEAR, LAYERNORM, RMS_NORM, RESPONSE_NORM = "conv", "linear", "layernorm", "rms_norm", "response_norm"
SOFTMAX, MATMUL, ATTENTION, OFFSET = "softmax", "matmul", "attention", "offset"
RELU, LEAKY_RELU, ACTIVATION, BN, PASS = "relu", "leaky_relu", "activation", "bn", "pass"
GATE, GATE_ACTIVATION, EXPAND, SCALE = "gate", "gate_activation", "expand", "scale"
PRODUCT = "product"   # at capture only: a product or quotient, resolved to a gate or a scale (or refused)
MAXPOOL, AVGPOOL, ADAPTIVE_AVGPOOL, UPSAMPLE = "maxpool", "avgpool", "adaptive_avgpool", "upsample"
RESHAPE, ADD, CAT, ROLL, PAD = "reshape", "add", "cat", "roll", "pad"
INDEX, SPLIT, PIECE, PERMUTE = "index", "split", "piece", "permute"   # x[...], split/chunk, its pieces, transpose
GETITEM = "getitem"   # at capture only: resolved to an index, a piece of a split, or a helper
INPUT, OUTPUT, HELPER = "input", "output", "helper"
SIZE_OP = "size_op"   # a comparison, assertion or integer arithmetic: fine on sizes (a helper), not on tensors
SUBTRACT = "subtract"   # at capture only: x - c resolved to an offset (or refused)

MODULE_KINDS = {
    nn.Conv2d: CONV, nn.Linear: LINEAR, nn.BatchNorm2d: BN, nn.LayerNorm: LAYERNORM, nn.RMSNorm: RMS_NORM,
    nn.ReLU: RELU, nn.ReLU6: RELU, nn.LeakyReLU: LEAKY_RELU, nn.SiLU: ACTIVATION, nn.Hardswish: ACTIVATION,
    nn.GELU: ACTIVATION, nn.Sigmoid: GATE_ACTIVATION, nn.Hardsigmoid: GATE_ACTIVATION,
    nn.Dropout: PASS, nn.Identity: PASS, nn.MaxPool2d: MAXPOOL, nn.AvgPool2d: AVGPOOL,
    nn.AdaptiveAvgPool2d: ADAPTIVE_AVGPOOL, nn.Flatten: RESHAPE, nn.Upsample: UPSAMPLE,
    nn.UpsamplingNearest2d: UPSAMPLE, nn.UpsamplingBilinear2d: UPSAMPLE,
    nn.modules.linear.NonDynamicallyQuantizableLinear: LINEAR,   # MultiheadAttention's out_proj
    nn.Softmax: SOFTMAX,
}
FUNCTION_KINDS = {
    F.relu: RELU, torch.relu: RELU, torch.relu_: RELU, F.relu6: RELU, F.leaky_relu: LEAKY_RELU,
    F.leaky_relu_: LEAKY_RELU, F.silu: ACTIVATION, F.hardswish: ACTIVATION, F.gelu: ACTIVATION,
    torch.sigmoid: GATE_ACTIVATION, F.hardsigmoid: GATE_ACTIVATION, operator.mul: PRODUCT, torch.mul: PRODUCT,
    operator.truediv: PRODUCT, torch.div: PRODUCT,
    F.dropout: PASS, F.max_pool2d: MAXPOOL, torch.max_pool2d: MAXPOOL, F.avg_pool2d: AVGPOOL,
    torch._C._nn.avg_pool2d: AVGPOOL, F.adaptive_avg_pool2d: ADAPTIVE_AVGPOOL, torch.mean: ADAPTIVE_AVGPOOL,
    F.interpolate: UPSAMPLE,
    torch.flatten: RESHAPE, torch.reshape: RESHAPE, operator.add: ADD, operator.iadd: ADD,
    torch.add: ADD, torch.sub: SUBTRACT, torch.cat: CAT, torch.concat: CAT, getattr: HELPER,
    operator.getitem: GETITEM,
    torch.split: SPLIT, torch.chunk: SPLIT, torch.transpose: PERMUTE, torch.permute: PERMUTE, torch._assert: SIZE_OP,
    operator.eq: SIZE_OP, operator.ne: SIZE_OP, operator.lt: SIZE_OP, operator.le: SIZE_OP, operator.gt: SIZE_OP,
    operator.ge: SIZE_OP, operator.floordiv: SIZE_OP, operator.sub: SIZE_OP, operator.mod: SIZE_OP,
    F.batch_norm: BN, torch.batch_norm: BN, F.linear: LINEAR, F.layer_norm: LAYERNORM,
    operator.matmul: MATMUL, torch.matmul: MATMUL, torch.bmm: MATMUL, F.softmax: SOFTMAX, torch.softmax: SOFTMAX,
    F.scaled_dot_product_attention: ATTENTION, torch.unbind: SPLIT, torch.fx._symbolic_trace._assert_is_none: SIZE_OP,
    torch.roll: ROLL, F.pad: PAD, torch._C._nn.pad: PAD, F.normalize: SCALE,
}
METHOD_KINDS = {
    "relu": RELU, "relu_": RELU, "sigmoid": GATE_ACTIVATION, "mul": PRODUCT, "div": PRODUCT, "expand": EXPAND, "expand_as": EXPAND,
    "mean": ADAPTIVE_AVGPOOL, "view": RESHAPE, "reshape": RESHAPE, "flatten": RESHAPE, "contiguous": PASS,
    "split": SPLIT, "chunk": SPLIT, "transpose": PERMUTE, "permute": PERMUTE,
    "add": ADD, "add_": ADD, "sub": SUBTRACT, "size": HELPER, "dim": HELPER, "matmul": MATMUL, "bmm": MATMUL,
    "softmax": SOFTMAX,
    "unbind": SPLIT, "roll": ROLL, "unsqueeze": RESHAPE, "squeeze": RESHAPE,
}
# Calls that read only the shape, dtype and device of their first argument, never its values
# (``x.new_ones(n, n)``, ``torch.zeros_like(x)``): what they compute from sizes is a constant.
METADATA_READERS = {"new_ones", "new_zeros", "new_full", "new_empty", "new_tensor", torch.zeros_like,
                    torch.ones_like, torch.full_like, torch.empty_like}
# Kinds whose output is >= 0 whenever all their tensor inputs are.
SIGN_PRESERVING = {LEAKY_RELU, PASS, MAXPOOL, AVGPOOL, ADAPTIVE_AVGPOOL, UPSAMPLE, RESHAPE, ADD, CAT, INDEX, SPLIT, PIECE,
                    PERMUTE, ROLL}
# The elementwise activations, as out-of-place functions of the input.
ACTIVATIONS = {
    nn.ReLU: F.relu, F.relu: F.relu, torch.relu: F.relu, torch.relu_: F.relu, "relu": F.relu, "relu_": F.relu,
    nn.ReLU6: F.relu6, F.relu6: F.relu6, nn.SiLU: F.silu, F.silu: F.silu, nn.Hardswish: F.hardswish,
    F.hardswish: F.hardswish, nn.Sigmoid: torch.sigmoid, torch.sigmoid: torch.sigmoid, "sigmoid": torch.sigmoid,
    nn.Hardsigmoid: F.hardsigmoid, F.hardsigmoid: F.hardsigmoid,
}


# Modules of optional libraries, known by module path and class name (never imported here);
# they are captured whole (fx leaves) and evaluated by nodes.evaluate.
NAMED_MODULE_KINDS = {("timm.layers.grn", "GlobalResponseNorm"): RESPONSE_NORM,
                      **{("timm.layers.norm", name): RMS_NORM
                         for name in ("RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm",
                                      "SimpleNorm2d", "SimpleNormFp32", "SimpleNorm2dFp32")}}


def module_kind(m) -> str | None:
    """Kind of a module: by its class, or by name for :data:`NAMED_MODULE_KINDS`."""
    kind = MODULE_KINDS.get(type(m))
    return kind if kind is not None else NAMED_MODULE_KINDS.get((type(m).__module__, type(m).__name__))


def function_kind(fn) -> str | None:
    """Kind of a called function; torchvision's stochastic depth is off at inference, like dropout."""
    if getattr(fn, "__module__", None) == "torchvision.ops.stochastic_depth":
        return PASS
    return FUNCTION_KINDS.get(fn)


# ``x.mean(dims)`` / ``torch.mean``: an average pool when it averages over feature dims only.
MEANS = ("mean", torch.mean)
# Upsampling modes whose interpolation weights are >= 0 (a map like an average).
NONNEG_UPSAMPLING = ("nearest", "nearest-exact", "bilinear", "linear", "area")
