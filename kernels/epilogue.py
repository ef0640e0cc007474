"""Device helpers shared by the GEMM kernels: the safe divide, the stabiliser, the
relevance-split epilogue of ``relprop.ops.reference.split_scale`` and the per-sample statistics
of the transposed pass.  All arithmetic is fp32."""
import triton
import triton.language as tl

# Rule codes of the split-scale epilogue: the ``code`` column of relprop.ops.reference.EPILOGUES
# (tests/test_primitives.py holds them equal).  Gu's z+ is ALPHABETA without a bias.
RAP_CONV = tl.constexpr(0)
RAP_LINEAR = tl.constexpr(1)
ALPHABETA = tl.constexpr(2)
ALPHABETA_REPO = tl.constexpr(3)


@triton.jit
def safe_div(a, b):
    """``a / b`` where ``b != 0``, exactly 0 where ``b == 0`` (no division by zero is evaluated)."""
    zero = b == 0
    return tl.where(zero, 0.0, a / tl.where(zero, 1.0, b))


@triton.jit
def stabilize(z, eps):
    """Zennit's ``z + eps * sign(z)`` with ``sign(0) = +1``."""
    return z + eps * tl.where(z < 0, -1.0, 1.0)


@triton.jit
def split_scale_epilogue(z1, z2, r, alpha, beta, eps, RULE: tl.constexpr, TWO: tl.constexpr):
    """``(S1, S2)`` of ``relprop.ops.reference.split_scale`` from the products ``Z1``, ``Z2`` (bias
    already added for ALPHABETA) and the relevance ``R``; ``S2`` is meaningless unless TWO."""
    if RULE == RAP_CONV:
        s1 = safe_div(tl.maximum(r, 0.0), z1)
        s2 = safe_div(r, z1 + z2) + safe_div(tl.minimum(r, 0.0), z2)
    elif RULE == RAP_LINEAR:
        s1 = safe_div(r, z1)
        s2 = safe_div(r, z1 + z2)
    elif RULE == ALPHABETA:
        s1 = alpha * r / stabilize(z1, eps)
        s2 = s1
        if TWO:
            s2 = -beta * r / stabilize(z2, eps)
    else:
        s1 = alpha * safe_div(r, z1)
        s2 = s1
        if TWO:
            s2 = -beta * safe_div(r, z2)
    return s1, s2


@triton.jit
def scale_and_store(z1, z2, b_ptr, rn, n_mask, r_ptr, s1_ptr, s2_ptr, offs, mask, alpha, beta, eps,
                    RULE: tl.constexpr, TWO: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The forward GEMMs' epilogue: add the split bias (ALPHABETA only: ``Z1 += b+``,
    ``Z2 += b-``), load ``R`` at ``offs``, store ``S1`` (and ``S2`` if TWO) there."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        z1 += tl.maximum(bias, 0.0)[None, :]
        z2 += tl.minimum(bias, 0.0)[None, :]
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s1, s2 = split_scale_epilogue(z1, z2, r, alpha, beta, eps, RULE, TWO)
    tl.store(s1_ptr + offs, s1.to(s1_ptr.dtype.element_ty), mask=mask)
    if TWO:
        tl.store(s2_ptr + offs, s2.to(s2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def accumulate_stats(c, sample, row_mask, sum_ptr, cnt_ptr):
    """Add each row's sum of ``c`` and its count of non-zeros to ``sum[sample]`` /
    ``cnt[sample]`` (one atomic per row; masked-out columns of ``c`` must be 0)."""
    tl.atomic_add(sum_ptr + sample, tl.sum(c, axis=1), mask=row_mask)
    tl.atomic_add(cnt_ptr + sample, tl.sum((c != 0).to(tl.int32), axis=1), mask=row_mask)


@triton.jit
def operand(t, PRECISION: tl.constexpr):
    """A loaded GEMM tile as the kernel computes with it: in its own dtype, or for
    ``"upcast"`` (bf16 under Triton's CPU interpreter, whose bf16 negation and ``tl.dot``
    are wrong) as its exact fp32 copy.  W+ / V2 of a bf16 tile are exact either way and a
    product of two bf16 values is exact in fp32, so the upcast GEMM differs from the bf16
    tensor-core one only in summation order."""
    if PRECISION == "upcast":
        return t.to(tl.float32)
    return t


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation at ``tl.dot``'s input precision ``PRECISION``
    (``"upcast"`` operands are fp32 copies: full precision)."""
    if PRECISION == "upcast":
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def split_weights(w, ABS_NEG: tl.constexpr):
    """``(W+, V2)`` of a loaded weight tile, in its dtype: V2 = |W-| if ABS_NEG else W-.
    (``tl.maximum`` / ``tl.minimum`` compute bf16 in fp32; the cast back is exact.)"""
    zero = tl.zeros_like(w)
    v2 = tl.maximum(-w, zero) if ABS_NEG else tl.minimum(w, zero)
    return tl.maximum(w, zero).to(w.dtype), v2.to(w.dtype)
