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

Block-scale rule (`scale_rule`, 1x16 blocks only; the KV cache's `--kv-scale-rule`):
    "amax"  s_b as above (Transformer Engine's chain; the default, bit for bit unchanged);
    "mse"   per 16-element block, the E4M3 code c of s_b is one of the candidates
            c + o for o in MSE_CODE_OFFSETS = (0, -1, 1, 2, 3, 4, 5, 6) (clamped to the finite
            codes 0..0x7E = 448), each quantized with the rest of the chain unchanged, and the
            one with the least squared error sum_i (x_i - x_hat_i)^2 over the block (fp32, the
            dequantizer's own arithmetic) is stored; ties keep the earlier candidate, so the
            amax code wins every tie. Deterministic, and never worse than "amax" on any block.
The codes, the stored amax and the layout are those of "amax" (only the chosen scale bytes
differ), so `dequantize` is unchanged. The candidates are ModelOpt's bounded FP8-scale sweep
(`nvfp4_fp8_scale_sweep` with a code-offset range) cut to the offsets that win in practice:
-1 (clip the block's largest value), +1 (undo the E4M3 rounding-down of s_b, which saturates it)
and +2..+6, which put the block amax near E2M1's 4 instead of 6 (the "4/6" choice: 4 is exact and
the grid below it is finer). On Gaussian and Student-t blocks the full 126-code sweep gains at
most ~1% of the amax error more than these 8 (bench/kv_scale_rule_bench.py). A NaN scale (NaN
input) is kept as is, as are blocks whose every candidate has the same (zero or inf) error.
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
E4M3_MAX_CODE = 0x7E  # the byte of 448, the largest finite float8_e4m3fn (0x7F is NaN)
SCALE_RULES = ("amax", "mse")
# E4M3 code offsets from the amax rule's block-scale code that the "mse" rule tries, in order
# (the amax code first: a tie keeps it)
MSE_CODE_OFFSETS = (0, -1, 1, 2, 3, 4, 5, 6)
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


def _e2m1_strict_bounds(device) -> torch.Tensor:
    """The RNE decision points as strict ones (magnitude index = #{t : a > t}): a tie that rounds
    up (a >= t) is a > (the fp32 just below t)."""
    up = torch.tensor(sorted(_E2M1_UP_STRICT + _E2M1_UP_EQUAL), dtype=torch.float32, device=device)
    tie_up = torch.tensor([t in _E2M1_UP_EQUAL for t in up.tolist()], device=device)
    return torch.where(tie_up, torch.nextafter(up, torch.zeros_like(up)), up)


def e2m1_round_abs(a: torch.Tensor) -> torch.Tensor:
    """|v| (fp32 >= 0, already clamped to <= 6) -> the E2M1 magnitude `e2m1_encode` rounds it to,
    as a value: e2m1_decode(e2m1_encode(v)).abs() without the codes (the "mse" rule's inner
    loop; one bucketize and a lookup)."""
    mags = torch.tensor(_E2M1_MAGNITUDES, dtype=torch.float32, device=a.device)
    return mags[torch.bucketize(a, _e2m1_strict_bounds(a.device))]


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


def check_scale_rule(scale_rule: str) -> None:
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown NVFP4 scale rule {scale_rule!r}; known: {', '.join(SCALE_RULES)}")


def block_sq_error(xb32: torch.Tensor, s_b: torch.Tensor, s_dec: torch.Tensor, abs_x=None) -> torch.Tensor:
    """Squared error per block of quantizing fp32 blocks `xb32` [..., K/16, 16] with block scales
    `s_b` (e4m3 [..., K/16]) and S_dec (broadcastable to `s_b`): sum over the block of
    (x - dequantize(quantize(x)))^2 in fp32, with the chain's and the dequantizer's own
    arithmetic (|x - x_hat| = ||x| - |x_hat||: x_hat has x's sign). `abs_x`: |xb32| if at hand.
    [..., K/16] fp32."""
    a = xb32.abs() if abs_x is None else abs_x
    sf = s_b.float()
    enc = torch.clamp(1.0 / (sf * s_dec), max=FLT_MAX)
    v = (a * enc.unsqueeze(-1)).clamp_(max=E2M1_MAX)
    x_hat = e2m1_round_abs(v).mul_(sf.unsqueeze(-1)).mul_(s_dec.unsqueeze(-1))  # dequantize's order
    return x_hat.sub_(a).square_().sum(dim=-1)


def mse_block_scales(
    xb32: torch.Tensor, s_b: torch.Tensor, s_dec: torch.Tensor, offsets: Sequence[int] = MSE_CODE_OFFSETS
) -> torch.Tensor:
    """The "mse" rule: per block, the E4M3 scale among `s_b`'s code + `offsets` (clamped to
    0..448) with the least `block_sq_error`; strict improvements only, so the first offset (0:
    the amax rule's scale) wins ties, and a NaN scale or error never moves. e4m3 [..., K/16]."""
    a = xb32.abs().contiguous()  # (bucketize wants contiguous input)
    c0 = s_b.view(torch.uint8)
    nan = (c0 & 0x7F) == 0x7F
    best, best_err = c0, block_sq_error(xb32, s_b, s_dec, a)
    base = c0.to(torch.int16)
    for off in offsets:
        if off == 0:
            continue
        cand = (base + off).clamp_(0, E4M3_MAX_CODE).to(torch.uint8)
        err = block_sq_error(xb32, cand.view(torch.float8_e4m3fn), s_dec, a)
        better = (err < best_err) & ~nan
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best.view(torch.float8_e4m3fn)


def quantize_with_amax(
    x: torch.Tensor,
    amax: torch.Tensor,
    tile_2d: bool = False,
    uniform: torch.Tensor | None = None,
    scale_rule: str = "amax",
) -> NVFP4Tensor:
    """Quantize with a given fp32 amax broadcastable to [..., K/16] (per tensor or per group).

    `uniform` (fp32 in [0, 1), x's shape) switches the E2M1 step from round-to-nearest-even to
    stochastic rounding (`e2m1_encode_stochastic`); the scale chain is the same. `scale_rule`:
    "amax" (the chain above) or "mse" (per block the E4M3 scale of least squared error among
    a few candidates, see the module docstring; 1x16 blocks only; the search measures the
    round-to-nearest error, whatever `uniform`).
    """
    check_last_dim(x)
    check_scale_rule(scale_rule)
    if tile_2d and scale_rule != "amax":
        raise ValueError("scale_rule 'mse' is for 1x16 blocks (a 16x16 tile shares one scale)")
    x32 = x.float()
    amax = amax.float()
    s_enc = encode_scale(amax)
    s_dec = 1.0 / s_enc
    s_b = block_scale_e4m3(_block_amax(x32, tile_2d), s_enc)  # [..., K/16] e4m3
    if scale_rule == "mse":
        s_b = mse_block_scales(x32.unflatten(-1, (-1, BLOCK)), s_b, s_dec)
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
    x: torch.Tensor,
    group_dims: Sequence[int] = (0,),
    uniform: torch.Tensor | None = None,
    scale_rule: str = "amax",
) -> NVFP4Tensor:
    """NVFP4 with one amax per index of `group_dims` (e.g. per batch element of a chunk's K/V).

    For one chunk's K or V shaped [B, H, L, D], `group_dims=(0,)` gives an amax per (batch,
    chunk); the scales are 16-element blocks along head_dim D. `amax` keeps x's rank (size 1 on
    reduced dims); its last dim is 1, so it broadcasts against `scales`. `uniform`: stochastic
    rounding, `scale_rule`: "amax" | "mse", as in `quantize_with_amax`.
    """
    check_last_dim(x)
    if x.ndim - 1 in {d % x.ndim for d in group_dims}:
        raise ValueError("group_dims may not include the last (blocked) dim")
    return quantize_with_amax(x, group_amax(x, group_dims), uniform=uniform, scale_rule=scale_rule)


def fake_quantize_kv(
    k_or_v: torch.Tensor, group_dims: Sequence[int] = (0,), scale_rule: str = "amax"
) -> torch.Tensor:
    """quantize_blocks -> dequantize in the input's dtype: what a cached K/V block reads back as."""
    return dequantize(quantize_blocks(k_or_v, group_dims, scale_rule=scale_rule), k_or_v.dtype)


def fake_quantize_kv_chunks(kv_BHLD: torch.Tensor, chunk_len: int, scale_rule: str = "amax") -> torch.Tensor:
    """Fake-quantize a history K/V [B, H, L, D] chunk by chunk (L = n * chunk_len).

    Equals applying `fake_quantize_kv(chunk, group_dims=(0,))` to every chunk
    `kv_BHLD[:, :, i*chunk_len:(i+1)*chunk_len]` separately: the amax is per (batch, chunk).
    """
    b, h, length, d = kv_BHLD.shape
    if length % chunk_len:
        raise ValueError(f"history length {length} is not a multiple of chunk_len {chunk_len}")
    x = kv_BHLD.reshape(b, h, length // chunk_len, chunk_len, d)  # [B, H, n, Lc, D]
    return fake_quantize_kv(x, group_dims=(0, 2), scale_rule=scale_rule).reshape(b, h, length, d)


def fake_quantize_rows(x: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quant with one per-tensor amax per row (all dims but the last), 1x16 blocks.

    Used for activations in QAT: each token is quantized on its own, so the result does not
    depend on which other tokens share the tensor (sequence-parallel shards, batch mates, the
    sampler's single chunk versus the teacher-forcing sequence). `uniform` (fp32 in [0, 1),
    x's shape) rounds stochastically instead (the gradient path of QAT).
    """
    return dequantize(quantize_blocks(x, tuple(range(x.ndim - 1)), uniform), x.dtype)
