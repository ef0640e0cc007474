"""Thin adapter for ../shared/golden/check.py: maps a golden case's method/params onto
relprop's public API (see ../shared/golden/README.md §8).  ``backend`` is relprop's own
extra (the checker leaves it at "auto")."""
import relprop


def _explain(model, x, target, method, backend, **params):
    return relprop.Explainer(model, method, backend=backend, **params)(x, target)


def explain(model, x, target, method, params, backend="auto"):
    p = dict(params)
    if method == "lrp":
        return _explain(model, x, target, "lrp-rap-repo", backend, alpha=p["alpha"])
    if method == "rap":
        return _explain(model, x, target, "rap", backend)
    if method == "rsp":
        return _explain(model, x, target, "rsp", backend, init_layer=p["init_layer"])
    if method == "ae":
        return _explain(model, x, target, "ae", backend, ratio=p["ratio"], init_layer=p["init_layer"])
    if method == "clrp_gu":
        return _explain(model, x, target, "clrp", backend, variant=p["variant"], style="gu",
                        output=p.get("output", "clrp"), zb_bounds=(p["zb_low"], p["zb_high"]))
    if method == "clrp_agf":
        return _explain(model, x, target, "clrp", backend, variant="clrp1", style="agf")
    if method == "sglrp_agf":
        return _explain(model, x, target, "sglrp", backend)
    raise NotImplementedError(f"no mapping for golden method {method!r}")
