"""Wan2.2-TI2V-5B DiT: CausalWanDiT against diffusers' WanTransformer3DModel configured as TI2V
(48 latent channels, per-token timesteps), its layouts, config inference and bad checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from vidtrain.models.wan import CausalWanDiT, flavor
from vidtrain.models.wan.state_dict import (
    config_from_diffusers,
    config_from_state_dict,
    config_from_wan,
    diffusers_to_wan,
    save_vidtrain,
)
from vidtrain.tokens import MaskRule

diffusers = pytest.importorskip("diffusers")

# transformer/config.json of Wan-AI/Wan2.2-TI2V-5B-Diffusers, and config.json of the original
# Wan-AI/Wan2.2-TI2V-5B (the original WanModel does not save text_dim or cross_attn_norm)
DIFFUSERS_5B = {
    "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
    "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "image_dim": None,
    "in_channels": 48, "num_attention_heads": 24, "num_layers": 30, "out_channels": 48,
    "patch_size": [1, 2, 2], "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024, "text_dim": 4096,
}  # fmt: skip
ORIGINAL_5B = {
    "_class_name": "WanModel", "dim": 3072, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48,
    "model_type": "ti2v", "num_heads": 24, "num_layers": 30, "out_dim": 48, "text_len": 512,
}  # fmt: skip


def tiny_ti2v_diffusers(seed: int = 0):
    """diffusers' TI2V transformer at wan2.2-debug's sizes (48 channels, dim 64, 4 heads of 16)."""
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=48, out_channels=48,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64,
    )  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_ti2v_diffusers()
    d = tmp_path_factory.mktemp("diffusers_wan22")
    ref.save_pretrained(d)
    return ref, CausalWanDiT.from_pretrained(d, flavor="wan2.2-debug").eval(), d


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def wan_sinusoid(t: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """The original Wan's timestep embedding: [cos | sin] in float64 (diffusers' is float32)."""
    half = dim // 2
    ang = t.double()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    return torch.cat([ang.cos(), ang.sin()], dim=1).float()


def errors(ref, ours, x, t_ref, ctx, monkeypatch, t_ours=None):
    """Max abs error of ours against diffusers as is, and against diffusers with the original Wan's
    float64 timestep embedding (diffusers' float32 one moves t=700's angles by ~4e-5)."""
    with torch.no_grad():
        got = ours(x, t_ref if t_ours is None else t_ours, ctx)
        plain = max_err(got, ref(x, t_ref, ctx, return_dict=False)[0])
        monkeypatch.setattr(ref.condition_embedder.timesteps_proj, "forward", wan_sinusoid)
        f64 = max_err(got, ref(x, t_ref, ctx, return_dict=False)[0])
        monkeypatch.undo()
    assert got.shape == x.shape
    return plain, f64, got


def test_diffusers_ti2v_loads_as_the_debug_flavor(pair):
    _, ours, _ = pair
    assert ours.cfg == flavor("wan2.2-debug")
    assert ours.cfg.in_channels == ours.cfg.out_channels == 48


def test_full_attention_matches_diffusers(pair, monkeypatch):
    ref, ours, _ = pair
    x, t, ctx = torch.randn(2, 48, 3, 4, 6), torch.tensor([100.0, 700.0]), torch.randn(2, 5, 32)
    plain, f64, _ = errors(ref, ours, x, t, ctx, monkeypatch)
    assert plain < 2e-4, f"max abs error {plain:.1e} against diffusers (|out| ~8; measured 6.2e-5)"
    assert f64 < 1e-5, (
        f"max abs error {f64:.1e} against diffusers with Wan's float64 t embedding (measured 2.9e-6)"
    )


def test_ti2v_first_frame_timestep_zero_matches_diffusers_per_token(pair, monkeypatch):
    """TI2V: the clean first frame's tokens at t=0, the others at the sample's t (diffusers'
    pipeline passes [B, L]); ours per frame [B, F] and per token [B, L] alike."""
    ref, ours, _ = pair
    x, ctx = torch.randn(2, 48, 3, 4, 6), torch.randn(2, 5, 32)
    t_B = torch.tensor([700.0, 250.0])
    t_BF = torch.cat([torch.zeros(2, 1), t_B[:, None].expand(2, 2)], dim=1)  # [[0, 700, 700], [0, 250, 250]]
    t_BL = t_BF.repeat_interleave(2 * 3, dim=1)  # 6 tokens per frame
    plain, f64, got_frames = errors(ref, ours, x, t_BL, ctx, monkeypatch, t_ours=t_BF)
    assert plain < 2e-4, f"max abs error {plain:.1e} against diffusers (measured 6.1e-5)"
    assert f64 < 1e-5, (
        f"max abs error {f64:.1e} against diffusers with Wan's float64 t embedding (measured 4.3e-6)"
    )
    with torch.no_grad():
        assert torch.equal(ours(x, t_BL, ctx), got_frames)  # per token = per frame, bit for bit
        assert max_err(ours(x, t_B, ctx), got_frames) > 1e-3  # the first frame's t=0 matters


def test_arbitrary_per_token_timesteps_match_diffusers(pair, monkeypatch):
    """Every token its own timestep (no runs to share a modulation row): diffusers' [B, L] path."""
    ref, ours, _ = pair
    x, ctx = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 5, 32)
    t_BL = torch.rand(1, 2 * 2 * 2) * 1000
    t_BL[:, :4] = 0.0
    plain, f64, _ = errors(ref, ours, x, t_BL, ctx, monkeypatch)
    assert plain < 2e-4, f"max abs error {plain:.1e} against diffusers (measured 1.8e-5)"
    assert f64 < 1e-5, (
        f"max abs error {f64:.1e} against diffusers with Wan's float64 t embedding (measured 2.9e-6)"
    )


def test_per_token_timesteps_under_the_causal_rule_equal_per_frame(pair):
    _, ours, _ = pair
    x, ctx = torch.randn(1, 48, 6, 4, 4), torch.randn(1, 5, 32)
    t_BF = torch.tensor([[0.0, 500.0, 500.0, 900.0, 900.0, 900.0]])
    rule = MaskRule("causal", 3)
    with torch.no_grad():
        a = ours(x, t_BF, ctx, rule=rule)
        b = ours(x, t_BF.repeat_interleave(4, dim=1), ctx, rule=rule)
    assert torch.equal(a, b)


def test_original_wan22_layout_loads(pair, tmp_path):
    """The original Wan2.2 layout (names converted from diffusers', the original's config.json
    without text_dim / cross_attn_norm, weights in index-listed shards) equals the diffusers load."""
    ref, ours, _ = pair
    sd = {k: v.contiguous() for k, v in diffusers_to_wan(ref.state_dict()).items()}
    assert set(sd) == set(ours.state_dict())
    wan = tmp_path / "Wan2.2-TI2V-tiny"
    wan.mkdir()
    cfg = ours.cfg
    (wan / "config.json").write_text(json.dumps(ORIGINAL_5B | {
        "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
    }))  # fmt: skip
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2]}
    shards["diffusion_pytorch_model-00002-of-00002.safetensors"] = keys[1::2]
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(wan / name))
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (wan / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, wan / "Wan2.2_VAE.pth")  # the repo's VAE beside it

    a = CausalWanDiT.from_pretrained(wan, flavor="wan2.2-debug")
    b = CausalWanDiT.from_pretrained(save_vidtrain(ours, tmp_path / "own"), flavor="wan2.2-debug")
    assert a.cfg == b.cfg == flavor("wan2.2-debug")  # text_dim 32 and the cross-attn norm from the shapes
    x, t, ctx = torch.randn(1, 48, 3, 4, 4), torch.tensor([[0.0, 500.0, 500.0]]), torch.randn(1, 5, 32)
    with torch.no_grad():
        want = ours(x, t, ctx)
        assert torch.equal(a(x, t, ctx), want) and torch.equal(b(x, t, ctx), want)


def test_config_inference():
    """Sizes read off the shapes (heads: dim / 128) recognise every Wan flavor, 48 channels included;
    the published 5B configs (diffusers and original) give the 5B flavor."""
    for name in ("1.3B", "14B", "5B"):
        with torch.device("meta"):
            sd = CausalWanDiT.from_flavor(name).state_dict()
        assert config_from_state_dict(sd) == flavor(name), name
    sd = CausalWanDiT.from_flavor("wan2.2-debug").state_dict()
    assert config_from_state_dict(sd, num_heads=4) == flavor("wan2.2-debug")
    with pytest.raises(ValueError, match="dim 64 is not a multiple of Wan's head dim 128"):
        config_from_state_dict(sd)
    assert config_from_diffusers(DIFFUSERS_5B) == flavor("5B")
    assert config_from_wan(ORIGINAL_5B) == flavor("5B")
    with torch.device("meta"):
        n = sum(p.numel() for p in CausalWanDiT.from_flavor("5B").parameters()) / 1e9
    assert abs(n - 5.00) < 0.01, n
    assert config_from_state_dict(diffusers_to_wan(tiny_ti2v_diffusers().state_dict()), 4) == flavor(
        "wan2.2-debug"
    )


def test_16_channel_checkpoint_into_48_channel_flavor_is_refused(tmp_path):
    """A Wan2.1-shaped (16-channel) checkpoint named as the 48-channel flavor: one line naming the
    fields, whatever its layout; a config.json that lies about the channels: one line naming the keys."""
    wan21 = CausalWanDiT.from_flavor("wan2.2-debug", in_channels=16, out_channels=16)
    own = save_vidtrain(wan21, tmp_path / "own16")
    msg = (
        r"does not fit flavor 'wan2.2-debug': in_channels 16 \(checkpoint\) vs 48 \(flavor\), out_channels 16"
    )
    with pytest.raises(ValueError, match=msg) as err:
        CausalWanDiT.from_pretrained(own, flavor="wan2.2-debug")
    assert "\n" not in str(err.value)

    ref = diffusers.WanTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=32, freq_dim=32,
        ffn_dim=128, num_layers=2,
    )  # fmt: skip
    ref.save_pretrained(tmp_path / "diffusers16")
    with pytest.raises(ValueError, match=msg) as err:
        CausalWanDiT.from_pretrained(tmp_path / "diffusers16", flavor="wan2.2-debug")
    assert "\n" not in str(err.value)

    wan = tmp_path / "wan16"
    wan.mkdir()
    (wan / "config.json").write_text(json.dumps(ORIGINAL_5B | {"dim": 64, "ffn_dim": 128, "freq_dim": 32,
                                                               "num_heads": 4, "num_layers": 2}))  # fmt: skip
    save_file({k: v.contiguous() for k, v in wan21.state_dict().items()}, str(wan / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"shape mismatch \(3\): head\.head\.bias.*patch_embedding\.weight"
    ) as err:
        CausalWanDiT.from_pretrained(wan)  # config.json says 48 channels, the weights hold 16
    assert "\n" not in str(err.value)


def test_bad_inputs_to_the_48_channel_model(tmp_path):
    m = CausalWanDiT.from_flavor("wan2.2-debug")
    ctx = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match=r"latents must be \[B, 48, F, H, W\], got \[1, 16, 3, 4, 4\]"):
        m(torch.randn(1, 16, 3, 4, 4), torch.tensor([1.0]), ctx)
    with pytest.raises(
        ValueError, match=r"timestep must be \[B\], \[B, F\] or \[B, L\] = \[1\], \[1, 3\] or \[1, 12\]"
    ):
        m(torch.randn(1, 48, 3, 4, 4), torch.zeros(1, 5), ctx)
    with pytest.raises(ValueError, match="model_type='i2v'"):
        config_from_wan(ORIGINAL_5B | {"model_type": "i2v"})
    with pytest.raises(ValueError, match=r"unsupported WanTransformer3DModel options \(image_dim=1280"):
        config_from_diffusers(DIFFUSERS_5B | {"image_dim": 1280})
    with pytest.raises(ValueError, match="unknown model flavor"):
        CausalWanDiT.from_pretrained(save_vidtrain(m, tmp_path / "m"), flavor="5b")
