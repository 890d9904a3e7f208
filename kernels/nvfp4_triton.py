"""Triton NVFP4 kernels: quantize and dequantize (one launch for many KV blocks too).

The arithmetic is the TE chain of `vidtrain.formats.nvfp4`, step for step in fp32, with
`tl.div_rn` for every division so the GPU, the interpreter and the torch reference agree bit for
bit. The e4m3 scale byte is built by hand from fp32 bits (round to nearest even) instead of a
Triton fp8 cast, whose rounding differs between backends.

Layout: the input is viewed as rows of 16 (one scale block per row); a program handles BLOCK_R
rows. Row r's amax is `amax[r // blocks_per_amax]` (per tensor: one amax; per KV block: the
blocks of one group are consecutive). `block_amax` (optional) overrides each row's own
amax, which is how 16x16 weight tiles enter.

Kernels are built per mode by `get_kernels(interpret)`: `triton.jit` decides between compiled
and interpreted at decoration time, so building lazily under a knob scope lets one process use
both (interpreter for CPU tests, compiled on CUDA) regardless of when TRITON_INTERPRET was set.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import triton
import triton.language as tl

_FLT_MAX = 3.4028234663852886e38


def _e4m3_decode(b):
    """uint8-valued int32 byte (0..0x7F, non-negative) -> fp32 value; 0x7F -> NaN."""
    e = b >> 3
    m = b & 7
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
    bits = ((e + 120) << 23) | (m << 20)
    val = tl.where(e == 0, sub, bits.to(tl.float32, bitcast=True))
    nan = tl.full(b.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(b == 0x7F, nan, val)


def _max_combine(a, b):
    return tl.maximum(a, b)


def _encode_scale(a):
    """S_enc = min(2688 / amax, FLT_MAX); amax == 0 or S_enc == 0 -> 1."""
    s_enc = tl.div_rn(tl.full(a.shape, 2688.0, tl.float32), a)
    s_enc = tl.where(s_enc > 3.4028234663852886e38, 3.4028234663852886e38, s_enc)
    return tl.where((a == 0.0) | (s_enc == 0.0), 1.0, s_enc)


def _quantize_kernel(
    x_ptr,
    amax_ptr,
    block_amax_ptr,
    data_ptr,
    scale_ptr,
    n_rows,
    blocks_per_amax,
    HAS_BLOCK_AMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
    rmask = rows < n_rows
    j = tl.arange(0, 8)  # pair index inside a row of 16
    m2 = rmask[:, None]
    base = rows.to(tl.int64)[:, None] * 16 + 2 * j[None, :]  # [R, 8]
    xe = tl.load(x_ptr + base, mask=m2, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + base + 1, mask=m2, other=0.0).to(tl.float32)

    a = tl.load(amax_ptr + rows // blocks_per_amax, mask=rmask, other=1.0)
    s_enc = _encode_scale(a)
    s_dec = tl.div_rn(tl.full(a.shape, 1.0, tl.float32), s_enc)
    if HAS_BLOCK_AMAX:
        bamax = tl.load(block_amax_ptr + rows, mask=rmask, other=0.0)
    else:
        # tl.reduce with our own combine fn: tl.max is a stdlib jit function fixed to the
        # mode triton was imported in, which breaks the interpreter in a compiled-mode process
        bamax = tl.reduce(tl.maximum(tl.abs(xe), tl.abs(xo)), 1, _max_combine)

    # s_b = e4m3_rne(min(block_amax * (S_enc / 6), 448)), by hand from the fp32 bits
    sv = bamax * tl.div_rn(s_enc, tl.full(a.shape, 6.0, tl.float32))
    sv = tl.where(sv > 448.0, 448.0, sv)
    bits = sv.to(tl.int32, bitcast=True)
    byte_n = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)  # normal: 3 mantissa bits
    q = (sv * 512.0 + 8388608.0) - 8388608.0  # subnormal: RNE of sv * 2^9 to an integer
    byte = tl.where(sv < 0.015625, q.to(tl.int32), byte_n)
    byte = tl.where(sv != sv, 0x7F, byte)
    sbf = _e4m3_decode(byte)

    enc = tl.div_rn(tl.full(a.shape, 1.0, tl.float32), sbf * s_dec)
    enc = tl.where(enc > 3.4028234663852886e38, 3.4028234663852886e38, enc)
    ce = _e2m1_encode(xe * enc[:, None])
    co = _e2m1_encode(xo * enc[:, None])
    tl.store(data_ptr + rows.to(tl.int64)[:, None] * 8 + j[None, :], (ce | (co << 4)).to(tl.uint8), mask=m2)
    tl.store(scale_ptr + rows, byte.to(tl.uint8), mask=rmask)


def _e2m1_encode(v):
    """fp32 -> E2M1 code (int32 0..15): clamp to +-6, round to nearest even, sign from bit 31."""
    v = tl.where(v > 6.0, 6.0, v)
    v = tl.where(v < -6.0, -6.0, v)
    a = tl.abs(v)
    code = (
        (a > 0.25).to(tl.int32)
        + (a >= 0.75).to(tl.int32)
        + (a > 1.25).to(tl.int32)
        + (a >= 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32)
        + (a >= 3.5).to(tl.int32)
        + (a > 5.0).to(tl.int32)
    )
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return code | (sign << 3)


def _e2m1_decode(c):
    """E2M1 code (int32 0..15) -> fp32; code 8 is -0.0.

    The sign is ORed into bit 31 rather than written as `-val`: Triton 3.6 lowers float unary
    minus to `0 - x`, which turns -0.0 into +0.0 (the torch reference and Triton 3.9 keep -0.0).
    """
    m = c & 7
    mf = m.to(tl.float32)
    val = tl.where(m < 4, mf * 0.5, tl.where(m == 7, 6.0, mf - 2.0))
    sign = (c & 8) << 28  # bit 3 -> bit 31
    return (val.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


def _dequantize_kernel(
    data_ptr,
    scale_ptr,
    amax_ptr,
    out_ptr,
    n_rows,
    blocks_per_amax,
    OUT_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    j = tl.arange(0, 8)
    m2 = rmask[:, None]
    packed = tl.load(data_ptr + rows.to(tl.int64)[:, None] * 8 + j[None, :], mask=m2, other=0).to(tl.int32)
    byte = tl.load(scale_ptr + rows, mask=rmask, other=0).to(tl.int32)
    a = tl.load(amax_ptr + rows // blocks_per_amax, mask=rmask, other=1.0)
    s_dec = tl.div_rn(tl.full(a.shape, 1.0, tl.float32), _encode_scale(a))
    sbf = _e4m3_decode(byte)
    lo = (_e2m1_decode(packed & 15) * sbf[:, None]) * s_dec[:, None]
    hi = (_e2m1_decode(packed >> 4) * sbf[:, None]) * s_dec[:, None]
    base = rows.to(tl.int64)[:, None] * 16 + 2 * j[None, :]
    if OUT_BF16:  # out_ptr is an int16 view: RNE to bf16 by hand (the interpreter truncates)
        tl.store(out_ptr + base, _bf16_bits(lo), mask=m2)
        tl.store(out_ptr + base + 1, _bf16_bits(hi), mask=m2)
    else:
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + base, lo.to(ty), mask=m2)
        tl.store(out_ptr + base + 1, hi.to(ty), mask=m2)


def _bf16_bits(v):
    """fp32 -> bf16 bit pattern (int16), round to nearest even; NaN stays NaN."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@functools.cache
def get_kernels(interpret: bool) -> SimpleNamespace:
    """The jitted kernels for one mode (compiled, or the Triton interpreter on CPU tensors)."""
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        jit = triton.jit
        helpers = {
            f.__name__: jit(f)
            for f in (_max_combine, _e4m3_decode, _encode_scale, _e2m1_encode, _e2m1_decode, _bf16_bits)
        }
        kernels = {}
        for f in (_quantize_kernel, _dequantize_kernel):
            # each mode's kernels call that mode's helpers: rebind the globals they see
            g = dict(f.__globals__, **helpers)
            fn = type(f)(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
            fn.__module__ = f.__module__
            fn.__qualname__ = f.__qualname__
            kernels[f.__name__.strip("_").removesuffix("_kernel")] = jit(fn)
    return SimpleNamespace(**kernels)
