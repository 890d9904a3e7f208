"""Image-to-video the Wan2.2 way and video continuation: sampler == teacher forcing, training's
conditioned samples, the recipe checks and `vidtrain sample --image / --video`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vidtrain.cli import main as cli_main
from vidtrain.config import I2V_FLAVORS, ConfigError, Recipe, load_recipe, validate
from vidtrain.forcing.flow import frames_sigma, sample_chunk_sigmas
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.models.wan.config import FLAVORS
from vidtrain.models.wan.state_dict import save_vidtrain
from vidtrain.sample import cli as sample_cli
from vidtrain.sample.decode import VideoWriter
from vidtrain.sample.sampler import Conditioning, SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.tokens import MaskRule, TokenMeta, grid_meta
from vidtrain.train.methods import TeacherForcing
from vidtrain.utils import rng

HW = (4, 4)
TWO = (1000.0, 500.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanDiT.from_flavor("wan2.2-debug", attn_backend="sdpa").eval()


def _cond(model, image=None) -> Conditioning:
    c = debug_text_context(["a cat", "a dog"], model.cfg.text_dim, length=8)
    return Conditioning(c.context_BST, image_latent=image)


def _tf_pred(model, clean, noisy, t_BF, cfg: SamplerConfig, cond):
    """Teacher-forced predictions of the noisy copies [B, C, F, H, W]: clean history `clean`,
    noisy inputs `noisy` at per-frame timesteps `t_BF`."""
    b, _, f, h, w = clean.shape
    c, tpf = cfg.frames_per_chunk, (h // 2) * (w // 2)
    meta = TokenMeta.cat(
        [grid_meta(f, h // 2, w // 2, c, noisy=False), grid_meta(f, h // 2, w // 2, c, noisy=True)]
    )
    x_BLP = torch.cat([model.patchify(clean), model.patchify(noisy)], dim=1)
    t_BL = torch.cat([torch.zeros(b, f * tpf), t_BF.repeat_interleave(tpf, dim=1)], dim=1)
    r = cfg.rule()
    rule = MaskRule("teacher_forcing", c, r.window_frames, r.sink_frames, r.shot_sink)
    with torch.no_grad():
        pred = model(x_BLP, t_BL, cond.context_BST, meta=meta, attn=AttentionContext(rule, meta))
    return model.unpatchify(pred[:, f * tpf :], f, h, w)


@pytest.mark.parametrize("update,window,sinks", [("x0", None, 0), ("euler", 3, 1)])
def test_stream_i2v_equals_teacher_forcing(model, update, window, sinks):
    cfg = SamplerConfig(
        kv_cache="fp32", update=update, timesteps=TWO, window_frames=window, sink_frames=sinks
    )
    image = torch.randn(2, 48, *HW, generator=torch.Generator().manual_seed(7))
    res = StreamingSampler(model, cfg).generate_latents(_cond(model, image), 3, HW, [1, 2], trace=True)
    x0 = res.latents_BCFHW
    assert torch.equal(x0[:, :, 0], image)  # the conditioning frame's output is the image latent
    c = cfg.frames_per_chunk
    for step in range(len(cfg.timesteps)):
        xt = torch.cat([ch.trace[step]["x_t"] for ch in res.chunks], dim=2)
        assert torch.equal(xt[:, :, 0], image)  # pinned in every pass
        t_F = torch.tensor([ch.trace[step]["t"] for ch in res.chunks]).repeat_interleave(c)
        t_BF = t_F[None].repeat(2, 1)
        t_BF[:, 0] = 0.0  # teacher forcing with condition_first_frame: sigma 0 on frame 0
        assert torch.equal(res.chunks[0].trace[step]["t_F"], t_BF[:, :c])
        tf = _tf_pred(model, x0, xt, t_BF, cfg, _cond(model))
        v = torch.cat([ch.trace[step]["v"] for ch in res.chunks], dim=2)
        torch.testing.assert_close(v, tf, rtol=1e-5, atol=1e-5)
    # and the image matters: the T2V sample of the same seeds differs in chunk 0's other frames
    t2v = StreamingSampler(model, cfg).generate_latents(_cond(model), 3, HW, [1, 2]).latents_BCFHW
    assert (t2v[:, :, 1:c] - x0[:, :, 1:c]).abs().max() > 1e-4


@pytest.mark.parametrize("window,sinks,k", [(None, 0, 1), (3, 0, 2), (4, 2, 2)])
def test_prefix_continuation_equals_teacher_forcing(model, window, sinks, k):
    cfg = SamplerConfig(kv_cache="fp32", timesteps=TWO, window_frames=window, sink_frames=sinks)
    c = cfg.frames_per_chunk
    clip = torch.randn(2, 48, 4 * c, *HW, generator=torch.Generator().manual_seed(3))
    prefix = clip[:, :, : k * c]
    res = StreamingSampler(model, cfg).generate_latents(
        _cond(model), 4, HW, [1, 2], trace=True, prefix_latents=prefix
    )
    assert [ch.prefix for ch in res.chunks] == [True] * k + [False] * (4 - k)
    x0 = res.latents_BCFHW
    assert torch.equal(x0[:, :, : k * c], prefix)
    gen = res.chunks[k:]
    for step in range(len(cfg.timesteps)):
        xt = torch.cat([prefix, *[ch.trace[step]["x_t"] for ch in gen]], dim=2)
        t_F = torch.tensor([0.0] * k + [ch.trace[step]["t"] for ch in gen]).repeat_interleave(c)
        tf = _tf_pred(model, x0, xt, t_F[None].repeat(2, 1), cfg, _cond(model))
        v = torch.cat([ch.trace[step]["v"] for ch in gen], dim=2)
        torch.testing.assert_close(v, tf[:, :, k * c :], rtol=1e-5, atol=1e-5)


def test_prefix_and_image_are_checked(model):
    s = StreamingSampler(model, SamplerConfig(timesteps=(1000.0,)))
    c = s.config.frames_per_chunk
    with pytest.raises(ValueError, match="k < 2"):
        s.generate_latents(_cond(model), 2, HW, [1, 2], prefix_latents=torch.zeros(2, 48, 2 * c, *HW))
    with pytest.raises(ValueError, match="prefix_latents must be"):
        s.generate_latents(_cond(model), 2, HW, [1, 2], prefix_latents=torch.zeros(2, 48, c + 1, *HW))
    with pytest.raises(ValueError, match="image_latent must be"):
        s.generate_latents(_cond(model, torch.zeros(2, 16, *HW)), 2, HW, [1, 2])


# ---- training: data.task ------------------------------------------------------------------------


def _recipe(task="t2v", flavor="wan2.2-debug", min_t=20.0, frac=0.5):
    r = Recipe()
    r.model.flavor, r.data.task, r.data.i2v_fraction = flavor, task, frac
    r.method.forcing.min_timestep = min_t
    return r


def test_task_validation():
    validate(_recipe("t2v", "debug", 0.0))
    validate(_recipe("i2v"))
    validate(_recipe("mixed", "5B"))
    with pytest.raises(ConfigError, match=r"model\.flavor=debug is text-to-video only"):
        validate(_recipe("i2v", "debug"))
    with pytest.raises(ConfigError, match="min_timestep > 0"):
        validate(_recipe("mixed", min_t=0.0))
    with pytest.raises(ConfigError, match="i2v_fraction"):
        validate(_recipe("mixed", frac=1.5))
    assert set(I2V_FLAVORS) == {n for n, f in FLAVORS.items() if f.in_channels == 48}
    assert load_recipe(None).data.task == "t2v"


class _Trainer:
    def __init__(self, recipe, step=3, dp_rank=0):
        self.recipe, self.step = recipe, step
        self.strategy = SimpleNamespace(dp_rank=dp_rank)

    def step_generator(self, micro=0, salt=0):
        return rng.step_generator(self.recipe.seed, self.step, micro, self.strategy.dp_rank, salt)


def _noise(task, b=4, dp_rank=0, frac=0.5, step=3):
    r = _recipe(task, frac=frac)
    batch = {"latents": torch.zeros(b, 48, 6, 4, 4)}
    return TeacherForcing(r).noise(_Trainer(r, step, dp_rank), batch, 1)


def test_noise_conditions_first_frame_by_task():
    noise, sigma = _noise("t2v")
    # t2v: exactly the draws of before (sample_chunk_sigmas, then the noise, from one generator)
    g = rng.step_generator(0, 3, 1, 0, 0)
    fc = _recipe().method.forcing
    want = frames_sigma(sample_chunk_sigmas(4, 2, shift=fc.timestep_shift, min_t=20.0, generator=g), 3)
    assert torch.equal(sigma, want) and torch.equal(noise, torch.randn(noise.shape, generator=g))
    n_i2v, s_i2v = _noise("i2v")
    assert torch.equal(n_i2v, noise) and bool((s_i2v[:, 0] == 0).all())
    assert torch.equal(s_i2v[:, 1:], sigma[:, 1:]) and bool((sigma[:, 0] > 0).all())
    _, s_mix = _noise("mixed", b=16)
    cond = s_mix[:, 0] == 0
    assert 0 < int(cond.sum()) < 16  # some of each at fraction 0.5
    assert torch.equal(_noise("mixed", b=16)[1], s_mix)  # keyed: the same on a rerun / resume
    # the same per-sample draw however the global batch is split over data-parallel ranks
    halves = [(_noise("mixed", b=8, dp_rank=k)[1][:, 0] == 0) for k in (0, 1)]
    assert torch.equal(torch.cat(halves), cond)
    assert bool((_noise("mixed", b=8, frac=0.0)[1][:, 0] > 0).all())
    assert bool((_noise("mixed", b=8, frac=1.0)[1][:, 0] == 0).all())


def test_i2v_loss_skips_conditioning_tokens_and_logs_fraction():
    torch.manual_seed(0)
    r = _recipe("i2v")
    r.model.text_len = 8
    net = CausalWanDiT.from_flavor("wan2.2-debug", attn_backend="sdpa")
    tr = _Trainer(r)
    tr.device, tr.model = torch.device("cpu"), net
    tr.strategy = SimpleNamespace(dp_rank=0, mesh=SimpleNamespace(sp_size=1), sp_sum=lambda x: x)
    batch = {"latents": torch.randn(2, 48, 6, 4, 4), "text": torch.randn(2, 8, 32)}
    loss, logs = TeacherForcing(r).loss(tr, batch, 0)
    assert torch.isfinite(loss) and logs["i2v_fraction"] == 1.0
    r.data.task = "t2v"
    _, logs = TeacherForcing(r).loss(tr, batch, 0)
    assert "i2v_fraction" not in logs


# ---- vidtrain sample --image / --video ----------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("m")
    i2v = save_vidtrain(CausalWanDiT.from_flavor("wan2.2-debug"), root / "i2v")
    t2v = save_vidtrain(CausalWanDiT.from_flavor("debug"), root / "t2v")
    return i2v, t2v


class _Capture(VideoWriter):
    """The mp4 writer, also keeping the decoded pixel frames it was given (before mp4 encoding)."""

    got: list[torch.Tensor] = []

    def __call__(self, x_BCTHW):
        _Capture.got.append(x_BCTHW.clone())
        super().__call__(x_BCTHW)


def _argv(tmp_path, ckpt, *extra, chunks=2):
    shots = tmp_path / "shots.yaml"
    shots.write_text(f"shots:\n  - prompt: a cat\n    chunks: {chunks}\n")
    out = tmp_path / "v.mp4"
    return out, ["sample", "--checkpoint", str(ckpt), "--shots", str(shots), "--out", str(out), "--height", "64",
                 "--width", "64", "--steps", "1000,500", "--vae", "wan2.2-debug", "--device", "cpu", *extra]  # fmt: skip


def _png(path, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(img).save(path)
    return torch.from_numpy(img)


def test_cli_image_first_frame_is_the_vae_round_trip(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_cli, "VideoWriter", _Capture)
    _Capture.got = []
    img = _png(tmp_path / "first.png", 64, 64)
    out, argv = _argv(tmp_path, ckpts[0], "--image", str(tmp_path / "first.png"))
    assert cli_main(argv) == 0 and out.exists()
    frames = torch.cat(_Capture.got, dim=2)
    assert frames.shape[2] == 1 + 4 * (2 * 3 - 1)
    vae = sample_cli.load_vae("wan2.2-debug", 48, "cpu", torch.float32)
    pixels = img.permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(pixels))
    torch.testing.assert_close(frames[:, :, :1], round_trip, rtol=1e-5, atol=1e-5)
    # an image twice the size with the same aspect ratio is resized, not refused
    _png(tmp_path / "big.png", 128, 128)
    assert cli_main(_argv(tmp_path, ckpts[0], "--image", str(tmp_path / "big.png"))[1]) == 0


@pytest.mark.parametrize(
    "which,extra,needle",
    [
        (1, ["--image", "IMG", "--vae", "debug"], "text-to-video-only base"),
        (0, ["--vae", "debug"], "latent channels"),
        (0, ["--image", "WIDE"], "aspect ratios differ"),
        (0, ["--image", "IMG", "--video", "IMG"], "exclude each other"),
        (0, ["--video", "SHORT"], "shorter than one chunk"),
        (0, ["--include-prefix"], "needs --video"),
    ],
)
def test_cli_conditioning_errors_exit_2_one_line(ckpts, tmp_path, capsys, which, extra, needle):
    _png(tmp_path / "img.png", 64, 64)
    _png(tmp_path / "wide.png", 64, 96)
    _mp4(tmp_path / "short.mp4", 8)
    names = {"IMG": "img.png", "WIDE": "wide.png", "SHORT": "short.mp4"}
    extra = [str(tmp_path / names[e]) if e in names else e for e in extra]
    out, argv = _argv(tmp_path, ckpts[which], *extra)
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not out.exists()


def _mp4(path, n):
    g = torch.Generator().manual_seed(1)
    w = VideoWriter(path, 16.0)
    w(torch.rand(1, 3, n, 64, 64, generator=g) * 2 - 1)
    w.close()


@pytest.mark.parametrize("include", [False, True])
def test_cli_video_continuation(ckpts, tmp_path, monkeypatch, include):
    monkeypatch.setattr(sample_cli, "VideoWriter", _Capture)
    _mp4(tmp_path / "prefix.mp4", 12)  # 12 frames: 3 latent frames = one chunk (9 pixel frames)
    _Capture.got = []
    out, argv = _argv(tmp_path, ckpts[0], "--video", str(tmp_path / "prefix.mp4"),
                      *(["--include-prefix"] if include else []), chunks=1)  # fmt: skip
    assert cli_main(argv) == 0
    frames = torch.cat(_Capture.got, dim=2)
    prefix = 1 + 4 * 2
    assert frames.shape[2] == (prefix if include else 0) + 4 * 3  # one new chunk after the prefix
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["prefix_chunks"] == 1 and metrics["latent_frames"] == 6
