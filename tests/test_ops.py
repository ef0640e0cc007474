"""Primitives of relprop.ops against brute-force references."""
import pytest
import torch
import torch.nn.functional as F

from relprop.ops import (LinearMap, entries_near, masked_square_sums, maxpool_ties_split, mean_square_per_channel, near_zero_counts,
                         near_zero_entries)


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


@pytest.mark.parametrize("chunks", [1, 2, 8, 64])
def test_per_channel_counts_and_squares_match_their_masks(chunks):
    """Per sample and channel, over any number of channel slices: near_zero_counts counts what
    near_zero_entries marks; masked_square_sums sums g**2 over a mask and counts it;
    mean_square_per_channel is the mean of the squares.  A (B, F) tensor's channels are its
    features."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, 4, generator=gen, dtype=torch.float64)
    z[0, 1, 0, :3] = torch.tensor([1e-9, -1e-9, 0.0])   # an exact 0 is not near 0 (a structural zero)
    z[2, 4] = 0.0                        # a zero channel has no entry near 0
    want = near_zero_entries(z, 1e-6)
    assert want[0, 1].sum() == 2 and not want[0, 1, 0, 2] and want[2, 4].sum() == 0
    assert torch.equal(near_zero_counts(z, 1e-6, chunks), want.flatten(2).sum(2).float())
    g = torch.randn(3, 5, 4, 4, generator=gen, dtype=torch.float64)
    mask = g > 0.5
    sq, counts = masked_square_sums(g, lambda c0, c1: mask[:, c0:c1], chunks)
    assert torch.allclose(sq, (g.square() * mask).flatten(2).sum(2))
    assert torch.equal(counts, mask.flatten(2).sum(2).double())
    assert torch.allclose(mean_square_per_channel(g), g.square().flatten(2).mean(2))
    flat = torch.tensor([[1.0, 1e-8, -2e-7], [0.0, 0.0, 0.0]])
    assert near_zero_counts(flat, 1e-7, chunks).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.equal(mean_square_per_channel(flat), flat.square())
    half = torch.full((1, 2, 300, 300), 300.0, dtype=torch.float16)   # squares overflow float16
    assert torch.allclose(mean_square_per_channel(half), torch.full((1, 2), 9e4), rtol=1e-3)   # float32 sums


def test_near_zero_entries_are_relative_to_their_channel():
    """0 < |z| < tol * (largest |z| of the entry's channel in its sample); a zero channel has
    none, and an exact 0 (a structural zero, 0 in every precision) is not near 0."""
    z = torch.tensor([[[[1e-9, 1.0]], [[1e-9, 1e-8]], [[0.0, 0.0]]],
                      [[[2.0, -1e-7]], [[0.0, 5.0]], [[-3.0, 1e-6]]]])
    got = near_zero_entries(z, 1e-7)
    want = torch.tensor([[[[True, False]], [[False, False]], [[False, False]]],
                         [[[False, True]], [[False, False]], [[False, False]]]])
    assert torch.equal(got, want)
    flat = torch.tensor([[1.0, 1e-8, -2e-7], [0.0, 0.0, 0.0]])
    assert near_zero_entries(flat, 1e-7).tolist() == [[False, True, False], [False, False, False]]


def test_entries_near_a_point():
    """Strictly within the bound of the point; an exact 0 is excluded only at the point 0."""
    z = torch.tensor([[6.0, 6.0 + 1e-7, 6.0 - 2e-6, 0.0, 1e-8, -3.0]])
    b = torch.tensor([[1e-6]])
    assert entries_near(z, b, 6.0).tolist() == [[True, True, False, False, False, False]]
    assert entries_near(z, b, 0.0).tolist() == [[False, False, False, False, True, False]]
    assert entries_near(z, b, -3.0).tolist() == [[False, False, False, False, False, True]]
