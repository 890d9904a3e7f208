"""kv2 dequantize with one dispatcher over the torch reference and the Triton kernel.

backend = "auto"      Triton on CUDA tensors (when triton imports), the torch reference elsewhere
          "torch"     `vidtrain.formats.kv2.dequantize` (any device; the oracle)
          "triton"    the compiled kernel (CUDA tensors)
          "interpret" the same kernel under the Triton interpreter (CPU tensors; tests)

Quantization stays in torch (its k-means is a handful of matmuls); the dequantize runs on every
pass over the history, so it is the kernel. tests/test_kv2.py checks the interpreter against
the reference bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vidtrain.formats import kv2 as ref
from vidtrain.formats.kv2 import KV2Tensor
from vidtrain.kernels.nvfp4 import resolve_backend

BLOCK_R = 16  # rows (tokens) per program


def dequantize(q: KV2Tensor, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """x_hat of a kv2 block [..., L, D] in `dtype` (see `vidtrain.formats.kv2.dequantize`)."""
    be = resolve_backend(backend, q.codes.device)
    if be == "torch":
        return ref.dequantize(q, dtype)
    from vidtrain.kernels.kv2_triton import get_kernels  # lazy: triton is optional

    *lead, tokens, d = q.shape
    n = math.prod(lead)
    stages, groups = q.codes.shape[-3], q.centroids.shape[-2]
    out = torch.empty((*lead, tokens, d), dtype=dtype, device=q.codes.device)
    n_rows = n * tokens
    if n_rows:
        args = (
            q.codes.contiguous(), q.sigma.contiguous(), q.scale.float().contiguous(), q.index.contiguous(),
            q.centroids.contiguous().view(torch.int16), out.view(torch.int16) if dtype == torch.bfloat16 else out,
            n_rows, tokens, d, groups, min(ref.SCALE_BLOCK, d),
        )  # fmt: skip
        kernel = get_kernels(be == "interpret").dequantize
        grid = (max(1, math.ceil(n_rows / BLOCK_R)),)
        meta = dict(STAGES=stages, OUT_BF16=dtype == torch.bfloat16, BLOCK_R=BLOCK_R,
                    BLOCK_D=max(16, 1 << (d - 1).bit_length()))  # fmt: skip
        if be == "interpret":
            with np.errstate(all="ignore"):
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)
    return out
