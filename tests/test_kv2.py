"""kv2, the 2-bit KV format (vidtrain/formats/kv2.py): the layout by hand, golden bytes, bytes
counted, per-head independence, and its error against naive 2-bit RTN at equal bytes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from vidtrain.formats import kv2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _clustered(seed: int, tokens: int = 480, dim: int = 64, heads: int = 2) -> torch.Tensor:
    """K-like data: tokens near a few centroids, a few large channels, small noise."""
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(1, heads, 12, dim, generator=g) * 2
    cent[..., :3] *= 6  # outlier channels
    idx = torch.randint(0, 12, (tokens,), generator=g)
    return cent[:, :, idx] + 0.3 * torch.randn(1, heads, tokens, dim, generator=g)


def test_one_block_by_hand():
    """Two tokens, one group (L // 16 = 0 -> 1 group): the centroid is their mean, each residual
    block's sigma its RMS, codes on the Lloyd-Max levels; dequantization as the docstring says."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]])  # [L=2, D=4]
    q = kv2.quantize(x)
    assert q.centroids.shape == (1, 4) and torch.equal(
        q.centroids.float(), torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    )
    assert q.index.tolist() == [0, 0]
    r = x - 2.0  # [[-1, 0, 1, 2], [1, 0, -1, -2]]
    sigma = r.square().mean(-1).sqrt()  # sqrt(1.5) both
    scale = sigma.max() / 448
    sig_hat = (sigma / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(q.scale.reshape(()), scale)
    u = r / sig_hat[:, None]
    want_codes = torch.bucketize(u, torch.tensor(kv2.THRESHOLDS), right=True)
    # u = +-0.816 lies between the thresholds 0 and +-0.98 (levels +-0.45), +-1.63 past them (+-1.51)
    assert want_codes.tolist() == [[1, 2, 2, 3], [2, 2, 1, 0]]
    # packing: four 2-bit codes per byte, element 4i in the low bits
    packed = [int(c[0]) | int(c[1]) << 2 | int(c[2]) << 4 | int(c[3]) << 6 for c in want_codes]
    assert q.codes.reshape(-1).tolist() == packed
    levels = torch.tensor(kv2.LEVELS)
    torch.testing.assert_close(kv2.dequantize(q), 2.0 + levels[want_codes] * sig_hat[:, None], rtol=0, atol=0)


def test_golden_bytes():
    """A seeded block's stored bytes, pinned (a change of the format must change this test)."""
    x = _clustered(0, tokens=96, dim=32)
    q = kv2.quantize(x, groups=4, stages=2)
    assert q.codes.shape == (1, 2, 2, 96, 8) and q.sigma.shape == (1, 2, 2, 96, 1)
    assert q.index.shape == (1, 2, 96) and q.centroids.shape == (1, 2, 4, 32)
    h = hashlib.sha256()
    for t in (q.codes, q.sigma, q.index, q.centroids.view(torch.uint8), q.scale.view(torch.uint8)):
        h.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest()[:16] == GOLDEN


GOLDEN = "328f8080324ffab4"


def test_bytes_counted_and_under_the_target():
    """At Wan2.1-1.3B's chunk block (3 latent frames x 1560 tokens, head dim 128) one stage is
    <= 0.15x the bytes of bf16, everything included; nbytes() counts what is stored."""
    tokens, dim = 3 * 1560, 128
    assert kv2.nbytes_per_block(tokens, dim) / (2 * tokens * dim) <= 0.15
    x = torch.randn(2, 3, 200, 64)
    for stages in (1, 2):
        q = kv2.quantize(x, stages=stages)
        assert q.nbytes() == 6 * kv2.nbytes_per_block(200, 64, stages=stages)


def test_heads_are_independent_and_deterministic():
    """Quantizing all heads at once stores, per head, the bytes of quantizing that head alone
    (head-sharded SP ranks store identical bytes); twice gives the same bytes."""
    x = _clustered(1)
    q = kv2.quantize(x)
    for h in range(x.shape[1]):
        qh = kv2.quantize(x[:, h : h + 1])
        for a, b in (
            (q.codes, qh.codes),
            (q.sigma, qh.sigma),
            (q.index, qh.index),
            (q.centroids, qh.centroids),
        ):
            assert torch.equal(a[:, h : h + 1], b)
    q2 = kv2.quantize(x)
    assert torch.equal(q.codes, q2.codes) and torch.equal(q.index, q2.index)


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "zeros"])
def test_beats_naive_2bit_rtn_at_equal_bytes(kind):
    """Relative L2 error below 2-bit RTN with as many or more bytes (scale block 128 costs 0.1406x
    of bf16 at Wan2.1's block of 4680 tokens x head dim 128, kv2 0.1401x); a second stage refines
    it; all-zero blocks stay zero."""
    tokens, dim = 3 * 1560, 128
    if kind == "zeros":
        x = torch.zeros(1, 2, tokens, dim)
        assert torch.equal(kv2.fake_quantize(x), x)
        return
    x = torch.randn(1, 2, tokens, dim) if kind == "gaussian" else _clustered(2, tokens, dim)
    assert kv2.nbytes_per_block(tokens, dim) <= kv2.rtn2_nbytes_per_block(tokens, dim, 128)
    one, two = _rel(kv2.fake_quantize(x), x), _rel(kv2.fake_quantize(x, stages=2), x)
    rtn = _rel(kv2.rtn2_fake_quantize(x, 128), x)
    assert one < 0.8 * rtn, (one, rtn)
    assert two < 0.6 * one, (one, two)
    if kind == "gaussian":  # the 4-level Lloyd-Max quantizer's own error on a unit Gaussian: 0.343
        assert one == pytest.approx(0.343, abs=0.02)


def test_bad_shapes_say_what_to_fix():
    with pytest.raises(ValueError, match="multiple of 4"):
        kv2.quantize(torch.randn(2, 10, 6))
    with pytest.raises(ValueError, match="stages must be 1 or 2"):
        kv2.quantize(torch.randn(2, 10, 16), stages=3)
    with pytest.raises(ValueError, match=r"groups must be in \[1, 256\]"):
        kv2.quantize(torch.randn(2, 10, 16), groups=300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stages", [1, 2])
def test_triton_dequant_under_the_interpreter_equals_the_reference(dtype, stages):
    """vidtrain.kernels.kv2.dequantize (the Triton kernel, interpreted on CPU) gives the torch
    reference's values bit for bit, for head dims 64 and 48 (masked), blocks stacked along B."""
    pytest.importorskip("triton")
    from vidtrain import kernels

    for dim in (64, 48):
        x = _clustered(3, tokens=40, dim=dim)
        q = kv2.quantize(x, groups=4, stages=stages)
        want = kv2.dequantize(q, dtype)
        got = kernels.kv2.dequantize(q, dtype, backend="interpret")
        assert got.dtype == dtype and torch.equal(
            got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)
        )
    assert torch.equal(kernels.kv2.dequantize(q, dtype, backend="torch"), want)


@pytest.mark.gpu
@pytest.mark.parametrize("stages", [1, 2])
def test_triton_gpu_dequant_equals_the_reference(stages):
    """Compiled on CUDA: the reference's values to the last bit of a fused multiply-add."""
    from vidtrain import kernels

    x = _clustered(4, tokens=3 * 1560, dim=128).cuda()
    q = kv2.quantize(x, stages=stages)
    want = kv2.dequantize(q)
    got = kernels.kv2.dequantize(q, torch.float32, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels.kv2.dequantize(q, torch.bfloat16, backend="triton"), want.bfloat16())


# ---- the kv2 KV cache: streaming = teacher forcing with kv2 history fake-quant ------------------


def test_kv2_cache_streams_equal_to_teacher_forcing_with_kv2_history():
    """`SamplerConfig(kv_cache="kv2")` stores each chunk's K/V as a kv2 block; the streamed
    predictions equal a teacher-forced forward whose clean history is kv2 fake-quantized chunk
    by chunk (`KVFakeQuantHook(kv_format="kv2")`, what QAT with quant.kv_format=kv2 trains on),
    and differ from the bf16 history's; the cache holds fewer bytes than NVFP4's."""
    from test_kv_scale_rule import HW, TWO
    from test_sample_stream import _tf_noisy_pred

    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.quant.kv import KVFakeQuantHook
    from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context

    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    cond = debug_text_context(["a cat", "a dog"], model.cfg.text_dim, length=8)
    cfg = SamplerConfig(kv_cache="kv2", window_frames=4, sink_frames=2, timesteps=TWO)
    res = StreamingSampler(model, cfg).generate_latents([cond], [4], HW, [1, 2], trace=True)
    for step in (0, 1):
        tf = _tf_noisy_pred(model, res, cfg, step, cond, hook=KVFakeQuantHook(kv_format="kv2"))
        stream = torch.cat([ch.trace[step]["v"] for ch in res.chunks], dim=2)
        torch.testing.assert_close(stream, tf, rtol=1e-4, atol=1e-4)
    plain = _tf_noisy_pred(model, res, cfg, 1, cond)
    assert (plain - stream).abs().max() > 1e-4  # the kv2 history reaches the prediction
    nv = StreamingSampler(
        model, SamplerConfig(kv_cache="nvfp4", window_frames=4, sink_frames=2, timesteps=TWO)
    )
    nv_bytes = max(nv.generate_latents([cond], [4], HW, [1, 2]).kv_bytes_per_chunk)
    assert 0 < max(res.kv_bytes_per_chunk) < nv_bytes


def test_kv2_recipe_key_trains_and_samples_as_kv2(tmp_path):
    """quant.kv_format=kv2: QAT's history hook is kv2, and the run's checkpoints sample with the
    kv2 cache; the mse scale rule is refused with it (no NVFP4 block scales)."""
    from vidtrain.config import ConfigError, load_recipe
    from vidtrain.sample.settings import run_settings

    r = load_recipe("recipes/qat_debug.yaml", ["quant.kv_format=kv2"])
    from vidtrain.train.qat_method import QAT

    assert QAT(r).kv_hook(None).kv_format == "kv2"
    assert run_settings(r)["kv_cache"].value == "kv2"
    with pytest.raises(ConfigError, match="kv2 has no block scales"):
        load_recipe("recipes/qat_debug.yaml", ["quant.kv_format=kv2", "quant.kv_scale_rule=mse"])
