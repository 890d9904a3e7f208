"""The streaming sampler against teacher forcing: same model, same chunks, same predictions."""

from __future__ import annotations

import pytest
import torch

from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.quant.kv import KVFakeQuantHook
from vidtrain.sample.kv_cache import visible_frames
from vidtrain.sample.sampler import Conditioning, SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.tokens import MaskRule, TokenMeta, grid_meta

HW = (4, 4)  # latent height/width: 4 tokens per frame
TWO = (1000.0, 500.0)  # two denoising steps keep the slower tests short


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()


def _cond(model, prompts=("a cat", "a dog")) -> Conditioning:
    return debug_text_context(list(prompts), model.cfg.text_dim, length=8)


def _sample(model, cfg, chunks=(4,), conds=None, seeds=(1, 2), **kw):
    conds = conds or [_cond(model)] * len(chunks)
    return StreamingSampler(model, cfg).generate_latents(
        conds, list(chunks), HW, list(seeds), trace=True, **kw
    )


def _tf_noisy_pred(model, res, cfg: SamplerConfig, step: int, cond, shot_F=None, rope_F=None, hook=None):
    """Teacher-forced predictions of the noisy copies: clean = the sampler's final chunks,
    noisy = the sampler's input of `step` in every chunk."""
    x0 = res.latents_BCFHW
    b, _, f, h, w = x0.shape
    c, tpf = cfg.frames_per_chunk, (h // 2) * (w // 2)
    xt = torch.cat([ch.trace[step]["x_t"] for ch in res.chunks], dim=2)
    t_F = torch.tensor([ch.trace[step]["t"] for ch in res.chunks]).repeat_interleave(c)
    kw = {"shot": shot_F if shot_F is not None else 0, "rope_offset": rope_F if rope_F is not None else 0}
    meta = TokenMeta.cat(
        [
            grid_meta(f, h // 2, w // 2, c, noisy=False, **kw),
            grid_meta(f, h // 2, w // 2, c, noisy=True, **kw),
        ]
    )
    x_BLP = torch.cat([model.patchify(x0), model.patchify(xt)], dim=1)
    t_BL = torch.cat([torch.zeros(f * tpf), t_F.repeat_interleave(tpf)])[None].expand(b, -1)
    r = cfg.rule()
    rule = MaskRule("teacher_forcing", c, r.window_frames, r.sink_frames, r.shot_sink)
    with torch.no_grad():
        pred = model(x_BLP, t_BL, cond.context_BST, meta=meta, attn=AttentionContext(rule, meta, hook))
    return model.unpatchify(pred[:, f * tpf :], f, h, w)


def _stream_pred(res, step):
    return torch.cat([ch.trace[step]["v"] for ch in res.chunks], dim=2)


@pytest.mark.parametrize("update", ["x0", "euler"])
def test_stream_equals_teacher_forcing_full_history(model, update):
    cfg = SamplerConfig(
        kv_cache="fp32", update=update, timesteps=(1000.0, 750.0, 500.0, 250.0)[: 4 if update == "x0" else 3]
    )
    res = _sample(model, cfg)
    for step in range(len(cfg.timesteps)):
        tf = _tf_noisy_pred(model, res, cfg, step, _cond(model))
        torch.testing.assert_close(_stream_pred(res, step), tf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,sinks,shot_sink", [(3, 0, False), (4, 2, False), (0, 1, True), (5, 0, True)])
def test_stream_equals_teacher_forcing_window_sinks(model, window, sinks, shot_sink):
    cfg = SamplerConfig(
        kv_cache="fp32", window_frames=window, sink_frames=sinks, shot_sink=shot_sink, timesteps=TWO
    )
    chunks = (2, 3)  # two shots with one prompt (TF has one text context): shot sinks still move
    res = _sample(model, cfg, chunks=chunks)
    shot_F = torch.tensor([0] * 6 + [1] * 9)
    for step in (0, 1):
        tf = _tf_noisy_pred(model, res, cfg, step, _cond(model), shot_F=shot_F)
        torch.testing.assert_close(_stream_pred(res, step), tf, rtol=1e-5, atol=1e-5)


def test_per_shot_rope_offset_matches_teacher_forcing(model):
    cfg = SamplerConfig(kv_cache="fp32", window_frames=3, shot_sink=True, shot_rope_offset=7, timesteps=TWO)
    res = _sample(model, cfg, chunks=(1, 2))
    shot_F = torch.tensor([0] * 3 + [1] * 6)
    tf = _tf_noisy_pred(model, res, cfg, 1, _cond(model), shot_F=shot_F, rope_F=shot_F * 7)
    torch.testing.assert_close(_stream_pred(res, 1), tf, rtol=1e-5, atol=1e-5)


def test_nvfp4_cache_equals_teacher_forcing_with_fake_quant_history(model):
    cfg = SamplerConfig(kv_cache="nvfp4", window_frames=4, sink_frames=2, timesteps=TWO)
    res = _sample(model, cfg)
    for step in (0, 1):
        tf = _tf_noisy_pred(model, res, cfg, step, _cond(model), hook=KVFakeQuantHook())
        torch.testing.assert_close(_stream_pred(res, step), tf, rtol=1e-4, atol=1e-4)
    # and it is not the unquantized prediction (the test would be vacuous otherwise)
    plain = _tf_noisy_pred(model, res, cfg, 1, _cond(model))
    assert (plain - _stream_pred(res, 1)).abs().max() > 1e-4


def test_nvfp4_cache_bytes_and_difference(model):
    res = {
        k: _sample(model, SamplerConfig(kv_cache=k, window_frames=6, timesteps=TWO))
        for k in ("bf16", "nvfp4")
    }
    ratio = max(res["nvfp4"].kv_bytes_per_chunk) / max(res["bf16"].kv_bytes_per_chunk)
    assert 0.28 <= ratio <= 0.30
    a, b = res["bf16"].latents_BCFHW, res["nvfp4"].latents_BCFHW
    assert (a - b).norm() / a.norm() < 0.2


def test_seeds_batch_independent_and_repeatable(model):
    cfg = SamplerConfig(kv_cache="fp32", window_frames=3, timesteps=TWO)
    cond2 = debug_text_context(["a cat", "a cat"], model.cfg.text_dim, length=8)
    both = _sample(model, cfg, chunks=(2,), conds=[cond2], seeds=(5, 6)).latents_BCFHW
    assert (both[0] - both[1]).abs().max() > 1e-3  # same prompt, different seeds: different samples
    alone = _sample(model, cfg, chunks=(2,), conds=[_cond(model, ["a cat"])], seeds=(6,)).latents_BCFHW
    torch.testing.assert_close(alone[0], both[1], rtol=1e-5, atol=1e-5)  # sample = f(seed, prompt)


def test_cache_memory_constant_after_window_fills(model):
    cfg = SamplerConfig(kv_cache="bf16", window_frames=6, sink_frames=3, shot_sink=True, timesteps=(1000.0,))
    res = _sample(model, cfg, chunks=(4, 6), seeds=(0,), conds=[_cond(model, ["a"]), _cond(model, ["b"])])
    kv = res.kv_bytes_per_chunk
    assert kv[0] == 0 and kv[1] < kv[2]
    # from chunk 7 on: window (chunks c-2, c-1) + global sink (0) + shot sink (4): four blocks, flat
    assert len(set(kv[7:])) == 1 and max(kv) == kv[-1] == 4 * kv[1]


def test_cut_repins_shot_sink(model):
    cfg = SamplerConfig(kv_cache="fp32", window_frames=3, shot_sink=True, timesteps=(1000.0,))
    sampler = StreamingSampler(model, cfg)
    conds = [_cond(model, ["a"]), _cond(model, ["b"])]
    seen = {}
    cache_chunks = []
    orig = sampler.new_cache

    def spy(tpf):
        cache = orig(tpf)
        cache_chunks.append(cache)
        return cache

    sampler.new_cache = spy
    for ch in sampler.stream(conds, [3, 3], HW, [0]):
        seen[ch.index] = list(cache_chunks[0].chunks)
    # chunk 2 (shot 0, start 0): window chunk 1 + shot sink 0; after the cut at chunk 3 the sink is 3
    assert seen[2] == [0, 1, 2] or seen[2][:2] == [0, 1]
    assert cache_chunks[0].shot_start == {0: 0, 1: 3}
    assert 0 not in seen[5] and 3 in seen[5]


def test_visible_frames_rule_matches_mask_rule():
    rule = MaskRule("causal", 3, window_frames=4, sink_frames=2, shot_sink=True)
    frames = torch.arange(0, 18)
    vis = visible_frames(rule, chunk=6, shot_start_chunk=2, frames=frames)
    assert torch.nonzero(vis).squeeze(1).tolist() == [0, 1, 6, 7, 8, 14, 15, 16, 17]


def test_recache_on_cut_changes_kv_only_after_cut(model):
    base = dict(kv_cache="fp32", window_frames=3, shot_sink=True, timesteps=TWO)
    conds = [_cond(model, ["a"]), _cond(model, ["b"])]
    plain = _sample(model, SamplerConfig(**base), chunks=(2, 2), conds=conds, seeds=(0,)).latents_BCFHW
    rec = _sample(model, SamplerConfig(**base, recache_on_cut=True), chunks=(2, 2), conds=conds, seeds=(0,))
    torch.testing.assert_close(rec.latents_BCFHW[:, :, :6], plain[:, :, :6])
    assert (rec.latents_BCFHW[:, :, 6:] - plain[:, :, 6:]).abs().max() > 1e-6


def test_grad_exit_keeps_graph_only_at_exit(model):
    cfg = SamplerConfig(kv_cache="bf16", window_frames=3, timesteps=TWO)
    res = StreamingSampler(model, cfg).generate_latents(
        _cond(model), 3, HW, [0, 1], grad_exit=1, grad_chunks=[2]
    )
    assert [ch.x0_BCFHW.requires_grad for ch in res.chunks] == [False, False, True]
    res.chunks[2].x0_BCFHW.pow(2).mean().backward()
    assert model.blocks[0].self_attn.q.weight.grad is not None
    model.zero_grad(set_to_none=True)
