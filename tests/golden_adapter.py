"""Thin adapter for ../shared/golden/check.py: maps a golden case's method/params onto
relprop's public API (see ../shared/golden/README.md §8)."""
import relprop


def explain(model, x, target, method, params):
    p = dict(params)
    if method == "lrp":
        return relprop.explain(model, x, target, "lrp-rap-repo", alpha=p["alpha"])
    if method == "rap":
        return relprop.explain(model, x, target, "rap")
    if method == "rsp":
        return relprop.explain(model, x, target, "rsp", init_layer=p["init_layer"])
    if method == "ae":
        return relprop.explain(model, x, target, "ae", ratio=p["ratio"], init_layer=p["init_layer"])
    if method == "clrp_gu":
        return relprop.explain(model, x, target, "clrp", variant=p["variant"], style="gu",
                               output=p.get("output", "clrp"), zb_bounds=(p["zb_low"], p["zb_high"]))
    if method == "clrp_agf":
        return relprop.explain(model, x, target, "clrp", variant="clrp1", style="agf")
    if method == "sglrp_agf":
        return relprop.explain(model, x, target, "sglrp")
    raise NotImplementedError(f"no mapping for golden method {method!r}")
