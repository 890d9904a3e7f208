"""Sampler follow-ups: cross-attention K/V cached per prompt, and one exit step per chunk."""

from __future__ import annotations

import pytest
import torch

from vidtrain.models.wan import CausalWanDiT
from vidtrain.sample.sampler import Conditioning, SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.tokens import grid_meta

HW = (4, 4)
TWO = (1000.0, 500.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()


def _conds(model, masked: bool = False) -> list[Conditioning]:
    conds = [debug_text_context(p, model.cfg.text_dim, length=8) for p in (["a", "b"], ["c", "d"])]
    if masked:  # padding in the second sample's text
        mask = torch.ones(2, 8, dtype=torch.bool)
        mask[1, 5:] = False
        conds = [Conditioning(c.context_BST, mask) for c in conds]
    return conds


def _count_text_k(model):
    calls = []
    handle = model.blocks[0].cross_attn.k.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_model_cross_kv_argument_is_bit_identical(model):
    torch.manual_seed(1)
    meta = grid_meta(3, 2, 2, 3)
    x_BLP = torch.randn(2, len(meta), 4 * model.cfg.in_channels)
    t_BL = torch.full((2, len(meta)), 500.0)
    text = torch.randn(2, 8, model.cfg.text_dim)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    with torch.no_grad():
        ref = model(x_BLP, t_BL, text, meta=meta, context_mask_BS=mask)
        kv = [blk.cross_attn.kv(model.embed_text(text)) for blk in model.blocks]
        out = model(x_BLP, t_BL, None, meta=meta, context_mask_BS=mask, cross_kv=kv)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="cross_kv holds"):
        model(x_BLP, t_BL, None, meta=meta, cross_kv=kv[:1])


@pytest.mark.parametrize("recache", [False, True])
def test_cross_kv_cache_bit_identical_and_once_per_shot(model, recache):
    outs, calls = [], []
    for cached in (False, True):
        cfg = SamplerConfig(
            kv_cache="fp32", window_frames=3, shot_sink=True, timesteps=TWO, recache_on_cut=recache,
            cross_kv_cache=cached,
        )  # fmt: skip
        n, handle = _count_text_k(model)
        outs.append(StreamingSampler(model, cfg).generate_latents(_conds(model, True), [2, 2], HW, [3, 4]))
        handle.remove()
        calls.append(len(n))
    assert torch.equal(outs[0].latents_BCFHW, outs[1].latents_BCFHW)
    # 4 chunks x 2 steps + 3 cache writes (+ the re-cache of the 2 kept chunks at the cut: shot
    # sink and window); cached: once per shot
    assert calls == [11 + 2 * recache, 2]


def _grad_passes(model, sampler, exits, **kw):
    """Run with `grad_exit=exits`; returns the result and, per model pass, (t, grad enabled)."""
    passes = []
    handle = model.register_forward_pre_hook(
        lambda _, args: passes.append((round(float(args[1].flatten()[0]), 3), torch.is_grad_enabled()))
    )
    try:
        res = sampler.generate_latents(_conds(model)[0], 3, HW, [0, 1], grad_exit=exits, trace=True, **kw)
    finally:
        handle.remove()
    return res, passes


def test_per_chunk_exit_keeps_graph_only_at_own_exit(model):
    sampler = StreamingSampler(model, SamplerConfig(kv_cache="fp32", timesteps=TWO))
    t0, t1 = (round(s * 1000, 3) for s in sampler.config.sigmas())
    res, passes = _grad_passes(model, sampler, [1, 0, 1])
    assert passes == [
        (t0, False), (t1, True), (0.0, False),  # chunk 0: exits at step 1, then writes its K/V
        (t0, True), (0.0, False),  # chunk 1: exits at step 0
        (t0, False), (t1, True),  # chunk 2 (last: no cache write)
    ]  # fmt: skip
    assert [len(ch.trace) for ch in res.chunks] == [2, 1, 2]
    assert all(ch.x0_BCFHW.requires_grad for ch in res.chunks)
    for ch in res.chunks:  # each chunk's graph is its own (cached text K/V carry none)
        ch.x0_BCFHW.pow(2).mean().backward()
        assert model.blocks[0].cross_attn.k.weight.grad is not None
        model.zero_grad(set_to_none=True)


def test_int_exit_equals_list_and_bad_lists_fail(model):
    sampler = StreamingSampler(model, SamplerConfig(kv_cache="fp32", timesteps=TWO))
    a, _ = _grad_passes(model, sampler, 0, grad_chunks=[])
    b, _ = _grad_passes(model, sampler, [0, 0, 0], grad_chunks=[])
    assert torch.equal(a.latents_BCFHW, b.latents_BCFHW)
    for bad in ([0, 1], [0, 1, 2], 2, -1):
        with pytest.raises(ValueError, match="grad_exit"):
            _grad_passes(model, sampler, bad)
