"""VAE weights: equality with diffusers' AutoencoderKLWan, original Wan2.1 layout, clear load errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from vidtrain.models.vae import CausalVideoVAE
from vidtrain.models.vae.weights import export_state_dict

diffusers = pytest.importorskip("diffusers")
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A tiny random diffusers Wan VAE (all weights perturbed), saved with save_pretrained."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, num_res_blocks=2).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("wan_vae_diffusers")
    ref.save_pretrained(folder)
    return ref, folder


def _video() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, 9, 32, 32, generator=g) * 2 - 1


@torch.no_grad()
def _assert_same_as_peer(ours: CausalVideoVAE, ref: torch.nn.Module) -> None:
    x = _video()
    mu = ref.encode(x).latent_dist.mean  # diffusers does not normalise: compare the raw mean
    torch.testing.assert_close(ours.denormalize_latents(ours.encode(x)), mu, **TOL)
    torch.testing.assert_close(ours.decode(ours.normalize_latents(mu)), ref.decode(mu).sample, **TOL)


def test_diffusers_folder_matches_peer(peer: tuple[torch.nn.Module, Path]) -> None:
    ref, folder = peer
    ours = CausalVideoVAE.from_pretrained(folder).eval()
    assert ours.config.base_dim == 8 and ours.config.num_res_blocks == 2
    _assert_same_as_peer(ours, ref)


# Written independently of vidtrain's adapter: diffusers names -> Wan2.1_VAE.pth names.
_TO_ORIGINAL = [
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    (r"(\.\d+)\.norm1\.", r"\1.residual.0."),  # inside a numbered block
    (r"(\.\d+)\.conv1\.", r"\1.residual.2."),
    (r"(\.\d+)\.norm2\.", r"\1.residual.3."),
    (r"(\.\d+)\.conv2\.", r"\1.residual.6."),
    (r"(\.\d+)\.conv_shortcut\.", r"\1.shortcut."),
]


def _diffusers_to_original(sd: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
        if m:  # decoder levels are flat in the original: R+1 res blocks then the upsampler
            pos = int(m.group(3)) if m.group(3) is not None else num_res_blocks + 1
            key = f"decoder.upsamples.{int(m.group(1)) * (num_res_blocks + 2) + pos}.{m.group(4)}"
        for pattern, repl in _TO_ORIGINAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_layout_matches_peer(
    peer: tuple[torch.nn.Module, Path], tmp_path: Path, suffix: str
) -> None:
    ref, _ = peer
    sd = _diffusers_to_original(ref.state_dict(), num_res_blocks=2)
    assert "encoder.downsamples.0.residual.0.gamma" in sd and "decoder.upsamples.3.resample.1.weight" in sd
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    ours = CausalVideoVAE.from_pretrained(path).eval()  # sizes read off the state dict
    assert (ours.config.base_dim, ours.config.dim_mult, ours.config.temporal_downsample) == (
        8,
        (1, 2, 4, 4),
        (False, True, True),
    )
    _assert_same_as_peer(ours, ref)


@pytest.mark.parametrize("layout", ["original", "native"])
def test_export_and_reload_round_trip(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor("debug")
    torch.save(export_state_dict(vae, layout), tmp_path / "vae.pth")
    back = CausalVideoVAE.from_pretrained(tmp_path / "vae.pth")
    assert back.config == vae.config
    for (k, a), b in zip(vae.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def _broken(tmp_path: Path, edit: str) -> Path:
    sd = export_state_dict(CausalVideoVAE.from_flavor("debug"), "original")
    if edit == "missing":
        del sd["encoder.middle.1.proj.weight"]
    elif edit == "unexpected":
        sd["encoder.middle.1.extra"] = torch.zeros(1)
    else:
        sd["conv1.bias"] = torch.zeros(5)
    torch.save(sd, tmp_path / "bad.pth")
    return tmp_path / "bad.pth"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("missing", r"missing \(1\): encoder\.middle\.1\.proj\.weight"),
        ("unexpected", r"unexpected \(1\): encoder\.middle\.1\.extra"),
        ("shape", r"shape mismatches \(1\): conv1\.bias \(5,\) vs ours \(32,\)"),
    ],
)
def test_bad_checkpoint_names_the_keys(tmp_path: Path, edit: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CausalVideoVAE.from_pretrained(_broken(tmp_path, edit), flavor="debug")


def test_bad_paths_and_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no VAE checkpoint"):
        CausalVideoVAE.from_pretrained(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"without config\.json"):
        CausalVideoVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"base_dim": 8, "is_residual": True, "patch_size": 2}))
    with pytest.raises(ValueError, match="is_residual=True"):
        CausalVideoVAE.from_pretrained(tmp_path)
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"not a Wan2\.1 VAE state dict"):
        CausalVideoVAE.from_pretrained(tmp_path / "other.pth")
