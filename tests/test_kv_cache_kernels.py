"""The sampler's NVFP4 KV cache writes and reads through the vidtrain.kernels dispatcher.

Under the Triton interpreter (CPU) the cached bytes, the history handed to attention and a whole
sampled video equal the torch reference bit for bit; on CUDA "auto" is the compiled kernel
(GPU-marked test).
"""

from __future__ import annotations

import pytest
import torch

from vidtrain.formats import nvfp4 as N
from vidtrain.models.wan import CausalWanDiT
from vidtrain.sample import kv_cache
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.tokens import MaskRule

pytest.importorskip("triton")
pytest.importorskip("vidtrain.kernels")


def _fill(cache: kv_cache.KVCache, kv: list[tuple[torch.Tensor, torch.Tensor]], tpf: int) -> list:
    """Write chunks 0..n-1 (clean passes) and return what each pass's hook handed to attention."""
    outs = []
    for chunk, (k, v) in enumerate(kv):
        cache.begin(chunk, 0, write=True)
        for layer in range(len(cache.layers)):
            q = torch.zeros(k.shape[0], k.shape[1], tpf * 3, k.shape[3], dtype=k.dtype)
            outs.append(cache.hook(layer, q, k, v, None))
    return outs


def _assert_same_q(a: N.NVFP4Tensor, b: N.NVFP4Tensor) -> None:
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
    assert torch.equal(a.amax, b.amax) and a.amax.shape == b.amax.shape
    assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_cache_interpret_equals_torch(dtype):
    g = torch.Generator().manual_seed(0)
    tpf, rule = 4, MaskRule("causal", 3, window_frames=4, sink_frames=1)
    kv = [
        tuple((torch.randn(2, 3, 3 * tpf, 32, generator=g) * (c + 1)).to(dtype) for _ in range(2))
        for c in range(4)
    ]
    ref = kv_cache.KVCache(2, rule, tpf, "nvfp4", nvfp4_backend="torch")
    got = kv_cache.KVCache(2, rule, tpf, "nvfp4", nvfp4_backend="interpret")
    out_ref, out_got = _fill(ref, kv, tpf), _fill(got, kv, tpf)
    assert ref.chunks == got.chunks and len(ref.chunks) >= 2
    for lr, lg in zip(ref.layers, got.layers):
        for j in lr:
            for a, b in zip(lr[j], lg[j]):
                assert isinstance(b, N.NVFP4Tensor)
                _assert_same_q(a, b)
                _assert_same_q(a, N.quantize_blocks(kv[j][0 if a is lr[j][0] else 1], (0, 1)))
    for (ka, va, _), (kb, vb, _) in zip(out_ref, out_got):
        assert ka.dtype == kb.dtype == dtype and ka.shape == kb.shape
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert out_ref[-1][0].shape[2] > 3 * tpf  # history was read, not only the fresh chunk


def test_sampler_latents_equal_with_interpreted_kernels(monkeypatch):
    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    cond = debug_text_context(["a cat"], model.cfg.text_dim, length=8)
    cfg = SamplerConfig(kv_cache="nvfp4", window_frames=3, sink_frames=1, timesteps=(1000.0,))

    def run(backend: str) -> torch.Tensor:
        monkeypatch.setattr(kv_cache, "NVFP4_BACKEND", backend)
        sampler = StreamingSampler(model, cfg)
        assert sampler.new_cache(4).nvfp4_backend == backend
        return sampler.generate_latents([cond], [3], (4, 4), [1]).latents_BCFHW

    a, b = run("torch"), run("interpret")
    assert torch.equal(a, b)
    # the bf16 cache differs: the NVFP4 path is really taken
    cfg = SamplerConfig(kv_cache="bf16", window_frames=3, sink_frames=1, timesteps=(1000.0,))
    assert not torch.equal(
        a, StreamingSampler(model, cfg).generate_latents([cond], [3], (4, 4), [1]).latents_BCFHW
    )


def test_unknown_backend_is_loud():
    cache = kv_cache.KVCache(1, MaskRule("causal", 3), 4, "nvfp4", nvfp4_backend="cuda-magic")
    cache.begin(0, 0, write=True)
    k = torch.randn(1, 1, 12, 16)
    with pytest.raises(ValueError, match="known"):
        cache.hook(0, k, k, k, None)


@pytest.mark.gpu
def test_nvfp4_cache_auto_is_the_compiled_kernel_on_cuda():
    from vidtrain import kernels

    assert kernels.resolve_backend(kv_cache.NVFP4_BACKEND, torch.device("cuda")) == "triton"
    g = torch.Generator().manual_seed(0)
    kv = [
        tuple(torch.randn(1, 4, 12, 128, generator=g).bfloat16().cuda() for _ in range(2)) for _ in range(3)
    ]
    rule = MaskRule("causal", 3, window_frames=6)
    ref = kv_cache.KVCache(2, rule, 4, "nvfp4", nvfp4_backend="torch")
    got = kv_cache.KVCache(2, rule, 4, "nvfp4")
    out_ref, out_got = _fill(ref, kv, 4), _fill(got, kv, 4)
    for lr, lg in zip(ref.layers, got.layers):
        for j in lr:
            for a, b in zip(lr[j], lg[j]):
                _assert_same_q(a, b)
    for (ka, va, _), (kb, vb, _) in zip(out_ref, out_got):
        assert torch.equal(ka, kb) and torch.equal(va, vb)
