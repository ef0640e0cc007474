"""Grad-CAM: the channel maps that are the initial relevance of RSP and AE (methods.md
§3.1, §4.1), and the ``gradcam`` baseline method (Selvaraju et al., ICCV 2017) built from
the same maps on the same captured graph.

``cam = A * mean_hw(d<logits, seed>/dA)`` per channel, not summed, not clipped, where
``A`` is the output of the chosen layer.  The default layer is the output of the last
convolutional block: the last node every path from input to output goes through that
is not a pooling, dropout, reshape, permute or LayerNorm, before the network flattens its
features (VGG: ``features.29``, ResNet: the output of ``layer4``, DenseNet: the final ReLU,
Inception: ``Mixed_7c``, AlexNet: ``features.11``, ConvNeXt: the output of ``features``).
In a transformer (a graph with attention) the last (B, C, H, W) feature map is the patch
embedding's: the default layer is the last conv before the first attention, the patch grid
(ViT: ``conv_proj``, timm: ``patch_embed.proj``); RSP and AE have no rule for the Linear
layers and attention after it, so they start there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import graph as g
from ..engine import Context
from . import Method, layer_name, register

# ... nor a LayerNorm or permute (ConvNeXt's classifier normalises the pooled features channels-last).
_NOT_A_BLOCK_OUTPUT = (g.MAXPOOL, g.AVGPOOL, g.ADAPTIVE_AVGPOOL, g.PASS, g.RESHAPE, g.INPUT, g.LAYERNORM, g.RMS_NORM,
                       g.PERMUTE)


_ATTENTION_KINDS = (g.ATTENTION, g.MATMUL, g.SOFTMAX)


def default_layer(graph: g.Graph) -> g.Node:
    """The output node of the last convolutional block (see module docstring)."""
    attention = next((n for n in graph.nodes if n.kind in _ATTENTION_KINDS), None)
    if attention is not None:
        convs = [n for n in graph.nodes[:attention.index] if n.kind == g.CONV]
        if not convs:
            raise ValueError("could not find a (B, C, H, W) feature map before the attention layers to start "
                             "from; pass init_layer=")
        return convs[-1]
    reach = -1
    best = None
    # Dense outputs (segmentation): the search ends at the classifier conv(s) feeding the
    # upsampled output (_dense_classifier), so FCN and DeepLabV3 start at the ReLU before
    # their 1x1 classifier (classifier.2 / classifier.3), LR-ASPP at the last backbone block
    # feeding both its classifiers; an auxiliary head's reads do not count (_reaches_output).
    live = _reaches_output(graph)
    for n in graph.nodes:
        if _dense_classifier(graph, n):
            break
        if (n.kind in (g.LINEAR, g.OUTPUT) or _flattens(n)) and reach <= n.index:
            break
        if reach <= n.index and n.kind not in _NOT_A_BLOCK_OUTPUT and n.kind != g.HELPER:
            best = n
        reach = max([reach] + [c for c in graph.consumers[n.index] if live[c]])
    if best is None:
        raise ValueError("could not find a convolutional block output to start from; pass init_layer=")
    return best


def _reaches_output(graph: g.Graph) -> list[bool]:
    """Per node: its value is read on some path to the explained output."""
    live = [False] * len(graph.nodes)
    live[graph.output.index] = True
    for n in reversed(graph.nodes):
        live[n.index] = live[n.index] or any(live[c] for c in graph.consumers[n.index])
    return live


# What may lie between a dense classifier conv and the output: linear maps that only move,
# add or resample its class maps.
_DENSE_HEAD_PATH = (g.UPSAMPLE, g.ADD, g.PASS, g.RESHAPE)


def _dense_classifier(graph: g.Graph, n: g.Node) -> bool:
    """``n`` is a conv whose output reaches the model output only through upsampling, adds,
    reshapes and no-ops, with an upsampling on the way: a segmentation model's classifier."""
    def to_output(i: int, upsampled: bool) -> bool:
        m = graph.nodes[i]
        if m.kind == g.OUTPUT:
            return upsampled
        consumers = graph.consumers[i]
        return (m.kind in _DENSE_HEAD_PATH and bool(consumers)
                and all(to_output(c, upsampled or m.kind == g.UPSAMPLE) for c in consumers))
    consumers = graph.consumers[n.index]
    return n.kind == g.CONV and bool(consumers) and all(to_output(c, False) for c in consumers)


def _flattens(n: g.Node) -> bool:
    """A reshape to at most 2 dims (flatten, ``view(B, -1)``), not a channel shuffle's 5-d view."""
    if n.kind != g.RESHAPE:
        return False
    if n.module is not None or n.target in (torch.flatten, "flatten"):
        return True
    sizes = n.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return len(sizes) <= 2


def resolve_layer(graph: g.Graph, init_layer: str | None) -> g.Node:
    return default_layer(graph) if init_layer is None else graph.node(init_layer)


def channel_cam(ctx: Context, node: g.Node) -> torch.Tensor:
    """Grad-CAM channel map at ``node`` for the context's seed (one-hot target by default)."""
    a = ctx.values[node.index]
    if a.ndim != 4:
        raise ValueError(f"the initial layer {node.name!r} must output a (B, C, H, W) feature map, "
                         f"got shape {tuple(a.shape)}")
    grad = ctx.grad(node, ctx.seed, channel_means=True)
    return a.detach() * grad.mean(dim=(2, 3), keepdim=True)


@register
class GradCAM(Method):
    """Grad-CAM baseline: ``ReLU(sum_c cam_c)`` at ``init_layer`` (default: the last
    convolutional block, as RSP and AE), bilinearly upsampled to the input size
    (``align_corners=False``, as TorchRay's ``resize_saliency``) and spread equally over the
    input channels, so that the heat map (channel sum) is the Grad-CAM map.  It explains
    the seed ``<logits, seed>`` (the one-hot target or the caller's ``initial_relevance``);
    the map is a localisation, not a decomposition of the score."""

    name = "gradcam"
    summary = "Grad-CAM baseline: ReLU of the gradient-weighted channel sum, upsampled (Selvaraju et al. 2017)"
    walks = False   # reads only the start layer's value and its gradient

    def __init__(self, init_layer: str | None = None):
        self.init_layer = layer_name(self.name, init_layer)

    def grad_node(self, graph: g.Graph) -> g.Node:
        return resolve_layer(graph, self.init_layer)

    def run(self, ctx: Context) -> torch.Tensor:
        cam = channel_cam(ctx, resolve_layer(ctx.graph, self.init_layer))
        ctx.detach()
        heat = cam.sum(dim=1, keepdim=True).clamp(min=0)
        x = ctx.x
        if x.ndim != 4:
            raise ValueError(f"gradcam needs (B, C, H, W) inputs, got shape {tuple(x.shape)}")
        heat = F.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return (heat / x.shape[1]).expand_as(x).contiguous()
