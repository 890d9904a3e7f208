"""CausalWanDiT against diffusers' WanTransformer3DModel (peer oracle), layouts and flavors."""

from __future__ import annotations

import json

import pytest
import torch

from vidtrain.models.wan import FLAVORS, CausalWanDiT
from vidtrain.models.wan.state_dict import save_vidtrain
from vidtrain.tokens import MaskRule

diffusers = pytest.importorskip("diffusers")


def tiny_diffusers(seed: int = 0):
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    )  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = tiny_diffusers()
    d = tmp_path_factory.mktemp("diffusers_wan")
    ref.save_pretrained(d)
    return ref, CausalWanDiT.from_pretrained(d).eval(), d


def test_full_attention_matches_diffusers(pair):
    ref, ours, _ = pair
    x, t, ctx = torch.randn(2, 4, 3, 6, 8), torch.tensor([100.0, 700.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


def test_per_frame_timesteps_match_diffusers_per_token(pair):
    ref, ours, _ = pair
    x, ctx = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 5, 16)
    t_BF = torch.tensor([[0.0, 400.0, 900.0]])
    with torch.no_grad():
        want = ref(x, t_BF.repeat_interleave(4, dim=1), ctx, return_dict=False)[0]
        got = ours(x, t_BF, ctx)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


def test_original_wan_layout_and_own_format_load(pair, tmp_path):
    from safetensors.torch import save_file

    _, ours, _ = pair
    wan = tmp_path / "wan"
    wan.mkdir()
    cfg = ours.cfg
    (wan / "config.json").write_text(json.dumps({
        "model_type": "t2v", "dim": cfg.dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
        "ffn_dim": cfg.ffn_dim, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels, "text_dim": cfg.text_dim,
        "freq_dim": cfg.freq_dim, "eps": cfg.eps, "patch_size": [1, 2, 2],
    }))  # fmt: skip
    save_file(
        {k: v.contiguous() for k, v in ours.state_dict().items()},
        str(wan / "diffusion_pytorch_model.safetensors"),
    )
    a = CausalWanDiT.from_pretrained(wan)
    own = save_vidtrain(ours, tmp_path / "own")
    b = CausalWanDiT.from_pretrained(own)
    x, t, ctx = torch.randn(1, 4, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, ctx), ours(x, t, ctx), rtol=0, atol=0)
        torch.testing.assert_close(b(x, t, ctx), ours(x, t, ctx), rtol=0, atol=0)


def test_mismatched_checkpoint_lists_keys(pair, tmp_path):
    _, ours, _ = pair
    other = CausalWanDiT(ours.cfg.replace(num_layers=3))
    d = save_vidtrain(other, tmp_path / "three_layers")
    cfg_path = d / "vidtrain_model.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): blocks\.2\."):
        CausalWanDiT.from_pretrained(d)
    cfg["ffn_dim"] = 48
    cfg["num_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        CausalWanDiT.from_pretrained(d)


def test_missing_checkpoint_and_bad_shapes(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        CausalWanDiT.from_pretrained(tmp_path / "nope")
    m = CausalWanDiT.from_flavor("debug")
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, F, H, W\]"):
        m(torch.randn(1, 16, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="text context must be"):
        m(torch.randn(1, 16, 3, 4, 4), torch.tensor([1.0]), torch.randn(1, 3, 31))
    with pytest.raises(ValueError, match="unknown model flavor"):
        CausalWanDiT.from_flavor("7B")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        CausalWanDiT.from_flavor("debug", num_heads=5)


@pytest.mark.parametrize(("name", "billions"), [("1.3B", 1.42), ("14B", 14.29), ("5B", 5.00)])
def test_flavor_sizes(name, billions):
    with torch.device("meta"):
        m = CausalWanDiT.from_flavor(name)
    n = sum(p.numel() for p in m.parameters()) / 1e9
    assert abs(n - billions) < 0.02, n
    assert set(FLAVORS) == {"debug", "1.3B", "14B", "wan2.2-debug", "5B"}


def test_causal_rule_makes_early_chunks_ignore_later_ones():
    m = CausalWanDiT.from_flavor("debug").eval()
    x, ctx = torch.randn(1, 16, 6, 4, 4), torch.randn(1, 4, 32)
    y = x.clone()
    y[:, :, 3:] = torch.randn_like(y[:, :, 3:])
    rule = MaskRule("causal", 3)
    with torch.no_grad():
        a, b = m(x, torch.tensor([300.0]), ctx, rule=rule), m(y, torch.tensor([300.0]), ctx, rule=rule)
        full_a, full_b = m(x, torch.tensor([300.0]), ctx), m(y, torch.tensor([300.0]), ctx)
    torch.testing.assert_close(a[:, :, :3], b[:, :, :3], rtol=0, atol=0)
    assert (full_a[:, :, :3] - full_b[:, :, :3]).abs().max() > 1e-4


def test_flex_backend_equals_dense_masks():
    """FlexAttention block masks from metadata (the GPU path) equal dense SDPA masks."""
    from vidtrain.forcing.flow import frames_sigma
    from vidtrain.forcing.teacher import build_tf_sequence
    from vidtrain.models.wan.attention import AttentionContext

    sdpa_model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    flex_model = CausalWanDiT.from_flavor("debug", attn_backend="flex").eval()
    flex_model.load_state_dict(sdpa_model.state_dict())
    x0, eps, ctx = torch.randn(1, 16, 12, 4, 4), torch.randn(1, 16, 12, 4, 4), torch.randn(1, 4, 32)
    seq = build_tf_sequence(
        x0, eps, frames_sigma(torch.rand(1, 4), 3), 3, shot_F=torch.tensor([0] * 6 + [1] * 6)
    )
    rule = MaskRule("teacher_forcing", 3, window_frames=3, sink_frames=3, shot_sink=True)
    with torch.no_grad():
        outs = [
            m(seq.x_BLP, seq.t_BL, ctx, meta=seq.meta, attn=AttentionContext(rule=rule, meta=seq.meta))
            for m in (sdpa_model, flex_model)
        ]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_modulation_per_frame_equals_per_token(monkeypatch):
    """AdaLN rows gathered once per run of tokens sharing a timestep and broadcast: bit-identical
    outputs and input gradients to one row per token (the [B, L, 6, D] gather it replaces);
    parameter gradients of the time embedding and modulations sum in another order (fp32 ulps)."""
    import vidtrain.models.wan.model as wan_model

    inv = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]])
    assert wan_model.timestep_runs(inv) == 3
    assert wan_model.timestep_runs(torch.tensor([[0, 0, 1, 1, 1, 1]])) == 2  # gcd of run starts and L
    assert wan_model.timestep_runs(torch.tensor([[0, 1, 0, 1]])) == 1

    def run(force_per_token: bool):
        torch.manual_seed(0)
        m = CausalWanDiT.from_flavor("debug", "sdpa")
        if force_per_token:
            monkeypatch.setattr(wan_model, "timestep_runs", lambda inv_BL: 1)
        x = torch.randn(2, 16, 6, 16, 16, requires_grad=True)  # 64 tokens per frame
        out = m(x, torch.rand(2, 6) * 1000, torch.randn(2, 8, m.cfg.text_dim), rule=MaskRule("causal", 3))
        out.square().sum().backward()
        monkeypatch.undo()
        return out.detach(), x.grad, [p.grad for p in m.parameters()]

    (o1, gx1, g1), (o2, gx2, g2) = run(False), run(True)
    assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
    for a, b in zip(g1, g2):  # fp32 summation order: relative to the gradient's scale
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
