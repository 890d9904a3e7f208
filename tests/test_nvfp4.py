"""NVFP4 format: codec and chain against torchao, golden vectors, 2D tiles, round-trip bounds.

Differences from torchao's `nvfp4_quantize` (checked, and why):
- torchao clamps every block scale below at 2^-6 (the smallest normal e4m3); the TE chain keeps
  subnormal e4m3 scales and zero scales (a block whose scale rounds to 0 then codes its values
  as +-6 with enc = FLT_MAX, dequantizing to 0). Blocks with scale < 2^-6 are excluded from the
  bit-exact comparison.
- torchao forms the per-tensor scale as amax / 2688 and the element multiplier as
  (1 / per_tensor_scale) / s_b; TE forms S_enc = 2688 / amax, S_dec = 1 / S_enc and
  enc = 1 / (s_b * S_dec). These can differ by one fp32 ulp, which flips a code only when
  x * enc lands within an ulp of an E2M1 rounding point. With fp32 random data that does not
  happen in our seeds; with bf16 input (few mantissa bits) exact ties like 3.5 occur, so a few
  codes differ by one step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vidtrain.formats import nvfp4 as N

torchao_kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
torchao_nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")

# ---------------------------------------------------------------------------------------------
# An independent scalar implementation of the chain (numpy fp32 scalars, nearest-value search)
# ---------------------------------------------------------------------------------------------
f32 = np.float32
_FMAX = np.finfo(np.float32).max
_E2M1 = [(m, k) for k, m in enumerate([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])]


def _e4m3_value(b: int) -> float:
    e, m = (b >> 3) & 0xF, b & 7
    return m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)


_E4M3 = [(_e4m3_value(b), b) for b in range(0x7F)]  # 0x7F is NaN


def _nearest_even(v: float, table: list[tuple[float, int]]) -> int:
    return min(table, key=lambda t: (abs(t[0] - v), t[1] & 1))[1]


def scalar_chain(xs: list[float]) -> tuple[bytes, bytes]:
    x = [f32(v) for v in xs]
    amax = f32(max(abs(v) for v in x))
    with np.errstate(all="ignore"):
        s_enc = min(f32(f32(2688.0) / amax), f32(_FMAX)) if amax != 0 else f32(1.0)
        s_enc = f32(1.0) if s_enc == 0 else s_enc
        s_dec = f32(f32(1.0) / s_enc)
        codes, scales = [], []
        for i in range(0, len(x), 16):
            blk = x[i : i + 16]
            sv = min(f32(max(abs(v) for v in blk) * f32(s_enc / f32(6.0))), f32(448.0))
            sb = _nearest_even(float(sv), _E4M3)
            scales.append(sb)
            d = f32(f32(_e4m3_value(sb)) * s_dec)
            enc = min(f32(f32(1.0) / d), f32(_FMAX)) if d != 0 else f32(_FMAX)
            for v in blk:
                y = max(min(f32(v * enc), f32(6.0)), f32(-6.0))
                codes.append(_nearest_even(abs(float(y)), _E2M1) | (8 if np.signbit(y) else 0))
    data = [codes[2 * k] | (codes[2 * k + 1] << 4) for k in range(len(codes) // 2)]
    return bytes(data), bytes(scales)


# Golden vectors: (input, packed data hex, e4m3 scale bytes hex). The first two are also checked
# by hand: amax 6 gives S_enc = 448, s_b = 448 (0x7e), enc = 1, and the codes of
# [0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, -0] are
# [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 8] (ties to even), packed low nibble first.
GOLDEN = {
    "grid_amax6": (
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, -0.0],
        "0021224344656687",
        "7e",
    ),
    "negatives": (
        [-6.0, -5.0, -3.5, -0.25, -0.1, 0.1, 1.1, 2.9, 4.5, 5.9, -1.75, -0.75, 0.3, -2.5, 0.0, 3.25],
        "ef8e085276acc150",
        "7e",
    ),
    "all_zero": ([0.0] * 16, "0000000000000000", "00"),
    "tiny_1e-30": ([1e-30 * (i - 7.5) for i in range(16)], "ffeecd9a21546677", "7e"),
    "huge_3e38": ([3e38 * ((i % 5) - 2) / 2 for i in range(16)], "df50f70d75df50f7", "7e"),
    # amax is an fp32 subnormal: 2688/amax overflows, S_enc = FLT_MAX, every scale rounds to 0
    "subnormal_amax": ([1e-45 * (i % 3) for i in range(16)], "0000000000000000", "00"),
    # second block's scale rounds to e4m3 zero: enc = FLT_MAX saturates codes to 6, x_hat = 0
    "zero_scale_block": (
        [1000.0] + [0.0] * 15 + [1e-4 * (i + 1) for i in range(16)],
        "07000000000000007777777777777777",
        "7e00",
    ),
    "two_blocks": (
        [float(i) for i in range(16)] + [0.01 * (i - 8) for i in range(16)],
        "1022435465667677ffeecd9b10436576",
        "7e42",
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vectors(name):
    xs, data_hex, scale_hex = GOLDEN[name]
    assert scalar_chain(xs) == (bytes.fromhex(data_hex), bytes.fromhex(scale_hex))
    q = N.quantize(torch.tensor(xs, dtype=torch.float32))
    assert bytes(q.data.tolist()).hex() == data_hex
    assert bytes(q.scales.view(torch.uint8).tolist()).hex() == scale_hex


def test_scalar_chain_random_wide_range():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 32, generator=g) * torch.exp(torch.randn(4, 1, generator=g) * 8)
    q = N.quantize(x)
    data, scales = scalar_chain(x.flatten().tolist())
    assert bytes(q.data.flatten().tolist()) == data
    assert bytes(q.scales.view(torch.uint8).flatten().tolist()) == scales


def test_e2m1_codec_all_bf16_vs_torchao():
    f = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    f = f[torch.isfinite(f)]
    ours = N.e2m1_encode(torch.clamp(f, -6, 6))
    ref = torchao_kernels.f32_to_f4_unpacked(f)
    assert torch.equal(ours, ref)
    # decode is the inverse on the 16 codes
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(N.e2m1_encode(N.e2m1_decode(codes)), codes)


def _torchao(x):
    pts = torchao_nvfp4.per_tensor_amax_to_scale(x.float().abs().amax())
    s, d = torchao_nvfp4.nvfp4_quantize(x, 16, pts)
    return s.view(torch.uint8), d


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spread", [0.0, 1.0, 4.0])
def test_chain_vs_torchao_fp32(seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 128, generator=g) * torch.exp(torch.randn(32, 1, generator=g) * spread)
    q = N.quantize(x)
    s_ref, d_ref = _torchao(x)
    normal = q.scales.float() >= 2.0**-6  # torchao clamps smaller scales up to 2^-6
    assert normal.float().mean() > 0.25
    assert torch.equal(q.scales.view(torch.uint8)[normal], s_ref.reshape(q.scales.shape)[normal])
    codes, codes_ref = N.unpack_codes(q.data), N.unpack_codes(d_ref.reshape(q.data.shape))
    mask = normal.repeat_interleave(16, dim=-1)
    assert torch.equal(codes[mask], codes_ref[mask])


def test_chain_vs_torchao_bf16_differs_only_at_ties():
    x = (torch.randn(64, 256) * 1000).to(torch.bfloat16)
    q = N.quantize(x)
    s_ref, d_ref = _torchao(x)
    assert torch.equal(q.scales.view(torch.uint8), s_ref.reshape(q.scales.shape))
    codes, codes_ref = N.unpack_codes(q.data), N.unpack_codes(d_ref.reshape(q.data.shape))
    diff = codes != codes_ref
    assert diff.float().mean() < 1e-2
    # where they differ, x * enc is (within an ulp) an exact E2M1 rounding point
    s_dec = 1.0 / N.encode_scale(q.amax)
    enc = torch.clamp(1.0 / (q.scales.float() * s_dec), max=N.FLT_MAX).repeat_interleave(16, -1)
    v = (x.float() * enc)[diff].abs()
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert torch.allclose(v[:, None].sub(ties).abs().amin(1), torch.zeros(len(v)), atol=1e-5)


def test_tile_2d_replicates_into_1x16():
    w = torch.randn(40, 48)  # 40 rows: two full row tiles and a partial one
    q = N.quantize(w, tile_2d=True)
    assert q.scales.shape == (40, 3)
    for r0 in range(0, 40, 16):
        tile_rows = q.scales[r0 : r0 + 16].view(torch.uint8)
        assert torch.equal(tile_rows, tile_rows[:1].expand_as(tile_rows))
        # the tile's scale is the 1x16 scale computed from the tile's amax
        for c in range(3):
            tile_amax = w[r0 : r0 + 16, 16 * c : 16 * c + 16].abs().amax()
            s = N.block_scale_e4m3(tile_amax, N.encode_scale(w.abs().amax()))
            assert tile_rows[0, c] == s.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile_2d", [False, True])
def test_round_trip_error_bound(dtype, tile_2d):
    x = (torch.randn(32, 64) * 3).to(dtype)
    y = N.fake_quantize(x, tile_2d=tile_2d)
    assert y.dtype == dtype and y.shape == x.shape
    q = N.quantize(x, tile_2d=tile_2d)
    # per element: half an E2M1 step at the top (1.0 of 6) times the block's decode scale,
    # plus the e4m3 scale's relative rounding (2^-4) of the block's largest value
    dec = (q.scales.float() / N.encode_scale(q.amax)).repeat_interleave(16, -1)
    err = (y.float() - x.float()).abs()
    assert torch.all(err <= dec * 1.0 + x.float().abs() * 2**-4 + 1e-6)
    rel = err.norm() / x.float().norm()
    assert rel < 0.15


def test_shapes_and_errors():
    x = torch.randn(2, 3, 5, 32)
    q = N.quantize(x)
    assert q.data.shape == (2, 3, 5, 16) and q.scales.shape == (2, 3, 5, 2)
    assert q.scales.dtype == torch.float8_e4m3fn and q.amax.dtype == torch.float32
    assert q.nbytes() == N.nbytes(x.numel()) == x.numel() * 0.5625
    with pytest.raises(ValueError, match="multiple of 16"):
        N.quantize(torch.randn(4, 20))
    with pytest.raises(ValueError, match="block_size"):
        N.quantize(torch.randn(4, 32), block_size=32)
    xp = N.pad_last_dim(torch.randn(4, 20))
    assert xp.shape == (4, 32) and torch.all(xp[:, 20:] == 0)


def test_zeros_and_nonfinite():
    z = torch.zeros(3, 32)
    assert torch.equal(N.fake_quantize(z), z)
    x = torch.zeros(32)
    x[0], x[1], x[16] = math.inf, -math.inf, 1.0
    y = N.fake_quantize(x)
    assert y[0] == 2688 and y[1] == -2688  # S_enc = 2688/inf = 0 -> 1; inf saturates to 6*448
    q = N.quantize(x)
    assert q.scales.view(torch.uint8)[0] == 0x7E and q.data[0] == 0xF7  # +6, -6 in scale 448
    assert abs(y[16] - 1.0) < 0.1  # other blocks are coded with S_enc = 1
    x[5] = math.nan
    assert torch.isnan(N.fake_quantize(x)).all()  # NaN is loud: every scale is NaN


def test_kv_blocks_match_per_chunk_storage():
    b, h, lc, d, n = 2, 2, 4, 32, 3
    hist = torch.randn(b, h, n * lc, d) * torch.arange(1, n * lc + 1).float()[None, None, :, None]
    ref = torch.cat(
        [N.fake_quantize_kv(hist[:, :, i * lc : (i + 1) * lc], group_dims=(0,)) for i in range(n)], dim=2
    )
    assert torch.equal(N.fake_quantize_kv_chunks(hist, lc), ref)
    q = N.quantize_blocks(hist[:, :, :lc], group_dims=(0,))
    assert q.amax.shape == (b, 1, 1, 1)
    # a per-(batch, chunk) amax equals quantizing each batch element's chunk as one tensor
    assert torch.equal(N.dequantize(q), torch.stack([N.fake_quantize(t) for t in hist[:, :, :lc]]))
    with pytest.raises(ValueError):
        N.quantize_blocks(hist, group_dims=(-1,))
