"""Host-side pieces shared by the Triton kernels: which calls a kernel takes, output
allocation (poisonable by the tests), block sizes."""
from __future__ import annotations

import os

import torch
import triton

#: Dtypes the elementwise / per-sample kernels run; anything else (e.g. float64) goes to
#: the ``relprop.ops`` reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Dtypes the split GEMMs run (fp32 accumulation throughout).
GEMM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Read once, like ``triton.jit`` does when it decides between compiling and interpreting.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Largest grid extent along axis 1 (the batch axis of the per-sample kernels) on CUDA.
MAX_GRID_Y = 65535
#: When not None, every output a kernel must write in full is allocated filled with this
#: value (tests set NaN, so an element a kernel forgets to write cannot pass as correct).
POISON: float | None = None


def runnable(*tensors: torch.Tensor | None, dtypes=KERNEL_DTYPES) -> bool:
    """True if the kernels can take these tensors: one dtype in ``dtypes``, one
    device (CUDA, or CPU under ``TRITON_INTERPRET=1``), non-empty, int32-indexable."""
    ts = [t for t in tensors if t is not None]
    first = ts[0]
    if first.dtype not in dtypes or first.device.type not in ("cuda", "cpu"):
        return False
    if first.device.type == "cpu" and not INTERPRET:
        return False
    return all(t.dtype == first.dtype and t.device == first.device and 0 < t.numel() < 2 ** 31 for t in ts)


def new_output(shape, like: torch.Tensor) -> torch.Tensor:
    """An output buffer of ``like``'s dtype and device (filled with :data:`POISON` if set)."""
    if POISON is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.full(shape, POISON, dtype=like.dtype, device=like.device)


def per_sample_stats(batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (B,) fp32 sum and int32 count buffers the kernels accumulate into atomically."""
    return (torch.zeros(batch, dtype=torch.float32, device=device),
            torch.zeros(batch, dtype=torch.int32, device=device))


def dot_precision(x: torch.Tensor, conv: bool) -> str:
    """``tl.dot`` precision for products of ``x``'s dtype (``epilogue.dot``), following the
    reference's own: fp32 in TF32 only where torch would run that layer in TF32 (CUDA tensors
    and ``torch.backends.cudnn.allow_tf32`` for convs, ``torch.backends.cuda.matmul.allow_tf32``
    for linears), else in full precision (``ieee``); halves use the tensor cores either way,
    except bf16 under the interpreter (``upcast``: its bf16 ``tl.dot`` computes garbage)."""
    if INTERPRET and x.dtype == torch.bfloat16:
        return "upcast"
    flag = torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if x.dtype != torch.float32 or (x.is_cuda and flag) else "ieee"


def gemm_blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    """One fixed tile per problem: ``(BM, BN, BK)`` = next powers of two clamped to
    [16, 64] x [16, 64] x [16, 32] (``tl.dot`` needs every side >= 16)."""
    def fit(v, hi):
        return max(16, min(hi, triton.next_power_of_2(v)))
    return fit(m, 64), fit(n, 64), fit(k, 32)


#: Elements per program of the elementwise / per-sample reduction kernels.
ELEMENT_BLOCK = 1024
