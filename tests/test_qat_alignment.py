"""QAT training-inference alignment: W4A4 forward = deployment weights, KV hook = NVFP4 cache.

Legend: B batch, C channels, F latent frames, H/W latent size, L tokens, P patch vector.
"""

from __future__ import annotations

import copy

import pytest
import torch

from vidtrain.config import load_recipe
from vidtrain.forcing.flow import NUM_TRAIN_TIMESTEPS, noise_latents
from vidtrain.forcing.teacher import build_tf_sequence, noisy_prediction_frames
from vidtrain.formats import nvfp4 as N
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.quant.convert import convert_for_recipe
from vidtrain.quant.kv import KVFakeQuantHook, fake_quantize_kv_grouped
from vidtrain.quant.qat import export_weights
from vidtrain.tokens import MaskRule, grid_meta

FPC, F, H, W, B = 3, 9, 4, 4, 2  # 3 chunks of 3 latent frames, 4 tokens per frame


def _model(seed: int = 0) -> CausalWanDiT:
    torch.manual_seed(seed)
    return CausalWanDiT.from_flavor("debug").eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 16, F, H, W, generator=g)
    noise = torch.randn(B, 16, F, H, W, generator=g)
    sigma_BF = torch.tensor([[0.9, 0.5, 0.3], [0.7, 0.6, 0.2]]).repeat_interleave(FPC, dim=1)
    text = torch.randn(B, 4, 32, generator=g)
    return x0, noise, sigma_BF, text


# ---- (a) W4A4 forward = weights quantized once (deployment) + activation fake-quant ----------


def test_qat_forward_equals_deployment_weights():
    qat_model = _model()
    deployed = copy.deepcopy(qat_model)
    convert_for_recipe(qat_model, load_recipe(None, []).quant, torch.device("cpu"))
    packed = export_weights(qat_model)
    assert len(packed) == 2 * 10  # per block: self q,k,v,o + cross q,k,v,o + ffn.0, ffn.2
    for key, q in packed.items():
        lin = deployed.get_submodule(key.removesuffix(".weight"))
        with torch.no_grad():
            lin.weight.copy_(N.dequantize(q))
        lin.register_forward_pre_hook(lambda m, args: (N.fake_quantize_rows(args[0]),))
    x0, _, _, text = _inputs()
    t = torch.tensor([300.0, 700.0])
    rule = MaskRule("causal", FPC)
    with torch.no_grad():
        got = qat_model(x0, t, text, rule=rule, frames_per_chunk=FPC)
        want = deployed(x0, t, text, rule=rule, frames_per_chunk=FPC)
        plain = _model()(x0, t, text, rule=rule, frames_per_chunk=FPC)
    assert torch.equal(got, want)
    assert (got - plain).abs().max() > 1e-3  # the quantization is really there


# ---- (b) teacher forcing + KV hook = chunk-by-chunk generation with an NVFP4 KV cache --------


class NVFP4CacheHook:
    """Reference KV cache: each chunk's K/V stored as the sampler does (per (batch, head, chunk)
    amax via `quantize_blocks(group_dims=(0, 1))`), prepended to the fresh K/V of the call."""

    def __init__(self, quantize: bool = True) -> None:
        self.quantize = quantize
        self.cache: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.visible: list[int] = []
        self.write_chunk: int | None = None

    def store(self, x: torch.Tensor) -> torch.Tensor:
        return N.fake_quantize_kv(x, group_dims=(0, 1)) if self.quantize else x

    def __call__(self, layer, q, k, v, ctx):
        layer_cache = self.cache.setdefault(layer, {})
        hist = [layer_cache[c] for c in self.visible]
        if self.write_chunk is not None:
            layer_cache[self.write_chunk] = (self.store(k), self.store(v))
        ks = torch.cat([h[0] for h in hist] + [k], dim=2)
        vs = torch.cat([h[1] for h in hist] + [v], dim=2)
        return ks, vs, None


def _visible_chunks(c: int, window: int | None, sink: int) -> list[int]:
    if window is None:
        return list(range(c))
    return [j for j in range(c) if j * FPC >= c * FPC - window or (j + 1) * FPC <= sink]


def _chunkwise(model, x0, noise, sigma_BF, text, hook: NVFP4CacheHook, window=None, sink=0):
    """Per chunk: predict the noisy chunk from the cache, then a t=0 pass writes the clean chunk."""
    x_t = noise_latents(x0, noise, sigma_BF)
    hp, wp, outs = H // 2, W // 2, []
    for c in range(F // FPC):
        fr = slice(c * FPC, (c + 1) * FPC)
        meta = grid_meta(FPC, hp, wp, FPC, frame_offset=c * FPC)
        attn = AttentionContext(rule=MaskRule("full"), meta=meta, kv_hook=hook)
        hook.visible, hook.write_chunk = _visible_chunks(c, window, sink), None
        t_BL = (sigma_BF[:, fr] * NUM_TRAIN_TIMESTEPS).repeat_interleave(hp * wp, dim=1)
        pred = model(CausalWanDiT.patchify(x_t[:, :, fr]), t_BL, text, meta=meta, attn=attn)
        outs.append(CausalWanDiT.unpatchify(pred, FPC, H, W))
        hook.write_chunk = c
        attn = AttentionContext(rule=MaskRule("full"), meta=meta, kv_hook=hook)
        model(CausalWanDiT.patchify(x0[:, :, fr]), torch.zeros_like(t_BL), text, meta=meta, attn=attn)
    return torch.cat(outs, dim=2)


def _teacher_forced(model, x0, noise, sigma_BF, text, hook, rule, perm=None):
    seq = build_tf_sequence(x0, noise, sigma_BF, FPC)
    perm = torch.arange(len(seq.meta)) if perm is None else perm  # a layout is a permutation
    run = seq.index(perm)
    attn = AttentionContext(rule=rule, meta=run.meta, kv_hook=hook)
    pred = model(run.x_BLP, run.t_BL, text, meta=run.meta, attn=attn)
    pred_in_order = torch.empty_like(pred)
    pred_in_order[:, perm] = pred
    return noisy_prediction_frames(pred_in_order, seq, F, H, W)


@pytest.mark.parametrize("window,sink", [(None, 0), (3, 3)])
def test_kv_hook_equals_chunkwise_nvfp4_cache(window, sink):
    model = _model()
    x0, noise, sigma_BF, text = _inputs()
    rule = MaskRule("teacher_forcing", FPC, window_frames=window, sink_frames=sink)
    with torch.no_grad():
        ref = _chunkwise(model, x0, noise, sigma_BF, text, NVFP4CacheHook(), window, sink)
        got = _teacher_forced(model, x0, noise, sigma_BF, text, KVFakeQuantHook(), rule)
        plain = _teacher_forced(model, x0, noise, sigma_BF, text, None, rule)
        if window is None:  # the TF <-> sampler tie without quantization, for contrast
            plain_ref = _chunkwise(model, x0, noise, sigma_BF, text, NVFP4CacheHook(quantize=False))
            torch.testing.assert_close(plain, plain_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # KV quantization changes the prediction


def test_kv_hook_own_chunk_stays_unquantized():
    """Quantizing the clean query's own chunk too (the easy mistake) does not match the cache."""

    def quantize_all_clean(layer, q, k, v, ctx):
        p = KVFakeQuantHook().plan(ctx)
        k, v = k.clone(), v.clone()
        k[:, :, p.clean_idx] = fake_quantize_kv_grouped(k[:, :, p.clean_idx], p.group, p.n_groups)
        v[:, :, p.clean_idx] = fake_quantize_kv_grouped(v[:, :, p.clean_idx], p.group, p.n_groups)
        return k, v, ctx.mask()

    model = _model()
    x0, noise, sigma_BF, text = _inputs()
    rule = MaskRule("teacher_forcing", FPC)
    with torch.no_grad():
        ref = _chunkwise(model, x0, noise, sigma_BF, text, NVFP4CacheHook())
        wrong = _teacher_forced(model, x0, noise, sigma_BF, text, quantize_all_clean, rule)
    assert (wrong - ref).abs().max() > 1e-3


def test_kv_hook_is_layout_invariant():
    model = _model()
    x0, noise, sigma_BF, text = _inputs()
    rule = MaskRule("teacher_forcing", FPC)
    perm = torch.randperm(2 * F * (H // 2) * (W // 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = _teacher_forced(model, x0, noise, sigma_BF, text, KVFakeQuantHook(), rule, perm)
        want = _teacher_forced(model, x0, noise, sigma_BF, text, KVFakeQuantHook(), rule)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_fake_quant_is_the_cache_format_and_head_shard_invariant():
    g = torch.Generator().manual_seed(0)
    x_BHLD = torch.randn(2, 4, 30, 32, generator=g) * torch.rand(1, 4, 30, 1, generator=g) * 10
    group = torch.randint(0, 3, (30,), generator=g)
    got = fake_quantize_kv_grouped(x_BHLD, group, 3)
    for c in range(3):  # gather each chunk's tokens as one cache block
        idx = torch.nonzero(group == c).squeeze(1)
        block = N.fake_quantize_kv(x_BHLD[:, :, idx], group_dims=(0, 1))
        assert torch.equal(got[:, :, idx], block)
    shard = fake_quantize_kv_grouped(x_BHLD[:, 2:], group, 3)  # a Ulysses rank's heads
    assert torch.equal(shard, got[:, 2:])


def test_kv_hook_gradient_is_straight_through():
    x = torch.randn(1, 2, 8, 16, requires_grad=True)
    ctx = AttentionContext(rule=MaskRule("causal", 1), meta=grid_meta(4, 1, 2, 1))
    k, _v, mask = KVFakeQuantHook()(0, x, x, x, ctx)
    assert k.shape == (1, 2, 16, 16) and mask.shape == (8, 16)
    k.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))  # once quantized, once fresh
