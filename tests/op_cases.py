"""The one table of layer cases every fused-primitive test draws from (tests/test_primitives.py
for all backends, and the backend-specific checks of tests/test_extension.py and
tests/test_triton_kernels.py): convs with stride, padding, dilation, non-square kernels and
several GEMM tiles, linears with odd sizes and extra leading dims; inputs non-negative with
exact zeros (so every safe-divide guard is hit), relevance signed with exact zeros."""
import torch
import torch.nn as nn

from relprop import ops

# name: (C, O, kernel, stride, padding, dilation, (H, W), batch, bias)
CONVS = {
    "3x3": (3, 5, 3, 1, 1, 1, (7, 9), 1, True),                      # padding, non-square input, batch 1
    "3x3-s2-p1": (5, 7, 3, 2, 1, 1, (9, 11), 3, True),
    "3x5-s2": (4, 6, (3, 5), 2, (1, 2), 1, (9, 8), 2, True),         # non-square kernel, stride 2
    "1x1": (5, 17, 1, 1, 0, 1, (4, 5), 2, False),                    # 17 channels, no bias
    "7x7-s2-p3": (3, 4, 7, 2, 3, 1, (11, 10), 2, True),
    "dil2": (3, 4, 3, (2, 1), 2, 2, (9, 10), 1, True),               # dilation 2, mixed strides
    "3x5-dil2": (4, 5, (3, 5), (2, 1), (1, 2), 2, (10, 13), 2, True),
    "b1-odd": (9, 3, 3, 1, 0, 1, (6, 5), 1, True),                   # no padding, odd sizes
    "b64": (2, 3, 3, 1, 1, 1, (3, 4), 64, True),                     # batch 64, tiny images
    "tiles": (70, 67, 3, 2, 1, 1, (5, 6), 2, True),                  # several tiles along every GEMM axis
}
# name: (leading dims, C, O, bias)
LINEARS = {
    "linear-b1": ((1,), 7, 5, True),
    "linear-odd": ((3,), 37, 19, False),
    "linear-b64": ((64,), 10, 6, True),
    "linear-tiles": ((5,), 70, 67, True),
    "linear-3d": ((4, 3), 6, 5, True),                               # (B, T, C): Linear on a sequence
}
LAYERS = [*CONVS, *LINEARS]

# (rule, alpha, beta, eps): every row of ops.EPILOGUES, alpha-beta two- and one-sided
RULES = [("rap-conv", 1.0, 0.0, 0.0), ("rap-linear", 1.0, 0.0, 0.0), ("alphabeta", 2.0, 1.0, 1e-2),
         ("alphabeta", 1.0, 0.0, 1e-6), ("alphabeta", 1.0, 0.5, 1e-3), ("alphabeta-repo", 2.0, 1.0, 0.0),
         ("alphabeta-repo", 1.0, 0.0, 0.0), ("zplus", 1.0, 0.0, 1e-6)]
RULE_IDS = [f"{r}-a{a:g}-b{b:g}-e{e:g}" for r, a, b, e in RULES]
HALF = (torch.float16, torch.bfloat16)


def sparse_input(*shape, dtype=torch.float32) -> torch.Tensor:
    """ReLU of Gaussians with zero bands: the first half of every image's rows, or of every
    sample's features and (batch > 1) the whole last sample."""
    x = torch.randn(*shape).relu()
    if x.ndim == 4:
        x[:, :, : shape[2] // 2] = 0
    else:
        x[..., : shape[-1] // 2] = 0
        if shape[0] > 1:
            x[-1] = 0
    return x.to(dtype)


def make_layer(name: str, dtype=torch.float32):
    """``(LinearMap, x, r)`` of the named case, in ``dtype`` on the default device."""
    if name in CONVS:
        c, o, k, s, p, d, hw, b, bias = CONVS[name]
        m = nn.Conv2d(c, o, k, s, p, d, bias=bias)
        x = sparse_input(b, c, *hw)
    else:
        lead, c, o, bias = LINEARS[name]
        m = nn.Linear(c, o, bias=bias)
        x = sparse_input(*lead, c)
    with torch.no_grad():
        r = torch.randn_like(m(x))
    r.view(-1)[::7] = 0
    return ops.LinearMap(m.to(dtype)), x.to(dtype), r.to(dtype)
