"""Triton NVFP4 kernels under the interpreter on CPU equal the torch reference byte for byte.

The interpreter path is chosen per call (`backend="interpret"`): kernels are built for that mode
on first use, so the test does not depend on TRITON_INTERPRET being set before imports.
"""

from __future__ import annotations

import math

import pytest
import torch

from vidtrain.formats import nvfp4 as N

pytest.importorskip("triton")
K = pytest.importorskip("vidtrain.kernels")

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_same_q(a: N.NVFP4Tensor, b: N.NVFP4Tensor) -> None:
    assert torch.equal(a.data.cpu(), b.data.cpu())
    assert torch.equal(a.scales.view(torch.uint8).cpu(), b.scales.view(torch.uint8).cpu())
    assert a.shape == b.shape


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.cpu().view(_INT_VIEW[a.dtype]), b.cpu().view(_INT_VIEW[b.dtype]))


def _inputs():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 3, 48, generator=g) * torch.exp(torch.randn(6, 3, 1, generator=g) * 8)
    special = torch.zeros(2, 64)
    special[0, 0], special[0, 1], special[0, 17], special[1, 20] = math.inf, -math.inf, -0.0, 1e-30
    return {
        "randn": torch.randn(8, 64, generator=g),
        "wide": wide,
        "bf16": torch.randn(4, 32, generator=g).bfloat16() * 100,
        "fp16": torch.randn(3, 32, generator=g).half(),
        "zeros": torch.zeros(3, 32),
        "special": special,
        "many_programs": torch.randn(130, 16, generator=g),  # > BLOCK_R rows, a partial program
    }


@pytest.mark.parametrize("name", sorted(_inputs()))
def test_quantize_dequantize_interpret_equals_torch(name):
    x = _inputs()[name]
    ref = N.quantize(x)
    got = K.quantize(x, backend="interpret")
    assert_same_q(ref, got)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_bitwise(K.dequantize(ref, dtype, backend="interpret"), N.dequantize(ref, dtype))


def test_every_e2m1_code_decodes_with_its_sign_negative_zero_too():
    """Code 8 is -0.0: a decode written as unary minus lost that sign under Triton 3.6."""
    codes = torch.arange(16, dtype=torch.uint8)
    data = (codes[0::2] | (codes[1::2] << 4))[None]  # element 2k low nibble, 2k+1 high nibble
    scales = torch.full((1, 1), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)  # e4m3 1.0
    q = N.NVFP4Tensor(data, scales, torch.tensor(2688.0), torch.Size((1, 16)), torch.float32)  # S_enc = 1
    expect = torch.tensor(N._E2M1_VALUES)[None]
    assert torch.signbit(expect[0, 8])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = K.dequantize(q, dtype, backend="interpret")
        assert_bitwise(got, expect.to(dtype))
        assert_bitwise(got, N.dequantize(q, dtype))


@pytest.mark.parametrize("name", sorted(_inputs()))
def test_one_pass_amax_has_the_reference_bits(name):
    x = _inputs()[name]
    assert_bitwise(K.abs_amax(x), x.abs().float().amax())
    for dims in [(0,), (0, 1), (1,), ()]:
        if len(dims) < x.ndim:
            assert_bitwise(K.abs_amax(x, dims), N.group_amax(x, dims))
    z = -torch.zeros(2, 3, 16)  # all -0.0: the max is +0.0, as abs gives
    assert not K.abs_amax(z).signbit() and not K.abs_amax(z, (0,)).signbit().any()
    n = torch.zeros(2, 3, 16)
    n[1, 2, 5] = math.nan
    assert (
        K.abs_amax(n).isnan() and K.abs_amax(n, (0,))[1].isnan().all() and not K.abs_amax(n, (0,))[0].isnan()
    )


def test_tile_2d_interpret_equals_torch():
    w = torch.randn(40, 48)
    assert_same_q(K.quantize(w, tile_2d=True, backend="interpret"), N.quantize(w, tile_2d=True))


@pytest.mark.parametrize("group_dims", [(0,), (1,), (0, 2)])
def test_quantize_blocks_interpret_equals_torch(group_dims):
    kv = torch.randn(2, 3, 4, 32) * torch.arange(1, 4).float()[None, :, None, None]
    assert_same_q(K.quantize_blocks(kv, group_dims, backend="interpret"), N.quantize_blocks(kv, group_dims))


def test_fused_kv_dequant_many_blocks_one_launch():
    # e.g. 2 layers x (K, V) x 2 chunks, each block [B, H, Lc, D] with a per-batch amax
    blocks = [N.quantize_blocks(torch.randn(2, 2, 4, 32) * (i + 1), (0,)) for i in range(8)]
    expect = torch.stack([N.dequantize(b, torch.bfloat16) for b in blocks])
    got = K.dequantize_kv_blocks(blocks, torch.bfloat16, backend="interpret")
    assert_bitwise(got, expect)
    stacked = K.stack_blocks(blocks)
    assert_bitwise(K.dequantize_kv_blocks(stacked, torch.bfloat16, backend="torch"), expect)
    with pytest.raises(ValueError, match="one shape"):
        K.stack_blocks([blocks[0], N.quantize_blocks(torch.randn(1, 2, 4, 32))])


def test_nan_is_loud():
    x = torch.zeros(3, 32)
    x[0, 3] = math.nan
    assert K.dequantize(K.quantize(x, backend="interpret"), backend="interpret").isnan().all()


def test_dispatcher():
    assert K.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="known"):
        K.resolve_backend("cuda-magic", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        K.resolve_backend("triton", torch.device("cpu"))
    x = torch.randn(4, 32)
    assert_same_q(K.quantize(x), N.quantize(x))  # auto on CPU is the torch reference
    with pytest.raises(ValueError, match="multiple of 16"):
        K.quantize(torch.randn(4, 20), backend="interpret")


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(_inputs()))
def test_triton_gpu_equals_torch(name):
    x = _inputs()[name].cuda()
    ref = N.quantize(x)
    assert_same_q(K.quantize(x, backend="triton"), ref)
    assert_same_q(ref, N.quantize(x.cpu()))  # torch on CUDA equals torch on CPU
    for dtype in (torch.float32, torch.bfloat16):
        assert_bitwise(K.dequantize(ref, dtype, backend="triton"), N.dequantize(ref, dtype))


@pytest.mark.gpu
def test_triton_gpu_tiles_and_fused():
    w = torch.randn(40, 48, device="cuda")
    assert_same_q(K.quantize(w, tile_2d=True, backend="triton"), N.quantize(w, tile_2d=True))
    blocks = [N.quantize_blocks(torch.randn(2, 2, 4, 32, device="cuda") * (i + 1)) for i in range(8)]
    expect = torch.stack([N.dequantize(b, torch.bfloat16) for b in blocks])
    assert_bitwise(K.dequantize_kv_blocks(blocks, torch.bfloat16, backend="triton"), expect)
