"""relprop for users of other attribution libraries.  Not imported by ``import relprop``;
each adapter imports its package only when imported itself:

* :mod:`relprop.adapters.captum`: ``RelProp(model, method="rap", **params)``, a Captum
  ``GradientAttribution`` (works inside ``NoiseTunnel`` and ``captum.metrics``);
  needs ``pip install relprop[captum]``;
* :mod:`relprop.adapters.quantus`: ``explain_func(method, **params)``, an ``explain_func``
  for any Quantus metric; needs ``pip install relprop[quantus]`` only to run Quantus
  (the function itself uses NumPy and torch);
* :mod:`relprop.adapters.zennit`: ``Attributor(model, method, attr_output=None, **params)``
  with Zennit's calling convention ``output, relevance = attributor(input, attr_output)``
  (``Attributor(model, composite=EpsilonPlusFlat())`` as ``zennit.attribution.Gradient``);
  needs nothing beyond relprop (Zennit only for composite objects).

Every adapter builds on :class:`relprop.Explainer`: the model is read, never written, and
nothing derived from its parameters is kept between calls.
"""
