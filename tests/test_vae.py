"""Causal video VAE: geometry, errors, streaming encode/decode and chunk-halo range encode (debug flavor)."""

from __future__ import annotations

import pytest
import torch

from vidtrain.models.vae import VAE_FLAVORS, CausalVideoVAE

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def vae() -> CausalVideoVAE:
    torch.manual_seed(0)
    return CausalVideoVAE.from_flavor("debug").eval()


def _video(frames: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def test_flavors_and_geometry(vae: CausalVideoVAE) -> None:
    assert set(VAE_FLAVORS) == {"debug", "wan2.1"}
    assert (vae.z_dim, vae.temporal_compression, vae.spatial_compression) == (16, 4, 8)
    with pytest.raises(ValueError, match=r"unknown VAE flavor 'nope'; known: debug, wan2.1"):
        CausalVideoVAE.from_flavor("nope")


def test_wan21_flavor_has_the_published_size() -> None:
    wan = CausalVideoVAE.from_flavor("wan2.1")
    assert sum(p.numel() for p in wan.parameters()) == 126_892_531
    assert wan.latents_std.flatten()[0].item() == pytest.approx(2.8184)


@torch.no_grad()
def test_encode_decode_shapes(vae: CausalVideoVAE) -> None:
    z = vae.encode(_video(9))
    assert z.shape == (1, 16, 3, 4, 4)
    x = vae.decode(z)
    assert x.shape == (1, 3, 9, 32, 32)
    assert x.abs().max() <= 1.0


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 8, 32, 32), "1 \\+ 4k frames"),
        ((1, 3, 9, 30, 32), "divisible by 8"),
        ((1, 4, 9, 32, 32), r"\[B, 3, T, H, W\]"),
        ((3, 9, 32, 32), r"\[B, 3, T, H, W\]"),
    ],
)
def test_encode_rejects_bad_shapes(vae: CausalVideoVAE, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_channels(vae: CausalVideoVAE) -> None:
    with pytest.raises(ValueError, match=r"\[B, 16, F, h, w\]"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4))


@torch.no_grad()
def test_one_pass_equals_wan_schedule(vae: CausalVideoVAE) -> None:
    x = _video(13)
    z = vae.encode(x)  # first frame, then 4 frames per pass
    torch.testing.assert_close(vae.encode(x, latents_per_pass=None), z, **TOL)
    torch.testing.assert_close(vae.encode(x, latents_per_pass=2), z, **TOL)
    torch.testing.assert_close(vae.decode(z, latents_per_pass=None), vae.decode(z), **TOL)


@torch.no_grad()
def test_stream_encode_equals_one_shot(vae: CausalVideoVAE) -> None:
    x = _video(21)
    enc = vae.stream_encoder()
    parts, sizes, t = [], [3, 2, 0, 1, 7, 8], 0
    for n in sizes:
        parts.append(enc.feed(x[:, :, t : t + n]))
        t += n
    enc.flush()
    assert [p.shape[2] for p in parts] == [1, 1, 0, 0, 2, 2]  # latents as they become complete
    torch.testing.assert_close(torch.cat(parts, dim=2), vae.encode(x, latents_per_pass=None), **TOL)


def test_stream_encode_leftover_frames_are_an_error(vae: CausalVideoVAE) -> None:
    enc = vae.stream_encoder()
    with torch.no_grad():
        enc.feed(_video(7))
    with pytest.raises(ValueError, match="2 pixel frames left over"):
        enc.flush()


@torch.no_grad()
def test_stream_decode_equals_one_shot(vae: CausalVideoVAE) -> None:
    z = vae.encode(_video(21))  # 6 latent frames
    dec = vae.stream_decoder()
    parts = [dec.feed(z[:, :, a:b]) for a, b in [(0, 1), (1, 3), (3, 3), (3, 6)]]
    assert [p.shape[2] for p in parts] == [1, 8, 0, 12]
    torch.testing.assert_close(torch.cat(parts, dim=2), vae.decode(z, latents_per_pass=None), **TOL)


def test_receptive_field_is_computed_from_the_architecture() -> None:
    # debug: 80 pixel frames of lookback -> 20 latent chunks; wan2.1: 112 -> 28 (see model docstring)
    assert CausalVideoVAE.from_flavor("debug").temporal_receptive_field() == 20
    assert CausalVideoVAE.from_flavor("debug", num_res_blocks=2).temporal_receptive_field() == 28
    early = CausalVideoVAE.from_flavor("debug", temporal_downsample=(True, True, False))
    assert early.temporal_receptive_field() == 23  # time halved earlier: more full-rate layers


@torch.no_grad()
def test_encode_range_exact_at_receptive_field(vae: CausalVideoVAE) -> None:
    rf = vae.temporal_receptive_field()
    n_lat = rf + 4
    x = _video(1 + 4 * (n_lat - 1), size=16)
    full = vae.encode(x)
    start, end = rf + 2, n_lat
    exact = vae.encode_range(x, start, end, halo=rf)
    torch.testing.assert_close(exact, full[:, :, start:end], **TOL)
    short = vae.encode_range(x, start, end, halo=rf - 1)  # one chunk too little: not exact
    assert (short - full[:, :, start:end]).abs().max() > 1e-6
    # a halo that reaches the first frame is exact at any size
    torch.testing.assert_close(vae.encode_range(x, 2, 5, halo=2), full[:, :, 2:5], **TOL)
    torch.testing.assert_close(vae.encode_range(x, 0, 3, halo=0), full[:, :, 0:3], **TOL)


def test_encode_range_rejects_bad_ranges(vae: CausalVideoVAE) -> None:
    x = _video(9)
    for start, end, halo in [(2, 2, 0), (0, 4, 0), (-1, 2, 0), (1, 2, -1)]:
        with pytest.raises(ValueError, match="start < end"):
            vae.encode_range(x, start, end, halo)
