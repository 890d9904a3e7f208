"""`vidtrain sample --compile`: the padded, fixed-shape KV history equals the exact one, and the
compiled model forward streams the eager path's latents (within float tolerance), compiling no
new graph for a longer video."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from vidtrain.models.wan import CausalWanDiT
from vidtrain.sample import kv_cache
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.tokens import MaskRule

TPF = 4


@pytest.mark.parametrize("kv_dtype", ["fp32", "nvfp4", "fp8"])
def test_static_cache_pads_to_one_length_and_attends_alike(kv_dtype):
    """Static mode: every pass gets K/V of (capacity - 1) chunks + the chunk's tokens, the visible
    history first, the chunk last, a key mask over the rest; attention equals the exact cache's."""
    rule = MaskRule("causal", 3, window_frames=4, sink_frames=1, shot_sink=True)
    exact = kv_cache.KVCache(2, rule, TPF, kv_dtype, nvfp4_backend="torch")
    static = kv_cache.KVCache(2, rule, TPF, kv_dtype, nvfp4_backend="torch", static=True)
    g = torch.Generator().manual_seed(0)
    lc = 3 * TPF
    n = (kv_cache.history_slots(rule) - 1) * lc + lc
    shots = [0] * 5 + [1] * 4 + [2] * 3
    with torch.no_grad():
        for chunk, shot in enumerate(shots):
            q, k, v = (torch.randn(1, 2, lc, 32, generator=g) for _ in range(3))
            for cache in (exact, static):
                cache.begin(chunk, shot, write=True)
            for layer in range(2):
                ek, ev, emask = exact.hook(layer, q, k, v, None)
                sk, sv, smask = static.hook(layer, q, k, v, None)
                assert emask is None and sk.shape[2] == n and smask.shape == (1, n)
                h = ek.shape[2] - lc
                assert smask.sum() == ek.shape[2] and smask[0, :h].all() and smask[0, n - lc :].all()
                assert torch.equal(sk[:, :, :h], ek[:, :, :h]) and torch.equal(sk[:, :, n - lc :], k)
                assert torch.equal(sv[:, :, :h], ev[:, :, :h]) and torch.equal(sv[:, :, n - lc :], v)
                want = F.scaled_dot_product_attention(q, ek, ev)
                got = F.scaled_dot_product_attention(q, sk, sv, attn_mask=smask)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_static_needs_a_window_and_no_autograd():
    assert not kv_cache.KVCache(1, MaskRule("causal", 3), TPF, static=True).static  # unbounded
    cache = kv_cache.KVCache(1, MaskRule("causal", 3, window_frames=3), TPF, "fp32", static=True)
    k = torch.randn(1, 1, 3 * TPF, 16, requires_grad=True)
    cache.begin(0, 0, write=True)
    with torch.no_grad():
        cache.hook(0, k, k, k, None)
    cache.begin(1, 0, write=False)
    out_k, _, mask = cache.hook(0, k, k, k, None)  # with autograd: the exact history, no mask
    assert mask is None and out_k.shape[2] == 2 * 3 * TPF and out_k.requires_grad


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_forward_streams_the_eager_latents():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    cond = debug_text_context(["a cat"], model.cfg.text_dim, length=8)
    kw = dict(kv_cache="nvfp4", window_frames=6, sink_frames=3, timesteps=(1000.0, 500.0))

    def run(n: int, **extra) -> torch.Tensor:
        sampler = StreamingSampler(model, SamplerConfig(**kw, **extra))
        return sampler.generate_latents([cond], [n], (4, 4), [0]).latents_BCFHW

    eager = run(5)
    compiled = run(5, compile=True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    longer = run(8, compile=True)  # a new sampler and cache, three more chunks
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled: shapes are static
    torch.testing.assert_close(longer[:, :, : eager.shape[2]], eager, atol=1e-5, rtol=1e-5)
