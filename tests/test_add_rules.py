"""The residual-add rules (``add_rule=`` of every method with an Add rule; rules.add_rule).

Hand-computed splits for each option, conservation at the add, the wiring of the option in
every method's rule tables (the default is the method's own rule, bit for bit), ``rap-split``
(= ``rap`` without residual adds), and the errors."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import relprop
from relprop import graph as g
from relprop import rules
from relprop.engine import RuleTable
from relprop.methods import create
from relprop.ops import stabilize

# methods with a residual-add rule, and the transform/divide of their own ("proportional") rule
METHODS_WITH_ADD = ["rap", "rap-split", "lrp-epsilon", "lrp-zplus", "lrp-alphabeta", "lrp-gamma",
                    "lrp-epsilon-plus", "lrp-epsilon-alpha2beta1", "lrp-epsilon-plus-flat",
                    "lrp-epsilon-alpha2beta1-flat", "lrp-epsilon-gamma-box", "lrp-rap-repo", "clrp", "sglrp",
                    "rsp", "ae"]


def layer(x0, x1):
    return types.SimpleNamespace(xs=[torch.as_tensor(x0, dtype=torch.float64),
                                     torch.as_tensor(x1, dtype=torch.float64)])


X0, X1, R = [2.0, -1.0, 3.0, 0.0], [-1.0, 3.0, 0.0, 0.0], torch.tensor([1.0, 2.0, -3.0, 5.0], dtype=torch.float64)


def test_proportional_by_hand():
    # R / (x0 + x1) = [1, 1, -1, SD(5, 0) = 0]
    r0, r1 = rules.add_rule("rap", "proportional")(layer(X0, X1), R)
    assert r0.tolist() == [2.0, -1.0, -3.0, 0.0]
    assert r1.tolist() == [-1.0, 3.0, 0.0, 0.0]


def test_abs_by_hand():
    # R / (|x0| + |x1|) = [1/3, 1/2, -1, SD(5, 0) = 0]
    r0, r1 = rules.add_rule("rap", "abs")(layer(X0, X1), R)
    torch.testing.assert_close(r0, torch.tensor([2 / 3, 1 / 2, -3.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(r1, torch.tensor([1 / 3, 3 / 2, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_equal_by_hand():
    r0, r1 = rules.add_rule("rap", "equal")(layer(X0, X1), R)
    assert r0.tolist() == r1.tolist() == [0.5, 1.0, -1.5, 2.5]


def test_rsp_proportional_by_hand():
    # RSP / AE: x+ + 1e-9, so the negative input takes (almost) nothing
    r0, r1 = rules.add_rule("rsp", "proportional", lambda x: x.clamp(min=0) + 1e-9)(layer([2.0], [-1.0]), R[:1])
    torch.testing.assert_close(r0, torch.tensor([(2 + 1e-9) / (2 + 2e-9)], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(r1, torch.tensor([1e-9 / (2 + 2e-9)], dtype=torch.float64), rtol=0, atol=1e-15)


def test_abs_shares_take_the_sign_of_r_where_the_signed_split_amplifies():
    # nearly cancelling branches (x0 = 100, x1 = -99.9): the signed split gives +-1000 R, |x| gives ~R/2
    lay, r = layer([100.0], [-99.9]), torch.tensor([1.0], dtype=torch.float64)
    s0, s1 = rules.add_rule("rap", "proportional")(lay, r)
    a0, a1 = rules.add_rule("rap", "abs")(lay, r)
    assert s0.item() == pytest.approx(1000.0) and s1.item() == pytest.approx(-999.0)
    assert a0.item() == pytest.approx(100 / 199.9) and a1.item() == pytest.approx(99.9 / 199.9)


def _add_rules(method):
    """Every residual-add rule in the method's rule tables."""
    tables = [v for v in vars(method).values() if isinstance(v, RuleTable)]
    assert tables, method
    return [t.by_kind[g.ADD] for t in tables]


@pytest.mark.parametrize("name", METHODS_WITH_ADD)
@pytest.mark.parametrize("choice", ["proportional", "abs", "equal"])
def test_conservation_at_the_add(name, choice):
    """R0 + R1 = R at every entry (random inputs: no zero denominators), for every method's rule."""
    gen = torch.Generator().manual_seed(0)
    x0, x1, r = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    if name in ("rsp", "ae") and choice == "proportional":
        x0, x1 = x0.abs(), x1.abs()      # their x+ + 1e-9 rule conserves where an input is positive
    method = create(name, add_rule=choice)
    want = r
    if name.startswith("lrp-") and name != "lrp-rap-repo" and choice != "equal":
        # Zennit's stabilised denominator keeps the fraction den / stabilize(den) of R, exactly
        den = x0 + x1 if choice == "proportional" else x0.abs() + x1.abs()
        want = r * den / stabilize(den, method.stabilizer)
        assert not torch.allclose(want, r, rtol=1e-12, atol=1e-12)
    for rule in _add_rules(method):
        r0, r1 = rule(layer(x0, x1), r)
        torch.testing.assert_close(r0 + r1, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", METHODS_WITH_ADD)
def test_choices_reach_the_tables(name):
    """Each choice gives its rule (the same shares as rules.add_rule's) in every table of the method."""
    gen = torch.Generator().manual_seed(1)
    x0, x1, r = (torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    lay = layer(x0, x1)
    for choice, expected in [("abs", rules.abs_add()), ("equal", rules.equal_add)]:
        want = expected(lay, r)
        for rule in _add_rules(create(name, add_rule=choice)):
            got = rule(lay, r)
            if name.startswith("lrp-") and name != "lrp-rap-repo" and choice == "abs":
                # Zennit-style methods divide by the stabilised denominator: equal up to ~1e-6
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


DEFAULT_RULE = {"rsp": rules.proportional_add(lambda x: x.clamp(min=0) + 1e-9),
                "ae": rules.proportional_add(lambda x: x.clamp(min=0) + 1e-9)}


@pytest.mark.parametrize("name", [m for m in METHODS_WITH_ADD if m != "rap-split"])
def test_default_is_the_methods_own_rule_bit_for_bit(name):
    gen = torch.Generator().manual_seed(2)
    x0, x1, r = (torch.randn(1, 2, 3, 3, generator=gen) for _ in range(3))
    lay = types.SimpleNamespace(xs=[x0, x1])
    method = create(name)
    assert method.add_rule == "proportional"
    if name.startswith("lrp-") and name != "lrp-rap-repo":
        own = rules.proportional_add(divide=rules.eps_divide(method.stabilizer))
    else:
        own = DEFAULT_RULE.get(name, rules.proportional_add())
    want = own(lay, r)
    for rule in _add_rules(method):
        assert all(torch.equal(a, b) for a, b in zip(rule(lay, r), want))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.conv0(x))
        h = self.relu(h + self.bn1(self.conv1(h)))
        return self.fc(h.mean((2, 3)))


def tiny_resnet():
    torch.manual_seed(0)
    m = TinyResNet().eval()
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2)
    return m


@pytest.mark.parametrize("choice", ["abs", "equal"])
def test_rap_add_rule_changes_resnet_maps_only(choice):
    """On a model without residual adds the option changes nothing (rap-split == rap there);
    with one it changes the map (and keeps RAP's conservation of the logit)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    assert torch.equal(relprop.Explainer(plain, "rap", add_rule=choice)(x, 1), relprop.Explainer(plain, "rap")(x, 1))
    assert torch.equal(relprop.Explainer(plain, "rap-split")(x, 1), relprop.Explainer(plain, "rap")(x, 1))
    model = tiny_resnet().double()
    xd = x.double()
    a = relprop.Explainer(model, "rap", add_rule=choice).attribute(xd, 1, layer_sums=True)
    b = relprop.Explainer(model, "rap").attribute(xd, 1, layer_sums=True)
    assert not torch.allclose(a.relevance, b.relevance)
    add = next(n.name for n in relprop.Explainer(model, "rap").graph.nodes if n.kind == g.ADD)
    # relevance entering the add (its output's sum) leaves it whole through both inputs
    torch.testing.assert_close(a.layer_sums[add], b.layer_sums[add], rtol=1e-10, atol=1e-10)


def test_rap_split_is_rap_with_abs():
    model, x = tiny_resnet(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    split, rap_abs = relprop.Explainer(model, "rap-split"), relprop.Explainer(model, "rap", add_rule="abs")
    assert torch.equal(split(x, 0), rap_abs(x, 0))
    assert repr(create("rap-split")) == "RAPSplit(add_rule='abs')"


@pytest.mark.parametrize("name", METHODS_WITH_ADD)
@pytest.mark.parametrize("bad", ["split", "Abs", 1, None])
def test_bad_add_rule_is_refused_naming_the_method(name, bad):
    # clrp's and sglrp's tables carry their own names
    with pytest.raises(ValueError) as e:
        relprop.Explainer(tiny_resnet(), name, add_rule=bad)
    assert str(e.value) == (f"method {name!r}: add_rule must be one of 'proportional', 'abs', 'equal', "
                            f"got {bad!r}")


@pytest.mark.slow
def test_rap_split_localises_on_the_builtin_resnet():
    """The README's finding (Why RAP fails on ResNets), on 40 test images: with the signed add
    split RAP's maximum misses the object on about half the images (21 of 40 hit), with the |x|
    split it hits every one."""
    import warnings

    from relprop.benchmark import ShapesDataset, models, normalise
    from relprop.metrics import boxes_to_masks, pointing_game

    b = ShapesDataset(40, size=64, seed=0, split="test").make_batch(range(40))
    x, box = normalise(b["images"]), boxes_to_masks([bx[0] for bx in b["boxes"]], 64, 64)
    model = models.load("shapes-resnet")
    hit = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # rap's maps here are flagged ill-conditioned
        for name in ("rap", "rap-split"):
            heat = relprop.Explainer(model, name).heatmap(x, b["labels"])
            hit[name] = pointing_game(heat, box, tolerance=15 * 64 / 224).float().mean().item()
    assert hit["rap"] <= 0.6 and hit["rap-split"] == 1.0
