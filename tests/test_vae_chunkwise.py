"""Chunk-wise causal VAE: encode and decode any number of latent frames per call, the causal caches
carried across calls, equal to Wan's one-latent-frame-at-a-time schedule (Wan2.1 and Wan2.2
architectures); the "auto" pass size; the sampler's one decode call per chunk; the encode tool's
pass option."""

from __future__ import annotations

import pytest
import torch

from vidtrain.data_tools._shards import ToolError
from vidtrain.data_tools.encode import vae_pass_size
from vidtrain.models.vae import CausalVideoVAE
from vidtrain.models.vae import model as vae_model
from vidtrain.sample.decode import ChunkDecoder

EXACT = {"atol": 1e-5, "rtol": 0.0}  # max abs error vs Wan's schedule, fp32 (measured <= 4e-6)
LATENTS = 9  # latent frames of the clip: 33 pixel frames
SPLITS = [[1, 3, 3, 2], [9], [2, 7], [4, 1, 4]]  # latent frames per call (the sampler: [3, 3, 3])
FLAVORS = {  # Wan2.1 and Wan2.2 architectures at debug width; (H, W) a few latent positions each
    "wan2.1-arch": ("debug", {}, (32, 48)),
    "wan2.2-arch": ("wan2.2-debug", {}, (32, 48)),
    "wan2.2-arch, 2 res blocks": ("wan2.2-debug", {"num_res_blocks": 2}, (32, 32)),
}


def _video(
    frames: int, hw: tuple[int, int], seed: int = 1, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, frames, *hw, generator=g) * 2 - 1).to(dtype)


def _pixel_calls(split: list[int], tc: int = 4) -> list[tuple[int, int]]:
    """Pixel frame ranges of the calls: the first holds 1 + 4(n-1) frames, the later ones 4n."""
    out, t = [], 0
    for i, n in enumerate(split):
        p = 1 + tc * (n - 1) if i == 0 else tc * n
        out.append((t, t + p))
        t += p
    return out


def _latent_calls(split: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(split).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def _count_passes(monkeypatch: pytest.MonkeyPatch, vae: CausalVideoVAE, name: str) -> list[int]:
    """Record the frames of every network pass `vae.<name>` runs."""
    frames: list[int] = []
    orig = getattr(vae, name)

    def counted(x: torch.Tensor, state: object) -> torch.Tensor:
        frames.append(x.shape[2])
        return orig(x, state)

    monkeypatch.setattr(vae, name, counted)
    return frames


@pytest.fixture(scope="module", params=list(FLAVORS), ids=list(FLAVORS))
def case(request: pytest.FixtureRequest) -> dict:
    """A VAE, a clip, and its Wan-schedule latents and pixels (the references)."""
    flavor, overrides, hw = FLAVORS[request.param]
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor(flavor, **overrides).eval()
    x = _video(1 + 4 * (LATENTS - 1), hw)
    with torch.no_grad():
        z = vae.encode(x, latents_per_pass=1)  # Wan: the first frame, then 4 frames per pass
        y = vae.decode(z, latents_per_pass=1)  # Wan: one latent frame per pass
    return {"vae": vae, "x": x, "z": z, "y": y}


@pytest.mark.parametrize("split", SPLITS, ids=str)
@torch.no_grad()
def test_chunkwise_encode_equals_wan_schedule(case: dict, split: list[int], monkeypatch) -> None:
    vae, x = case["vae"], case["x"]
    passes = _count_passes(monkeypatch, vae, "_encode_pass")
    enc = vae.stream_encoder(None)  # every call in one pass
    parts = [enc.feed(x[:, :, a:b]) for a, b in _pixel_calls(split)]
    enc.flush()
    assert [p.shape[2] for p in parts] == split  # each call returns its latent frames
    assert passes == [b - a for a, b in _pixel_calls(split)]  # one network pass per call
    torch.testing.assert_close(torch.cat(parts, dim=2), case["z"], **EXACT)


@pytest.mark.parametrize("split", SPLITS, ids=str)
@torch.no_grad()
def test_chunkwise_decode_equals_wan_schedule(case: dict, split: list[int], monkeypatch) -> None:
    vae, z = case["vae"], case["z"]
    passes = _count_passes(monkeypatch, vae, "_decode_pass")
    dec = vae.stream_decoder(None)
    parts = [dec.feed(z[:, :, a:b]) for a, b in _latent_calls(split)]
    assert [p.shape[2] for p in parts] == [b - a for a, b in _pixel_calls(split)]
    assert passes == split
    out = torch.cat(parts, dim=2)
    assert out.is_contiguous()
    torch.testing.assert_close(out, case["y"], **EXACT)


@torch.no_grad()
def test_auto_pass_size_follows_the_memory_budget(case: dict, monkeypatch) -> None:
    vae, x, z = case["vae"], case["x"], case["z"]
    H, W = x.shape[3:]
    for k in (1, 2, 5):
        assert vae.max_latents_per_pass(H, W, memory_bytes=vae.pass_memory_bytes(k, H, W)) == k
    assert vae.max_latents_per_pass(H, W, memory_bytes=0) == 1  # never below one latent frame
    assert vae.pass_memory_bytes(4, H, W, batch=2) == 2 * vae.pass_memory_bytes(4, H, W)
    budget = vae.pass_memory_bytes(3, H, W)  # "auto" takes half the free memory: 3 latent frames
    monkeypatch.setattr(vae_model, "free_memory_bytes", lambda device: 2 * budget)
    enc_passes = _count_passes(monkeypatch, vae, "_encode_pass")
    dec_passes = _count_passes(monkeypatch, vae, "_decode_pass")
    torch.testing.assert_close(vae.encode(x, latents_per_pass="auto"), z, **EXACT)
    torch.testing.assert_close(vae.decode(z, latents_per_pass="auto"), case["y"], **EXACT)
    assert enc_passes == [9, 12, 12]  # 3 + 3 + 3 latent frames
    assert dec_passes == [3, 3, 3]
    monkeypatch.setattr(vae_model, "free_memory_bytes", lambda device: 1 << 40)
    assert vae.encode(x[:, :, :9], latents_per_pass="auto").shape[2] == 3 and enc_passes[-1] == 9


@torch.no_grad()
def test_range_encode_any_pass_size(monkeypatch) -> None:
    """Mid-clip streams (the per-rank halo encode) give the same latents whatever the pass size."""
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor("debug").eval()
    x = _video(1 + 4 * 11, (16, 16))  # 12 latent frames
    want = vae.encode_range(x, 6, 12, halo=3, latents_per_pass=1)
    for per_pass in (2, 5, None, "auto"):
        got = vae.encode_range(x, 6, 12, halo=3, latents_per_pass=per_pass)
        torch.testing.assert_close(got, want, **EXACT)
    passes = _count_passes(monkeypatch, vae, "_encode_pass")
    vae.encode_range(x, 6, 12, halo=3)  # the default: as many as fit ("auto"), here one pass
    assert passes == [4 * 9]


@torch.no_grad()
def test_chunkwise_float64_off_the_onednn_path() -> None:
    """float64 (and any device or dtype but CPU float32) keeps PyTorch's own conv dispatch."""
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor("debug").eval().double()
    x = _video(1 + 4 * 4, (16, 16), dtype=torch.float64)
    z = vae.encode(x, latents_per_pass=1)
    enc = vae.stream_encoder(None)
    got = torch.cat([enc.feed(x[:, :, a:b]) for a, b in _pixel_calls([1, 2, 2])], dim=2)
    torch.testing.assert_close(got, z, atol=1e-12, rtol=0.0)
    dec = vae.stream_decoder(None)
    got = torch.cat([dec.feed(z[:, :, a:b]) for a, b in _latent_calls([2, 3])], dim=2)
    torch.testing.assert_close(got, vae.decode(z, latents_per_pass=1), atol=1e-12, rtol=0.0)


def test_gradients_flow_through_a_chunkwise_pass() -> None:
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor("debug").eval()
    z = torch.randn(1, 16, 3, 2, 2, requires_grad=True)
    y = vae.decode(z, latents_per_pass=None)
    y.square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(y.detach(), vae.decode(z, latents_per_pass=1), **EXACT)


@pytest.mark.parametrize("bad", [0, -1, "fast", True, 1.5])
def test_bad_pass_sizes_are_errors(bad) -> None:
    vae = CausalVideoVAE.from_flavor("debug")
    with pytest.raises(ValueError, match="latents_per_pass must be >= 1, None or 'auto'"):
        vae.stream_decoder(bad)
    with pytest.raises(ValueError, match="latents_per_pass must be >= 1, None or 'auto'"):
        vae.encode(_video(5, (16, 16)), latents_per_pass=bad)


@torch.no_grad()
def test_sampler_decodes_each_chunk_in_one_call(case: dict, monkeypatch) -> None:
    vae, z = case["vae"], case["z"]
    passes = _count_passes(monkeypatch, vae, "_decode_pass")
    got: list[torch.Tensor] = []
    dec = ChunkDecoder(vae, "sync", got.append)
    for i, (a, b) in enumerate(_latent_calls([3, 3, 3])):  # sampler chunks of 3 latent frames
        dec.submit(i, z[:, :, a:b])
    dec.close()
    assert passes == [3, 3, 3]
    torch.testing.assert_close(torch.cat(got, dim=2), case["y"], **EXACT)


def test_encode_tool_pass_option() -> None:
    assert vae_pass_size(None) == "auto"  # the default: as many latent frames as memory allows
    assert vae_pass_size(0) is None  # the whole clip in one pass
    assert vae_pass_size(3) == 3
    with pytest.raises(ToolError, match="--latents-per-pass must be >= 0"):
        vae_pass_size(-1)


@torch.no_grad()
def test_kept_channels_last_weights_follow_weight_changes() -> None:
    """The oneDNN path keeps a channels-last copy of each conv weight between calls; an in-place
    update, a load_state_dict or a replaced tensor must show in the next call."""
    torch.manual_seed(0)
    vae, other = CausalVideoVAE.from_flavor("debug").eval(), CausalVideoVAE.from_flavor("debug").eval()
    z = torch.randn(1, 16, 2, 2, 2)

    def fresh() -> torch.Tensor:  # a model that never ran: nothing kept
        m = CausalVideoVAE.from_flavor("debug").eval()
        m.load_state_dict(vae.state_dict())
        return m.decode(z, latents_per_pass=None)

    before = vae.decode(z, latents_per_pass=None)
    vae.load_state_dict(other.state_dict())  # copy_ into the parameters
    after = vae.decode(z, latents_per_pass=None)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh(), rtol=0, atol=0)
    vae.decoder.conv_out.weight.mul_(0.5)  # in place
    torch.testing.assert_close(vae.decode(z, latents_per_pass=None), fresh(), rtol=0, atol=0)
    w = vae.decoder.conv_in.weight
    w.data = w.data * 2  # a new tensor under the same parameter
    torch.testing.assert_close(vae.decode(z, latents_per_pass=None), fresh(), rtol=0, atol=0)
