"""A model captured once as a graph of relevance-relevant operations (torch.fx).

:mod:`.kinds` the vocabulary (node kinds and the module/function/method tables),
:mod:`.capture` tracing and the resolve/mark passes (:mod:`.through` the library modules it
traces through, re-written), :mod:`.nodes` the data model
(:class:`Node`, :class:`Graph`) and node evaluation.  ``import relprop.graph as g`` gives
all three: ``g.CONV``, ``g.capture(model)``, ``g.evaluate(node, args, kwargs)``.
"""
from .kinds import (ATTENTION, MATMUL, OFFSET, PAD, ROLL, SOFTMAX, ACTIVATION, ADAPTIVE_AVGPOOL, ADD, AVGPOOL, BN, CAT, CONV, EXPAND, GATE, GATE_ACTIVATION,
                    GETITEM, HELPER, INDEX, INPUT, LAYERNORM, LEAKY_RELU, LINEAR, MAXPOOL, OUTPUT, PASS, PERMUTE, PIECE,
                    PRODUCT, RELU, RESHAPE, RESPONSE_NORM, RMS_NORM, SCALE, SIZE_OP, SPLIT, UPSAMPLE)
from .kinds import (ACTIVATIONS, FUNCTION_KINDS, MEANS, METHOD_KINDS, MODULE_KINDS, NAMED_MODULE_KINDS,
                    NONNEG_UPSAMPLING, SIGN_PRESERVING, function_kind, module_kind)
from .nodes import (InProjection, Graph, Node, Ref, UnsupportedModelError, derivative_jumps, evaluate, flatten, maxpool_params, mean_dims,
                    negative_slope, response_norm_scale, rms_norm_scale, substitute)
from .capture import ModelWatch, capture, hooks_not_run, unwrap

__all__ = [
    "ATTENTION", "MATMUL", "OFFSET", "PAD", "ROLL", "SOFTMAX",
    "ACTIVATION", "ADAPTIVE_AVGPOOL", "ADD", "AVGPOOL", "BN", "CAT", "CONV", "EXPAND", "GATE", "GATE_ACTIVATION",
    "GETITEM", "HELPER", "INDEX", "INPUT", "LAYERNORM", "LEAKY_RELU", "LINEAR", "MAXPOOL", "OUTPUT", "PASS", "PERMUTE", "PIECE",
    "PRODUCT", "RELU", "RESHAPE", "RESPONSE_NORM", "RMS_NORM", "SCALE", "SIZE_OP", "SPLIT", "UPSAMPLE",
    "ACTIVATIONS", "FUNCTION_KINDS", "MEANS", "METHOD_KINDS", "MODULE_KINDS", "NAMED_MODULE_KINDS", "NONNEG_UPSAMPLING",
    "SIGN_PRESERVING", "function_kind", "module_kind", "response_norm_scale", "rms_norm_scale", "InProjection", "Graph", "Node", "Ref", "UnsupportedModelError", "derivative_jumps", "evaluate", "flatten", "mean_dims",
    "maxpool_params", "negative_slope", "substitute", "capture", "ModelWatch", "hooks_not_run", "unwrap",
]
