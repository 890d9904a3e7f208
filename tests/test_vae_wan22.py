"""Wan2.2 VAE: equality with diffusers' AutoencoderKLWan in its Wan2.2 configuration, the original
`Wan2.2_VAE.pth` layout, streaming and chunk-halo encode, latent statistics that fit z_dim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vidtrain.models.vae import ALL_VAE_FLAVORS, VAE_FLAVORS, WAN22_VAE_FLAVORS, CausalVideoVAE, VAEConfig
from vidtrain.models.vae.model import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, patchify, unpatchify
from vidtrain.models.vae.weights import config_from_diffusers, config_from_original, export_state_dict

TOL = {"atol": 1e-5, "rtol": 1e-5}
R = 2  # res blocks per level of the diffusers peer (Wan2.2's own number)


@pytest.fixture(scope="module")
def vae() -> CausalVideoVAE:
    torch.manual_seed(0)
    return CausalVideoVAE.from_flavor("wan2.2-debug").eval()


def _video(frames: int, h: int = 32, w: int = 48, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1


# ---- flavors, geometry, the z_dim fix -----------------------------------------------------------
def test_flavors_and_geometry(vae: CausalVideoVAE) -> None:
    assert set(WAN22_VAE_FLAVORS) == {"wan2.2", "wan2.2-debug"}
    assert set(ALL_VAE_FLAVORS) == set(VAE_FLAVORS) | set(WAN22_VAE_FLAVORS)
    assert (vae.z_dim, vae.temporal_compression, vae.spatial_compression) == (48, 4, 16)
    with pytest.raises(ValueError, match=r"known: debug, wan2\.1, wan2\.2, wan2\.2-debug"):
        CausalVideoVAE.from_flavor("wan2.3")


def test_wan22_flavor_has_the_published_size() -> None:
    with torch.device("meta"):  # 705M parameters: sizes only
        wan = CausalVideoVAE.from_flavor("wan2.2")
    c = wan.config
    assert (c.base_dim, c.decoder_dim, c.z_dim, c.patch_size, c.residual) == (160, 256, 48, 2, True)
    assert sum(p.numel() for p in wan.parameters()) == 704_688_668  # = diffusers' Wan2.2 AutoencoderKLWan
    assert (wan.temporal_compression, wan.spatial_compression) == (4, 16)
    assert wan.temporal_receptive_field() == 28
    assert c.latents_mean[:2] == (-0.2289, -0.0052) and c.latents_std[-1] == 0.7744


def test_config_readers_accept_any_z_dim() -> None:
    # used to raise: the config was built with Wan2.1's 16 statistics before they were replaced
    stats = {"latents_mean": [0.5] * 48, "latents_std": [2.0] * 48}
    cfg = config_from_diffusers({"base_dim": 8, "z_dim": 48, **stats})
    assert cfg.z_dim == 48 and cfg.latents_mean == (0.5,) * 48
    assert config_from_diffusers({"z_dim": 48}).latents_std == WAN22_LATENTS_STD  # none given: Wan2.2's
    assert config_from_diffusers({"z_dim": 4}).latents_std == (1.0,) * 4  # unknown z_dim: identity
    small = VAEConfig(8, 4, (1, 2, 2, 2), 1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    assert config_from_original(export_state_dict(CausalVideoVAE(small), "original")) == small
    wan22 = config_from_original(export_state_dict(CausalVideoVAE.from_flavor("wan2.2-debug"), "original"))
    assert wan22 == WAN22_VAE_FLAVORS["wan2.2-debug"]


def test_statistics_mismatch_is_a_one_line_error(tmp_path: Path) -> None:
    pat = r"latent statistics do not fit z_dim=48: latents_mean/std need z_dim=48 entries, got 16/16"
    with pytest.raises(ValueError, match=pat) as err:
        config_from_diffusers({"z_dim": 48, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"do not fit z_dim=16: .* got 48/48"):
        CausalVideoVAE.from_flavor("wan2.2", z_dim=16)
    # a diffusers folder whose config.json keeps diffusers' default (Wan2.1) statistics for z_dim 48
    stats16 = {"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
    (tmp_path / "config.json").write_text(json.dumps({"z_dim": 48, **stats16}))
    with pytest.raises(ValueError, match=r"config\.json: VAE latent statistics do not fit z_dim=48"):
        CausalVideoVAE.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="latents_mean and latents_std come together; got only mean"):
        config_from_diffusers({"z_dim": 48, "latents_mean": [0.0] * 48})


def test_patchify_is_wan22s_pixel_order() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(1, 2, 3, 4, 6)
    p = patchify(x, 2)
    assert p.shape == (1, 8, 3, 2, 3)
    # channel c*4 + dx*2 + dy holds pixel (2y+dy, 2x+dx)
    assert p[0, 1 * 4 + 1 * 2 + 0, 2, 1, 2] == x[0, 1, 2, 2, 5]
    assert p[0, 0 * 4 + 0 * 2 + 1, 0, 0, 1] == x[0, 0, 0, 1, 2]
    assert torch.equal(unpatchify(p, 2), x)


# ---- shapes and streaming -----------------------------------------------------------------------
@torch.no_grad()
def test_encode_decode_shapes_and_bad_sizes(vae: CausalVideoVAE) -> None:
    z = vae.encode(_video(9))
    assert z.shape == (1, 48, 3, 2, 3)
    x = vae.decode(z)
    assert x.shape == (1, 3, 9, 32, 48) and x.abs().max() <= 1.0
    with pytest.raises(ValueError, match="divisible by 16, got 40x48"):
        vae.encode(_video(9, h=40))
    with pytest.raises(ValueError, match=r"\[B, 48, F, h, w\]"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))


@torch.no_grad()
def test_one_pass_equals_wan_schedule(vae: CausalVideoVAE) -> None:
    x = _video(13)
    z = vae.encode(x)  # Wan2.2's schedule: first frame, then 4 frames per pass
    torch.testing.assert_close(vae.encode(x, latents_per_pass=None), z, **TOL)
    torch.testing.assert_close(vae.encode(x, latents_per_pass=3), z, **TOL)
    torch.testing.assert_close(vae.decode(z, latents_per_pass=None), vae.decode(z), **TOL)
    torch.testing.assert_close(vae.decode(z, latents_per_pass=2), vae.decode(z), **TOL)


@torch.no_grad()
def test_stream_encode_and_decode_equal_one_shot(vae: CausalVideoVAE) -> None:
    x = _video(21, h=16, w=32)
    enc = vae.stream_encoder()
    parts, t = [], 0
    for n in [3, 2, 0, 1, 7, 8]:
        parts.append(enc.feed(x[:, :, t : t + n]))
        t += n
    enc.flush()
    assert [p.shape[2] for p in parts] == [1, 1, 0, 0, 2, 2]
    z = vae.encode(x, latents_per_pass=None)
    torch.testing.assert_close(torch.cat(parts, dim=2), z, **TOL)
    dec = vae.stream_decoder()
    out = [dec.feed(z[:, :, a:b]) for a, b in [(0, 1), (1, 3), (3, 3), (3, 6)]]
    assert [p.shape[2] for p in out] == [1, 8, 0, 12]
    torch.testing.assert_close(torch.cat(out, dim=2), vae.decode(z, latents_per_pass=None), **TOL)


def test_receptive_field_is_computed_from_the_architecture() -> None:
    # the shortcuts (1 and 2*f+1 frames back) never reach past the convolution path: the same
    # lookback as Wan2.1 of the same depth (wan2.2 = wan2.1 = 28 latent frames)
    assert CausalVideoVAE.from_flavor("wan2.2-debug").temporal_receptive_field() == 20
    assert CausalVideoVAE.from_flavor("wan2.2-debug", num_res_blocks=2).temporal_receptive_field() == 28


@pytest.mark.parametrize("res_blocks", [1, 2])  # 2: Wan2.2's own temporal structure (receptive field 28)
@torch.no_grad()
def test_encode_range_exact_at_receptive_field(res_blocks: int) -> None:
    torch.manual_seed(0)  # float64: the one-chunk-short error (~1e-8 .. 1e-11) stands clear of rounding
    vae = CausalVideoVAE.from_flavor("wan2.2-debug", num_res_blocks=res_blocks).eval().double()
    rf = vae.temporal_receptive_field()
    n_lat = rf + 4
    x = _video(1 + 4 * (n_lat - 1), h=16, w=16).double()
    full = vae.encode(x)
    start, end = rf + 2, n_lat
    exact = {"atol": 1e-12, "rtol": 0.0}
    torch.testing.assert_close(vae.encode_range(x, start, end, halo=rf), full[:, :, start:end], **exact)
    short = vae.encode_range(x, start, end, halo=rf - 1)  # one chunk too little: not exact
    assert (short - full[:, :, start:end]).abs().max() > 1e-12
    torch.testing.assert_close(vae.encode_range(x, 2, 5, halo=2), full[:, :, 2:5], **TOL)
    torch.testing.assert_close(
        vae.encode_range(x, 0, 3, halo=0, latents_per_pass=None), full[:, :, 0:3], **TOL
    )


# ---- equality with diffusers, original layout ---------------------------------------------------
@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny random diffusers VAE in the Wan2.2 configuration (all weights perturbed), saved."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=R,
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        latents_mean=list(WAN22_LATENTS_MEAN),
        latents_std=list(WAN22_LATENTS_STD),
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("wan22_vae_diffusers")
    ref.save_pretrained(folder)
    return ref, folder


@torch.no_grad()
def _assert_same_as_peer(ours: CausalVideoVAE, ref: torch.nn.Module) -> None:
    x = _video(9)  # 32x48: H != W catches a transposed patch order
    mu = ref.encode(x).latent_dist.mean  # diffusers does not normalise: compare the raw mean
    torch.testing.assert_close(ours.denormalize_latents(ours.encode(x)), mu, **TOL)
    torch.testing.assert_close(ours.decode(ours.normalize_latents(mu)), ref.decode(mu).sample, **TOL)


def test_diffusers_folder_matches_peer(peer: tuple[torch.nn.Module, Path]) -> None:
    ref, folder = peer
    ours = CausalVideoVAE.from_pretrained(folder).eval()
    c = ours.config
    assert (c.base_dim, c.decoder_dim, c.residual, c.patch_size, c.latents_mean) == (
        8,
        12,
        True,
        2,
        WAN22_LATENTS_MEAN,
    )
    _assert_same_as_peer(ours, ref)


# Written independently of vidtrain's adapter: diffusers names -> Wan2.2_VAE.pth names.
_TO_ORIGINAL = [
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", rf"encoder.downsamples.\1.downsamples.{R}."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", rf"decoder.upsamples.\1.upsamples.{R + 1}."),
    (r"(\.\d+)\.norm1\.", r"\1.residual.0."),  # inside a numbered block
    (r"(\.\d+)\.conv1\.", r"\1.residual.2."),
    (r"(\.\d+)\.norm2\.", r"\1.residual.3."),
    (r"(\.\d+)\.conv2\.", r"\1.residual.6."),
    (r"(\.\d+)\.conv_shortcut\.", r"\1.shortcut."),
]


def _diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in _TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_original_layout_matches_peer(peer: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    ref, _ = peer
    sd = _diffusers_to_original(ref.state_dict())
    for key in (
        "encoder.conv1.weight",
        "encoder.downsamples.1.downsamples.0.residual.0.gamma",
        "encoder.downsamples.1.downsamples.2.time_conv.weight",
        "decoder.upsamples.0.upsamples.3.resample.1.weight",
        "decoder.upsamples.2.upsamples.0.shortcut.weight",
        "decoder.head.2.weight",
    ):
        assert key in sd, key
    torch.save(sd, tmp_path / "Wan2.2_VAE.pth")
    ours = CausalVideoVAE.from_pretrained(tmp_path / "Wan2.2_VAE.pth").eval()  # sizes read off the keys
    # the checkpoint carries no statistics: z_dim 48 gets Wan2.2's, which the peer's config holds
    assert ours.config == config_from_diffusers(dict(ref.config))
    _assert_same_as_peer(ours, ref)


@pytest.mark.parametrize("layout", ["original", "native"])
def test_export_and_reload_round_trip(tmp_path: Path, layout: str, vae: CausalVideoVAE) -> None:
    torch.save(export_state_dict(vae, layout), tmp_path / "vae.pth")
    back = CausalVideoVAE.from_pretrained(tmp_path / "vae.pth")
    assert back.config == vae.config
    for (k, a), b in zip(vae.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_wrong_family_names_the_keys(tmp_path: Path) -> None:
    torch.save(export_state_dict(CausalVideoVAE.from_flavor("wan2.2-debug"), "original"), tmp_path / "v.pth")
    with pytest.raises(ValueError, match=r"original-layout VAE weights do not fit the model: missing"):
        CausalVideoVAE.from_pretrained(tmp_path / "v.pth", flavor="debug")
    torch.save(export_state_dict(CausalVideoVAE.from_flavor("wan2.2-debug"), "diffusers"), tmp_path / "v.pth")
    with pytest.raises(
        ValueError, match="diffusers-layout weights: load the diffusers folder with its config"
    ):
        CausalVideoVAE.from_pretrained(tmp_path / "v.pth")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"is_residual": True, "patch_size": 2}))
    with pytest.raises(ValueError, match="patch_size 2 needs in_channels = out_channels = 12"):
        CausalVideoVAE.from_pretrained(tmp_path / "d")
