"""Teacher forcing: masks from metadata, causality of the teacher-forced prediction, flow matching."""

from __future__ import annotations

import torch

from vidtrain.forcing.flow import frames_sigma, noise_latents, sample_chunk_sigmas, shift_sigma
from vidtrain.forcing.teacher import build_tf_sequence, noisy_prediction_frames, tf_loss_terms
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.tokens import MaskRule, TokenMeta, build_mask, grid_meta

FPC = 3


def tf_meta(frames: int) -> TokenMeta:
    return TokenMeta.cat([grid_meta(frames, 1, 1, FPC), grid_meta(frames, 1, 1, FPC, noisy=True)])


def test_teacher_forcing_mask_rule():
    meta = tf_meta(6)  # one token per frame: tokens 0..5 clean, 6..11 noisy; chunks of 3 frames
    m = build_mask(MaskRule("teacher_forcing", FPC), meta, meta)
    clean, noisy = slice(0, 6), slice(6, 12)
    # clean q sees clean k of chunks <= its own
    assert m[clean, clean].tolist()[0] == [True] * 3 + [False] * 3
    assert m[clean, clean].tolist()[5] == [True] * 6
    assert not m[clean, noisy].any()
    # noisy q sees earlier clean chunks and noisy keys of its own chunk only
    assert m[noisy, clean].tolist()[0] == [False] * 6
    assert m[noisy, clean].tolist()[4] == [True] * 3 + [False] * 3
    assert m[noisy, noisy].tolist()[4] == [False] * 3 + [True] * 3


def test_mask_is_a_function_of_metadata_not_positions():
    meta = tf_meta(6)
    perm = torch.randperm(len(meta))
    rule = MaskRule("teacher_forcing", FPC)
    m, mp = build_mask(rule, meta, meta), build_mask(rule, meta.index(perm), meta.index(perm))
    assert torch.equal(mp, m[perm][:, perm])


def test_window_and_sinks_restrict_history_only():
    meta = grid_meta(12, 1, 1, FPC)  # 4 chunks, causal rule over one copy
    rule = MaskRule("causal", FPC, window_frames=3, sink_frames=3)
    m = build_mask(rule, meta, meta)
    # chunk 3 (frames 9..11): sink frames 0..2, window frames 6..8, itself; not chunk 1 (3..5)
    assert m[9].tolist() == [True] * 3 + [False] * 3 + [True] * 6
    shots = grid_meta(12, 1, 1, FPC, shot=torch.tensor([0] * 6 + [1] * 6))
    m2 = build_mask(MaskRule("causal", FPC, window_frames=0, shot_sink=True), shots, shots)
    # chunk 3 sees the first chunk of its shot (chunk 2, frames 6..8) and itself
    assert m2[9].tolist() == [False] * 6 + [True] * 6


def test_teacher_forced_prediction_is_causal():
    """Prediction of chunk i: unchanged by later chunks and other chunks' noisy tokens; changed by
    earlier clean chunks."""
    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug").eval()
    b, f, h, w = 1, 9, 4, 4
    x0, noise, ctx = torch.randn(b, 16, f, h, w), torch.randn(b, 16, f, h, w), torch.randn(b, 4, 32)
    sigma = frames_sigma(torch.tensor([[0.3, 0.6, 0.9]]), FPC)

    def predict(x0_, noise_):
        seq = build_tf_sequence(x0_, noise_, sigma, FPC)
        attn = AttentionContext(rule=MaskRule("teacher_forcing", FPC), meta=seq.meta)
        with torch.no_grad():
            out = model(seq.x_BLP, seq.t_BL, ctx, meta=seq.meta, attn=attn)
        return noisy_prediction_frames(out, seq, f, h, w)

    base = predict(x0, noise)
    later = x0.clone()
    later[:, :, 6:] += 1.0  # change chunk 2 (clean and, through x_t, noisy)
    other_noise = noise.clone()
    other_noise[:, :, 6:] = torch.randn_like(other_noise[:, :, 6:])  # noisy tokens of chunk 2 only
    earlier = x0.clone()
    earlier[:, :, :3] += 1.0  # clean chunk 0 changes (and chunk 0's noisy input)
    p_later, p_noise, p_early = predict(later, noise), predict(x0, other_noise), predict(earlier, noise)
    chunk1 = slice(3, 6)
    torch.testing.assert_close(p_later[:, :, chunk1], base[:, :, chunk1], rtol=0, atol=0)
    torch.testing.assert_close(p_noise[:, :, :6], base[:, :, :6], rtol=0, atol=0)
    assert (p_early[:, :, chunk1] - base[:, :, chunk1]).abs().max() > 1e-3


def test_flow_matching_definitions():
    x0, eps = torch.randn(1, 2, 3, 2, 2), torch.randn(1, 2, 3, 2, 2)
    sig = torch.tensor([[0.0, 0.5, 1.0]])
    xt = noise_latents(x0, eps, sig)
    torch.testing.assert_close(xt[:, :, 0], x0[:, :, 0])
    torch.testing.assert_close(xt[:, :, 1], 0.5 * x0[:, :, 1] + 0.5 * eps[:, :, 1])
    torch.testing.assert_close(xt[:, :, 2], eps[:, :, 2])
    s = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_sigma(s, 5.0), torch.tensor([0.0, 5 / 6, 1.0]))
    g = torch.Generator().manual_seed(0)
    sig = sample_chunk_sigmas(64, 4, shift=5.0, min_t=20, max_t=980, generator=g)
    assert sig.shape == (64, 4) and sig.min() >= 0.02 and sig.max() <= 0.98
    assert sig.mean() > 0.6  # the shift spends most samples at high noise


def test_loss_counts_noisy_tokens_only():
    x0, eps = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 3, 4, 4)
    seq = build_tf_sequence(x0, eps, torch.full((1, 3), 0.5), FPC)
    sq, n = tf_loss_terms(seq.target_BLP.clone(), seq)
    assert sq == 0 and n == 3 * 4 * 16 * 4
    pred = seq.target_BLP.clone()
    pred[:, ~seq.meta.noisy] += 100.0  # errors on clean tokens are ignored
    assert tf_loss_terms(pred, seq)[0] == 0
