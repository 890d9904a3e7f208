"""NVFP4 format: reference arithmetic in torch (any device), the oracle for every other backend.

The chain is Transformer Engine's (DESIGN section 7), computed in fp32 step by step:

    amax  = max|x|;  S_enc = min(2688 / amax, FLT_MAX);  amax == 0 or S_enc == 0 -> S_enc = 1
    S_dec = 1 / S_enc
    per block of 16 along the last dim (or a 16x16 tile for weights):
      s_b = e4m3_rne(clamp(block_amax * (S_enc / 6), +-448))          # stored byte
      enc = min(1 / (fp32(s_b) * S_dec), FLT_MAX)
      q   = e2m1_rne_satfinite(clamp(x * enc, +-6))                     # 4-bit code
    dequant: x_hat = (e2m1(q) * fp32(s_b)) * S_dec

Stochastic rounding (QAT's gradient path, NVIDIA's NVFP4 training recipe) keeps the chain and
replaces only e2m1_rne_satfinite by an unbiased random choice between the two neighbouring E2M1
values (`e2m1_encode_stochastic`), driven by counter-based noise (`counter_uniform`).

Layout of an `NVFP4Tensor` for an input of shape [..., K] (K % 16 == 0):
    data    uint8 [..., K/2]   element 2k in the low nibble, 2k+1 in the high nibble
    scales  e4m3  [..., K/16]  one per 16 consecutive elements (2D tiles: the tile's scale is
                               replicated into each of its 16 rows)
    amax    fp32, broadcastable to `scales` (a 0-dim tensor for one per-tensor amax; keepdim
            shape with the grouped dims kept for `quantize_blocks`)

Non-finite input (a choice, tested): +-inf makes amax = inf, so S_enc = 2688/inf = 0 -> 1 (the
chain's edge case); the inf saturates to code +-6 in a block of scale 448 and dequantizes to
+-2688, finite values are coded with S_enc = 1. NaN makes amax NaN, so every scale of the
tensor (or of the KV block) is NaN and the whole tensor dequantizes to NaN: a NaN is loud,
never silently turned into a number.

A last dim that is not a multiple of 16 raises ValueError; `pad_last_dim` zero-pads (zeros do
not change any amax) and the caller slices the dequantized result back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
FLT_MAX = torch.finfo(torch.float32).max
BYTES_PER_ELEMENT = 0.5625  # 4 bits of code + one e4m3 byte per 16 elements

# Code -> value for the 16 E2M1 codes (bit 3 is the sign).
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Round-to-nearest-even decision points between neighbouring magnitudes: at a tie the even code
# (0, 1.0, 2.0, 4.0) wins, hence `>` for ties that round down and `>=` for ties that round up.
_E2M1_UP_STRICT = (0.25, 1.25, 2.5, 5.0)  # tie rounds down: code increments when a > t
_E2M1_UP_EQUAL = (0.75, 1.75, 3.5)  # tie rounds up: code increments when a >= t


def nbytes(numel: int) -> float:
    """Storage of `numel` elements in NVFP4: 4-bit codes plus one e4m3 scale per 16 (0.5625 B)."""
    return numel * BYTES_PER_ELEMENT


@dataclass
class NVFP4Tensor:
    """Packed NVFP4 codes, e4m3 block scales and fp32 amax; `shape`/`dtype` of the original."""

    data: torch.Tensor
    scales: torch.Tensor
    amax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    tile_2d: bool = False

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes held by codes and block scales (the per-tensor/per-block amax not counted)."""
        return self.data.numel() + self.scales.numel()


# ---------------------------------------------------------------------------------------------
# Scalar pieces of the chain (fp32 tensors in, fp32 tensors out)
# ---------------------------------------------------------------------------------------------


def encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """S_enc = min(2688 / amax, FLT_MAX), with amax == 0 or S_enc == 0 giving 1."""
    amax = amax.float()
    s_enc = torch.clamp(torch.tensor(E4M3_MAX * E2M1_MAX, device=amax.device) / amax, max=FLT_MAX)
    return torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def block_scale_e4m3(block_amax: torch.Tensor, s_enc: torch.Tensor) -> torch.Tensor:
    """s_b = e4m3_rne(clamp(block_amax * (S_enc / 6), +-448)) as float8_e4m3fn."""
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its reciprocal.
    six = torch.full_like(s_enc, E2M1_MAX)
    return torch.clamp(block_amax * (s_enc / six), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> 4-bit E2M1 code (uint8 0..15), round to nearest even, saturating at +-6.

    The sign bit follows `signbit`, so -0.0 and small negatives give code 8 (negative zero).
    NaN gives a code of magnitude 0 (the NaN lives in the scale, see the module docstring).
    """
    a = v.abs()
    code = torch.zeros_like(v, dtype=torch.uint8)
    for t in _E2M1_UP_STRICT:
        code += (a > t).to(torch.uint8)
    for t in _E2M1_UP_EQUAL:
        code += (a >= t).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_encode_stochastic(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """fp32 in [-6, 6] -> 4-bit E2M1 code with stochastic rounding, `u` uniform in [0, 1).

    |v| between neighbouring magnitudes lo <= |v| < hi rounds up to hi with probability
    (|v| - lo) / (hi - lo) (up when u < p), so E[e2m1(code)] = v for |v| <= 6 and the result is
    always lo or hi (exactly lo when |v| is representable). Sign as `e2m1_encode`; NaN gives a
    magnitude-0 code.
    """
    a = v.abs()
    k = torch.zeros_like(v, dtype=torch.uint8)
    for t in _E2M1_MAGNITUDES[1:]:
        k += (a >= t).to(torch.uint8)
    mags = torch.tensor((*_E2M1_MAGNITUDES, _E2M1_MAGNITUDES[-1]), dtype=torch.float32, device=v.device)
    lo, hi = mags[k.long()], mags[k.long() + 1]
    p = torch.where(hi > lo, (a - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)
    code = k + (u < p).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


# Counter-based uniform noise for stochastic rounding: a pure function of (seed, counter,
# element index), integer arithmetic only, so it is bit-identical on every device and backend
# and needs no torch.Generator state (a run is reproducible from its seed and step alone).
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32) (int or int64 tensor) without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    """lowbias32 (C. Wellons): a 32-bit integer hash with good avalanche; ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(shape: Sequence[int], seed: int, counter: int, device=None) -> torch.Tensor:
    """fp32 uniform noise in [0, 1) (24-bit grid) for `shape`, a pure function of seed/counter.

    Element i of the flattened tensor gets hash(hash(i ^ k1) ^ (i >> 32) ^ k2) with keys
    derived from (seed, counter); different (seed, counter) pairs give independent streams.
    """
    k = _hash32(seed & _M32)
    k = _hash32(k ^ ((seed >> 32) & _M32))
    k1 = _hash32(k ^ (counter & _M32))
    k2 = _hash32(k1 ^ ((counter >> 32) & _M32) ^ 0x9E3779B9)
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64, device=device)
    h = _hash32(_hash32((idx & _M32) ^ k1) ^ (idx >> 32) ^ k2)
    return ((h >> 8).to(torch.float32) * 2.0**-24).reshape(tuple(shape))


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """4-bit code (uint8) -> fp32 value."""
    lut = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=code.device)
    return lut[code.long()]


def pack_codes(code: torch.Tensor) -> torch.Tensor:
    """[..., 2n] uint8 codes -> [..., n] bytes; element 2k in the low nibble."""
    return code[..., 0::2] | (code[..., 1::2] << 4)


def unpack_codes(data: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] uint8 codes."""
    return torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------------------------


def check_last_dim(x: torch.Tensor) -> None:
    if x.ndim == 0 or x.shape[-1] % BLOCK != 0:
        raise ValueError(
            f"NVFP4 needs the last dim to be a multiple of {BLOCK}, got shape {tuple(x.shape)}; "
            "zero-pad it with vidtrain.formats.nvfp4.pad_last_dim and slice the result back"
        )


def pad_last_dim(x: torch.Tensor, multiple: int = BLOCK) -> torch.Tensor:
    """Zero-pad the last dim up to a multiple of 16 (zeros change no amax)."""
    return F.pad(x, (0, (-x.shape[-1]) % multiple))


def tile_amax_2d(x: torch.Tensor) -> torch.Tensor:
    """fp32 [..., N, K] -> [..., N, K/16]: the amax of each 16x16 tile, replicated to its rows.

    A last partial row tile (N % 16 != 0) is the amax of the rows it has.
    """
    n, k = x.shape[-2], x.shape[-1]
    xp = F.pad(x.abs(), (0, 0, 0, (-n) % BLOCK))  # [..., N16, K]
    t = xp.unflatten(-2, (-1, BLOCK)).unflatten(-1, (k // BLOCK, BLOCK))  # [..., N/16, 16, K/16, 16]
    t = t.amax(dim=(-3, -1), keepdim=True)  # [..., N/16, 1, K/16, 1]
    t = t.expand(*t.shape[:-3], BLOCK, k // BLOCK, 1).flatten(-4, -3)  # [..., N16, K/16, 1]
    return t[..., :n, :, 0]


def _block_amax(x32: torch.Tensor, tile_2d: bool) -> torch.Tensor:
    """fp32 [..., K] -> [..., K/16] amax per scale block (1x16, or the 16x16 tile's)."""
    if tile_2d:
        if x32.ndim < 2:
            raise ValueError("tile_2d needs at least 2 dims (a weight [out, in])")
        return tile_amax_2d(x32)
    return x32.abs().unflatten(-1, (-1, BLOCK)).amax(dim=-1)


def quantize_with_amax(
    x: torch.Tensor, amax: torch.Tensor, tile_2d: bool = False, uniform: torch.Tensor | None = None
) -> NVFP4Tensor:
    """Quantize with a given fp32 amax broadcastable to [..., K/16] (per tensor or per group).

    `uniform` (fp32 in [0, 1), x's shape) switches the E2M1 step from round-to-nearest-even to
    stochastic rounding (`e2m1_encode_stochastic`); the scale chain is the same.
    """
    check_last_dim(x)
    x32 = x.float()
    amax = amax.float()
    s_enc = encode_scale(amax)
    s_dec = 1.0 / s_enc
    s_b = block_scale_e4m3(_block_amax(x32, tile_2d), s_enc)  # [..., K/16] e4m3
    enc = torch.clamp(1.0 / (s_b.float() * s_dec), max=FLT_MAX)
    v = x32.unflatten(-1, (-1, BLOCK)) * enc.unsqueeze(-1)  # [..., K/16, 16]
    v = torch.clamp(v, -E2M1_MAX, E2M1_MAX)
    if uniform is None:
        code = e2m1_encode(v).flatten(-2)
    else:
        code = e2m1_encode_stochastic(v, uniform.reshape(v.shape)).flatten(-2)
    return NVFP4Tensor(pack_codes(code), s_b, amax, x.shape, x.dtype, tile_2d)


def quantize(x: torch.Tensor, block_size: int = BLOCK, tile_2d: bool = False) -> NVFP4Tensor:
    """NVFP4 with one fp32 amax for the whole tensor; 1x16 blocks, or 16x16 tiles if `tile_2d`."""
    if block_size != BLOCK:
        raise ValueError(f"NVFP4 block_size must be {BLOCK}, got {block_size}")
    check_last_dim(x)
    return quantize_with_amax(x, x.detach().abs().amax().float(), tile_2d)


def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = (e2m1(q) * fp32(s_b)) * S_dec, computed in fp32, then cast to `dtype`."""
    s_dec = 1.0 / encode_scale(q.amax)
    vals = e2m1_decode(unpack_codes(q.data)).unflatten(-1, (-1, BLOCK))  # [..., K/16, 16]
    out = (vals * q.scales.float().unsqueeze(-1)) * s_dec.unsqueeze(-1)
    return out.flatten(-2).reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, tile_2d: bool = False) -> torch.Tensor:
    """quantize -> dequantize, returned in x's dtype (no gradient: see quant.qat for STE)."""
    return dequantize(quantize(x, tile_2d=tile_2d), x.dtype)


# ---------------------------------------------------------------------------------------------
# Per-block amax (KV cache): the sampler's storage and QAT's history use this one definition
# ---------------------------------------------------------------------------------------------


def group_amax(x: torch.Tensor, group_dims: Sequence[int]) -> torch.Tensor:
    """fp32 amax over every dim except `group_dims`, with keepdim (broadcastable to x)."""
    keep = {d % x.ndim for d in group_dims}
    reduce = tuple(d for d in range(x.ndim) if d not in keep)
    a = x.detach().abs().float()
    return a.amax(dim=reduce, keepdim=True) if reduce else a


def quantize_blocks(
    x: torch.Tensor, group_dims: Sequence[int] = (0,), uniform: torch.Tensor | None = None
) -> NVFP4Tensor:
    """NVFP4 with one amax per index of `group_dims` (e.g. per batch element of a chunk's K/V).

    For one chunk's K or V shaped [B, H, L, D], `group_dims=(0,)` gives an amax per (batch,
    chunk); the scales are 16-element blocks along head_dim D. `amax` keeps x's rank (size 1 on
    reduced dims); its last dim is 1, so it broadcasts against `scales`. `uniform`: stochastic
    rounding, as in `quantize_with_amax`.
    """
    check_last_dim(x)
    if x.ndim - 1 in {d % x.ndim for d in group_dims}:
        raise ValueError("group_dims may not include the last (blocked) dim")
    return quantize_with_amax(x, group_amax(x, group_dims), uniform=uniform)


def fake_quantize_kv(k_or_v: torch.Tensor, group_dims: Sequence[int] = (0,)) -> torch.Tensor:
    """quantize_blocks -> dequantize in the input's dtype: what a cached K/V block reads back as."""
    return dequantize(quantize_blocks(k_or_v, group_dims), k_or_v.dtype)


def fake_quantize_kv_chunks(kv_BHLD: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """Fake-quantize a history K/V [B, H, L, D] chunk by chunk (L = n * chunk_len).

    Equals applying `fake_quantize_kv(chunk, group_dims=(0,))` to every chunk
    `kv_BHLD[:, :, i*chunk_len:(i+1)*chunk_len]` separately: the amax is per (batch, chunk).
    """
    b, h, length, d = kv_BHLD.shape
    if length % chunk_len:
        raise ValueError(f"history length {length} is not a multiple of chunk_len {chunk_len}")
    x = kv_BHLD.reshape(b, h, length // chunk_len, chunk_len, d)  # [B, H, n, Lc, D]
    return fake_quantize_kv(x, group_dims=(0, 2)).reshape(b, h, length, d)


def fake_quantize_rows(x: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quant with one per-tensor amax per row (all dims but the last), 1x16 blocks.

    Used for activations in QAT: each token is quantized on its own, so the result does not
    depend on which other tokens share the tensor (sequence-parallel shards, batch mates, the
    sampler's single chunk versus the teacher-forcing sequence). `uniform` (fp32 in [0, 1),
    x's shape) rounds stochastically instead (the gradient path of QAT).
    """
    return dequantize(quantize_blocks(x, tuple(range(x.ndim - 1)), uniform), x.dtype)
