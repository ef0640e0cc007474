"""relprop: relevance propagation (LRP, CLRP, SGLRP, RAP, RSP, AE) for PyTorch CNNs.

>>> import relprop
>>> explainer = relprop.Explainer(model, method="rap")
>>> relevance = explainer(images, target=None)    # shaped like images
"""
from .ops.dispatch import backends
from .explainer import Attribution, Explainer, HooksNotRunWarning, available_methods, explain
from .graph import UnsupportedModelError
from .targets import DenseOutputError, SegmentationTarget

__version__ = "0.1.0"
__all__ = ["Explainer", "Attribution", "HooksNotRunWarning", "explain", "available_methods", "backends",
           "UnsupportedModelError", "SegmentationTarget", "DenseOutputError"]
