"""Triton kv2 dequantize: centroid + 2-bit residual stages, one launch for many blocks.

The arithmetic of `vidtrain.formats.kv2.dequantize`, in its order, in fp32: out = c_hat[idx]
(bf16 bits widened by hand), then per stage out = out + level[code] * (e4m3(sigma) * scale).
Under the interpreter it equals the torch reference bit for bit; compiled, the multiply-add may
fuse into one FMA (a last-bit difference, the GPU test's tolerance).

Layout: rows = (block n, token l) of the [N, L, D] output; a program handles BLOCK_R rows and
the whole head dim (BLOCK_D = D rounded up to a power of two, masked). Stage i of row (n, l)
reads codes[n, i, l, :] (D/4 bytes) and sigma[n, i, l, :] (D/S E4M3 bytes) and scale[n, i].
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import triton
import triton.language as tl

from vidtrain.kernels.nvfp4_triton import _bf16_bits, _e4m3_decode


def _dequantize_kernel(
    codes_ptr,
    sigma_ptr,
    scale_ptr,
    index_ptr,
    cent_ptr,
    out_ptr,
    n_rows,
    L,
    D,
    G,
    S,
    STAGES: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] = n * L + l
    rmask = rows < n_rows
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    m2 = rmask[:, None] & dmask[None, :]
    n = rows // L
    l = rows % L  # noqa: E741
    idx = tl.load(index_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cbase = (n.to(tl.int64) * G + idx) * D  # [R]
    cbits = tl.load(cent_ptr + cbase[:, None] + d[None, :], mask=m2, other=0).to(tl.int32)
    out = ((cbits & 0xFFFF) << 16).to(tl.float32, bitcast=True)  # bf16 -> fp32, exact
    for i in tl.static_range(STAGES):
        srow = (n.to(tl.int64) * STAGES + i) * L + l  # row of stage i
        packed = tl.load(codes_ptr + srow[:, None] * (D // 4) + (d // 4)[None, :], mask=m2, other=0)
        code = (packed.to(tl.int32) >> (2 * (d % 4))[None, :]) & 3
        level = tl.where(
            code == 0, -1.5104, tl.where(code == 1, -0.4528, tl.where(code == 2, 0.4528, 1.5104))
        )
        sbyte = tl.load(sigma_ptr + srow[:, None] * (D // S) + (d // S)[None, :], mask=m2, other=0)
        scale = tl.load(scale_ptr + n.to(tl.int64) * STAGES + i, mask=rmask, other=0.0)
        sig = _e4m3_decode(sbyte.to(tl.int32)) * scale[:, None]
        out = out + level * sig
    obase = rows.to(tl.int64)[:, None] * D + d[None, :]
    if OUT_BF16:  # out_ptr is an int16 view: RNE to bf16 by hand (the interpreter truncates)
        tl.store(out_ptr + obase, _bf16_bits(out), mask=m2)
    else:
        tl.store(out_ptr + obase, out.to(out_ptr.dtype.element_ty), mask=m2)


@functools.cache
def get_kernels(interpret: bool) -> SimpleNamespace:
    """The jitted kernel for one mode (compiled, or the Triton interpreter on CPU tensors)."""
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        jit = triton.jit
        helpers = {f.__name__: jit(f) for f in (_e4m3_decode, _bf16_bits)}
        f = _dequantize_kernel
        g = dict(f.__globals__, **helpers)
        fn = type(f)(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
        fn.__module__, fn.__qualname__ = f.__module__, f.__qualname__
        return SimpleNamespace(dequantize=jit(fn))
