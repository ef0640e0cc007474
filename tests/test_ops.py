"""Primitives of relprop.ops against brute-force references."""
import pytest
import torch
import torch.nn.functional as F

from relprop.ops import LinearMap, maxpool_ties_split


@pytest.mark.parametrize("k, s, p, d, ceil", [
    (2, 2, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True), (3, 1, 1, 2, False), ((3, 2), (2, 1), (1, 0), 1, True)])
def test_maxpool_ties_split_matches_a_loop(k, s, p, d, ceil):
    """Gu's max-pool rule: each window's relevance is shared equally by its maximal entries
    (overlapping, padded, dilated and ceil-mode windows accumulate)."""
    x = torch.randint(0, 3, (2, 3, 9, 8)).double()   # small integers: many ties
    y = F.max_pool2d(x, k, s, p, d, ceil)
    r = torch.randn_like(y)
    got = maxpool_ties_split(x, r, k, s, p, d, ceil)
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (s, s) if isinstance(s, int) else s
    ph, pw = (p, p) if isinstance(p, int) else p
    ref = torch.zeros_like(x)
    for b in range(2):
        for c in range(3):
            for i in range(y.shape[2]):
                for j in range(y.shape[3]):
                    idx = [(i * sh - ph + a * d, j * sw - pw + e * d) for a in range(kh) for e in range(kw)]
                    idx = [(u, v) for u, v in idx if 0 <= u < 9 and 0 <= v < 8]
                    top = max(x[b, c, u, v] for u, v in idx)
                    tied = [(u, v) for u, v in idx if x[b, c, u, v] == top]
                    for u, v in tied:
                        ref[b, c, u, v] += r[b, c, i, j] / len(tied)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(), r.sum())


def test_split_weights_are_cached_views():
    conv = torch.nn.Conv2d(3, 4, 3)
    lin = LinearMap(conv)
    pos, neg = lin.pos, lin.neg
    torch.testing.assert_close(torch.cat([pos, neg]), lin.split("pn"))
    assert pos.data_ptr() == lin.split("pn").data_ptr()
    torch.testing.assert_close(lin.abs_neg, (-conv.weight.detach()).clamp(min=0))
    with torch.no_grad():
        conv.weight.mul_(-1)     # a map lives for one call; the next call's map sees the update
    torch.testing.assert_close(LinearMap(conv).pos, conv.weight.detach().clamp(min=0))
    # (that an Explainer reused after in-place changes sees them: tests/test_model_changes.py)
