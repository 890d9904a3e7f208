"""Shots files, async decode, the mp4 + metrics of `vidtrain sample`, LoRA loading, eval table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidtrain.models.vae import CausalVideoVAE
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.state_dict import save_vidtrain
from vidtrain.sample.decode import stream_video
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.sample.shots import load_shots, parse_shots

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return save_vidtrain(CausalWanDiT.from_flavor("debug"), tmp_path_factory.mktemp("m") / "model")


def _shots(tmp_path, text: str) -> Path:
    p = tmp_path / "shots.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "doc,err",
    [
        ({"shots": [{"prompt": "a", "chunks": 0}]}, "chunks"),
        ({"shots": [{"prompt": "a", "seconds": -1}]}, "seconds"),
        ({"shots": [{"prompt": "a", "chunks": 2, "fps": 3}]}, "unknown keys"),
        ({"shots": [{"prompt": "a", "chunks": 2, "seconds": 1}]}, "exactly one"),
        ({"shots": [], "x": 1}, "exactly the key"),
        ({"shots": []}, "non-empty"),
        ({"shots": [{"prompt": "", "chunks": 1}]}, "prompt"),
    ],
)
def test_bad_shots_rejected(doc, err):
    with pytest.raises(ValueError, match=err):
        parse_shots(doc, fps=16, frames_per_chunk=3)


def test_shots_seconds_round_up_to_chunks_and_example_loads():
    shots = parse_shots({"shots": [{"prompt": "a", "seconds": 1.0}, {"prompt": "b", "chunks": 2}]}, fps=16,
                        frames_per_chunk=3)  # fmt: skip
    assert [s.chunks for s in shots] == [2, 2]  # 16 frames / 12 per chunk -> 2
    for path in REPO.glob("recipes/shots_*.yaml"):
        assert load_shots(path, fps=16, frames_per_chunk=3)


def test_async_decode_equals_sync(ckpt):
    model = CausalWanDiT.from_pretrained(str(ckpt)).eval()
    vae = CausalVideoVAE.from_flavor("debug").eval()
    sampler = StreamingSampler(model, SamplerConfig(window_frames=3, timesteps=(1000.0, 500.0)))
    conds = [debug_text_context(["a"], model.cfg.text_dim)]
    frames = {}
    for mode in ("sync", "async"):
        got = []
        m = stream_video(sampler, conds, [2], (4, 4), [0], vae, mode, got.append, keep_latents=True)
        frames[mode] = torch.cat(got, dim=2)
        assert [r["chunk"] for r in m["timeline"]] == [0, 1]
    assert frames["sync"].shape[2] == 1 + 4 * 5
    assert torch.equal(frames["sync"], frames["async"])
    with torch.no_grad():
        torch.testing.assert_close(frames["sync"], vae.decode(m["_latents"]))


def test_cli_writes_mp4_metrics_timeline(ckpt, tmp_path, capsys):
    from vidtrain.cli import main

    shots = _shots(tmp_path, "shots:\n  - prompt: a cat\n    chunks: 2\n  - prompt: a dog\n    chunks: 1\n")
    out = tmp_path / "video.mp4"
    argv = ["sample", "--checkpoint", str(ckpt), "--shots", str(shots), "--out", str(out), "--height", "32",
            "--width", "32", "--steps", "1000,500", "--window-frames", "3", "--sink-frames", "1",
            "--kv-cache", "nvfp4", "--fps", "8"]  # fmt: skip
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "[vidtrain] size 32x32 px from flags: 4x4 latents" in said  # what it resolved, and whence
    assert (
        "warning: --vae debug is a randomly initialised VAE" in said and "warning: no --text-encoder" in said
    )
    chunk_lines = [line for line in said.splitlines() if line.startswith("[vidtrain] sample chunk ")]
    assert [line.split()[3] for line in chunk_lines] == ["1/3", "2/3", "3/3"]  # per chunk, with times
    assert "generate_s" in chunk_lines[-1] and "s/chunk, eta 0 s)" in chunk_lines[-1]
    metrics = json.loads((tmp_path / "video.metrics.json").read_text())
    for k in ("fps_end_to_end", "first_chunk_latency_s", "peak_memory_bytes", "kv_cache_bytes", "timeline"):
        assert k in metrics
    assert len(metrics["timeline"]) == 3 and metrics["pixel_frames"] == 1 + 4 * 8
    assert (tmp_path / "video.timeline.png").stat().st_size > 0
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(out))
    n = sum(1 for _ in reader)
    assert n == 33 and reader.get_meta_data()["fps"] == 8
    reader.close()


def test_cli_errors_before_compute(ckpt, tmp_path):
    from vidtrain.cli import main

    good = _shots(tmp_path, "shots:\n  - prompt: a\n    chunks: 1\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shots:\n  - prompt: a\n    chunks: 0\n")
    base = ["sample", "--checkpoint", str(ckpt), "--height", "32", "--width", "32"]
    assert main([*base, "--shots", str(bad), "--out", str(tmp_path / "o.mp4")]) == 2
    assert main([*base, "--shots", str(good), "--out", str(tmp_path / "missing" / "o.mp4")]) == 2
    assert main([*base, "--shots", str(good), "--out", str(tmp_path / "o.mp4"), "--height", "40"]) == 2
    assert (
        main(
            ["sample", "--checkpoint", str(tmp_path), "--shots", str(good), "--out", str(tmp_path / "o.mp4")]
        )
        == 2
    )
    assert not (tmp_path / "o.mp4").exists()


def _dmd_lora(base_folder: Path, out: Path) -> Path:
    """A DMD-style LoRA (the `dmd` role, non-trivial weights) exported for the base in base_folder."""
    from vidtrain.lora import roles as lora
    from vidtrain.lora.files import export_lora

    model = lora.add_roles(CausalWanDiT.from_pretrained(base_folder), 4, 4.0, ["q", "k", "v", "o"])
    with torch.no_grad():
        for p in lora.adapter_params(model, "dmd").values():
            p.normal_(0, 0.05)
    return export_lora(model, out, teacher=str(base_folder))


def test_sample_with_lora_and_wrong_base(ckpt, tmp_path):
    from vidtrain.cli import main
    from vidtrain.sample.cli import load_model

    folder = _dmd_lora(ckpt, tmp_path / "lora")
    merged = load_model(ckpt, str(folder))
    assert isinstance(merged, CausalWanDiT)
    plain = CausalWanDiT.from_pretrained(ckpt)
    assert not torch.equal(merged.blocks[0].self_attn.q.weight, plain.blocks[0].self_attn.q.weight)
    good = _shots(tmp_path, "shots:\n  - prompt: a fox\n    chunks: 2\n")
    base = ["sample", "--shots", str(good), "--height", "32", "--width", "32", "--vae", "debug"]
    assert (
        main([*base, "--checkpoint", str(ckpt), "--lora", str(folder), "--out", str(tmp_path / "v.mp4")]) == 0
    )
    torch.manual_seed(1)
    other = save_vidtrain(CausalWanDiT.from_flavor("debug"), tmp_path / "other")
    with pytest.raises(ValueError, match="wrong base checkpoint"):
        load_model(other, str(folder))
    assert (
        main([*base, "--checkpoint", str(other), "--lora", str(folder), "--out", str(tmp_path / "w.mp4")])
        == 2
    )
    assert not (tmp_path / "w.mp4").exists()


def test_qat_checkpoint_samples_as_trained(tmp_path):
    """A checkpoint with quant.json is rebuilt with the same NVFP4 fake-quant linears."""
    from vidtrain.quant.qat import NVFP4Linear, convert, write_quant_record
    from vidtrain.sample.cli import load_model

    torch.manual_seed(0)
    model = convert(CausalWanDiT.from_flavor("debug"))
    folder = save_vidtrain(model, tmp_path / "qat")
    write_quant_record(model, folder)
    loaded = load_model(folder, None)
    want = [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)]
    assert want and [n for n, m in loaded.named_modules() if isinstance(m, NVFP4Linear)] == want
    x, t, ctx = torch.randn(1, 16, 3, 4, 4), torch.tensor([300.0]), torch.randn(1, 4, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ctx), model(x, t, ctx))


def test_eval_writes_table(ckpt, tmp_path):
    from vidtrain.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "table.md"
    argv = ["eval", "--checkpoints", str(ckpt), str(ckpt), "--prompts", str(prompts), "--out", str(out),
            "--height", "32", "--width", "32", "--chunks", "2", "--steps", "1000,500", "--kv-cache", "bf16",
            "nvfp4", "--window-frames", "3"]  # fmt: skip
    assert main(argv) == 0
    text = out.read_text()
    assert "temporal_consistency" in text and text.count("nvfp4") == 2
    assert len(out.with_suffix(".csv").read_text().strip().splitlines()) == 5


def _step_folder(ckpt, tmp_path, recipe: str) -> Path:
    """A run folder laid out like vidtrain.train.checkpoint: run/recipe.yaml,
    run/checkpoints/step_00000002/{model/, recipe.yaml, trainer_state.pt}, latest pointer."""
    import shutil

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    shutil.copytree(ckpt, step / "model")
    (step / "trainer_state.pt").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text(step.name)
    (step / "recipe.yaml").write_text(recipe)
    (run / "recipe.yaml").write_text(recipe)
    return step


def test_sampler_defaults_come_from_checkpoint_recipe(ckpt, tmp_path, capsys):
    from vidtrain.sample.cli import fill_sampler_args, parser, sampler_config

    recipe = "model:\n  frames_per_chunk: 2\n  window_frames: 4\n  sink_frames: 2\n  shot_sink: true\n"
    step = _step_folder(ckpt, tmp_path, recipe)
    base = ["--shots", "s.yaml", "--out", "o.mp4"]
    for folder in (step, step / "model", step.parents[1]):  # step folder, model folder, run folder
        args = parser().parse_args(["--checkpoint", str(folder), *base])
        cfg = sampler_config(fill_sampler_args(args, args.checkpoint))
        assert (cfg.frames_per_chunk, cfg.window_frames, cfg.sink_frames, cfg.shot_sink) == (2, 4, 2, True)
        assert cfg.timesteps == SamplerConfig.timesteps  # not in the recipe: SamplerConfig's default
    assert "from recipe" in capsys.readouterr().out
    # explicit flags win over the recipe; 'none' turns the recipe's window off
    args = parser().parse_args(["--checkpoint", str(step), *base, "--window-frames", "6", "--sink-frames", "0",
                                "--no-shot-sink", "--frames-per-chunk", "3"])  # fmt: skip
    cfg = sampler_config(fill_sampler_args(args, args.checkpoint))
    assert (cfg.frames_per_chunk, cfg.window_frames, cfg.sink_frames, cfg.shot_sink) == (3, 6, 0, False)
    args = parser().parse_args(["--checkpoint", str(step), *base, "--window-frames", "none"])
    cfg = sampler_config(fill_sampler_args(args, args.checkpoint))
    assert cfg.window_frames is None and not cfg.shot_sink and cfg.sink_frames == 2
    # a bare model folder (no recipe): SamplerConfig defaults, except that the CLI bounds the
    # history (constant memory by default: config.SAMPLE_WINDOW_FRAMES / SAMPLE_SINK_FRAMES)
    from vidtrain.config import SAMPLE_SINK_FRAMES, SAMPLE_WINDOW_FRAMES

    args = parser().parse_args(["--checkpoint", str(ckpt), *base])
    cfg = sampler_config(fill_sampler_args(args, args.checkpoint))
    d = SamplerConfig()
    assert (cfg.frames_per_chunk, cfg.timesteps, cfg.shift) == (d.frames_per_chunk, d.timesteps, d.shift)
    assert (cfg.window_frames, cfg.sink_frames, cfg.shot_sink) == (
        SAMPLE_WINDOW_FRAMES,
        SAMPLE_SINK_FRAMES,
        True,
    )
    assert "constant-memory default" in capsys.readouterr().out


def test_unbounded_history_only_when_asked(ckpt, tmp_path, capsys):
    from vidtrain.sample.cli import fill_sampler_args, parser, sampler_config

    base = ["--shots", "s.yaml", "--out", "o.mp4"]
    step = _step_folder(ckpt, tmp_path, "model:\n  frames_per_chunk: 3\n")  # trained without a window
    cfg = sampler_config(
        fill_sampler_args(parser().parse_args(["--checkpoint", str(step), *base]), str(step))
    )
    assert cfg.window_frames == 12 and cfg.sink_frames == 3 and cfg.shot_sink
    args = parser().parse_args(["--checkpoint", str(step), *base, "--window-frames", "none"])
    cfg = sampler_config(fill_sampler_args(args, args.checkpoint))
    assert cfg.window_frames is None and not cfg.shot_sink and cfg.sink_frames == 0


def test_lora_record_sets_steps_over_recipe(ckpt, tmp_path):
    from vidtrain.sample.cli import fill_sampler_args, parser, sampler_config

    step = _step_folder(ckpt, tmp_path, "model:\n  window_frames: 3\n")
    lora = tmp_path / "lora"
    lora.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (lora / f).write_text("{}")
    (lora / "vidtrain_base.json").write_text(
        json.dumps({"denoising_steps": [1000, 500], "timestep_shift": 3.0})
    )
    base = ["--checkpoint", str(step), "--lora", str(lora), "--shots", "s.yaml", "--out", "o.mp4"]
    args = parser().parse_args(base)
    cfg = sampler_config(fill_sampler_args(args, args.checkpoint, args.lora))
    assert cfg.timesteps == (1000.0, 500.0) and cfg.shift == 3.0 and cfg.window_frames == 3
    args = parser().parse_args([*base, "--steps", "1000,750,500", "--shift", "5"])
    cfg = sampler_config(fill_sampler_args(args, args.checkpoint, args.lora))
    assert cfg.timesteps == (1000.0, 750.0, 500.0) and cfg.shift == 5.0


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--shift", "nan"], "--shift must be a finite number > 0, got nan"),
        (["--shift", "inf"], "--shift must be a finite number > 0, got inf"),
        (["--shift", "0"], "--shift must be a finite number > 0, got 0"),
        (["--steps", "0"], "timesteps must be in (0, 1000]"),
        (["--steps", "-250"], "timesteps must be in (0, 1000]"),
        (["--steps", "nan"], "timesteps must be in (0, 1000]"),
        (["--steps", ","], "--steps needs at least one timestep"),
        (["--steps", ",".join(str(1000 - i / 2) for i in range(1200))], "--steps takes at most 1000"),
        (["--fps", "nan"], "--fps must be a finite number in (0, 1000], got nan"),
        (["--fps", "1e9"], "--fps must be a finite number in (0, 1000], got 1e+09"),
        (["--width", "16000000"], "--width 16000000 is 1000000 patches: more than the 1024 RoPE positions"),
        (["--height", "16400"], "--height 16400 is 1025 patches: more than the 1024 RoPE positions"),
        (["--width", "0"], "--height/--width must be positive multiples of 16"),
        (["--frames-per-chunk", "0"], "--frames-per-chunk must be >= 1, got 0"),
        (["--sink-frames", "-1"], "--sink-frames must be >= 0, got -1"),
        (["--window-frames", "-3"], "window_frames must be >= 0"),
        (["--shot-rope-offset", "-2"], "--shot-rope-offset must be >= 0, got -2"),
        (["--shot-rope-offset", "5000"], "temporal RoPE positions reach 5005"),
        (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
        (["--max-memory-gib", "nan"], "--max-memory-gib must be a finite number > 0, got nan"),
        (["--max-memory-gib", "0.00001"], "needs an estimated"),
    ],
)
def test_out_of_range_sampler_args_exit_2_one_line_nothing_written(ckpt, tmp_path, capsys, extra, needle):
    from vidtrain.cli import main

    shots = _shots(tmp_path, "shots:\n  - prompt: a\n    chunks: 1\n  - prompt: b\n    chunks: 1\n")
    out = tmp_path / "video.mp4"
    out.write_bytes(b"an older video")
    before = _listing(tmp_path)
    argv = ["sample", "--checkpoint", str(ckpt), "--shots", str(shots), "--out", str(out), "--height", "32",
            "--width", "32", "--steps", "1000,500", *extra]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vidtrain sample: error: ") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert _listing(tmp_path) == before  # nothing written, nothing replaced


def test_huge_shots_file_and_memory_estimate_are_refused_up_front(ckpt, tmp_path, capsys):
    from vidtrain.cli import main

    out = tmp_path / "v.mp4"
    base = ["sample", "--checkpoint", str(ckpt), "--out", str(out), "--height", "32", "--width", "32"]
    huge = _shots(tmp_path, "shots:\n  - prompt: a\n    chunks: 100000000\n")
    assert main([*base, "--shots", str(huge)]) == 2
    err = capsys.readouterr().err
    assert "temporal RoPE positions reach 299999999" in err and "1024" in err
    long = _shots(tmp_path, "shots:\n  - prompt: a\n    seconds: 1.0e+300\n")
    assert main([*base, "--shots", str(long)]) == 2
    assert "temporal RoPE positions reach" in capsys.readouterr().err
    # all history kept (no window) at a large size: refused by the memory estimate, with its parts
    ok = _shots(tmp_path, "shots:\n  - prompt: a\n    chunks: 300\n")
    big = ["--height", "8192", "--width", "8192", "--window-frames", "none", "--max-memory-gib", "64"]
    assert main([*base, "--shots", str(ok), *big]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs an estimated" in err and "KV cache" in err and "--max-memory-gib" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_out_is_replaced_atomically_and_a_killed_run_keeps_the_old_video(ckpt, tmp_path):
    import subprocess
    import sys

    shots = _shots(tmp_path, "shots:\n  - prompt: a cat\n    chunks: 2\n")
    out = tmp_path / "video.mp4"
    old = {
        out: b"the old video",
        out.with_suffix(".metrics.json"): b"{}",
        out.with_suffix(".timeline.png"): b"png",
    }
    for p, data in old.items():
        p.write_bytes(data)
    argv = ["--checkpoint", str(ckpt), "--shots", str(shots), "--out", str(out), "--height", "32",
            "--width", "32", "--steps", "1000", "--decode", "sync"]  # fmt: skip
    child = (
        "import os, sys\n"
        "import vidtrain.sample.cli as c\n"
        "real = c.stream_video\n"
        "def dying(sampler, conds, chunks, hw, seeds, vae, mode, sink, **kw):\n"
        "    def sink2(x):\n"
        "        sink(x)\n"
        "        os._exit(9)  # killed after the first decoded chunk reached the writer\n"
        "    return real(sampler, conds, chunks, hw, seeds, vae, mode, sink2, **kw)\n"
        "c.stream_video = dying\n"
        f"sys.exit(c.main({argv!r}))\n"
    )
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert res.returncode == 9, res.stderr[-2000:]
    for p, data in old.items():
        assert p.read_bytes() == data  # untouched
    stale = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert stale  # the killed run's temp file

    from vidtrain.sample.cli import main

    assert main(argv) == 0
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(out))
    assert sum(1 for _ in reader) == 1 + 4 * 5
    reader.close()
    assert json.loads(out.with_suffix(".metrics.json").read_text())["pixel_frames"] == 21
    assert out.with_suffix(".timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the dead run's temp is cleaned


def test_a_failing_run_leaves_the_old_outputs(ckpt, tmp_path, monkeypatch, capsys):
    import vidtrain.sample.cli as c

    shots = _shots(tmp_path, "shots:\n  - prompt: a cat\n    chunks: 1\n")
    out = tmp_path / "video.mp4"
    out.write_bytes(b"old")

    def failing(*a, **kw):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(c, "stream_video", failing)
    before = _listing(tmp_path)
    with pytest.raises(RuntimeError, match="simulated"):
        c.main(["--checkpoint", str(ckpt), "--shots", str(shots), "--out", str(out), "--height", "32",
                "--width", "32", "--steps", "1000"])  # fmt: skip
    assert _listing(tmp_path) == before


def test_eval_image_every_checkpoint_starts_from_it(tmp_path, monkeypatch, capsys):
    """`vidtrain eval --image`: `vidtrain sample --image`'s loader and checks; each checkpoint's
    videos start from the image's latent (bit-exactly), a text-to-video base is refused."""
    from PIL import Image

    from vidtrain.cli import main
    from vidtrain.sample import evaluate
    from vidtrain.sample.cli import encode_frames, load_vae, read_image

    torch.manual_seed(0)
    a = save_vidtrain(CausalWanDiT.from_flavor("wan2.2-debug"), tmp_path / "a")
    b = save_vidtrain(CausalWanDiT.from_flavor("wan2.2-debug"), tmp_path / "b")
    t2v = save_vidtrain(CausalWanDiT.from_flavor("debug"), tmp_path / "t2v")
    g = torch.Generator().manual_seed(0)
    png = tmp_path / "first.png"
    Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()).save(png)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "table.md"
    seen = []
    real = evaluate.generate

    def spy(model, cfg, conds, *rest):
        row, z = real(model, cfg, conds, *rest)
        seen.append((conds[0].image_latent, z))
        return row, z

    monkeypatch.setattr(evaluate, "generate", spy)
    base = ["eval", "--prompts", str(prompts), "--out", str(out), "--height", "64", "--width", "64",
            "--chunks", "2", "--steps", "1000,500", "--device", "cpu", "--image", str(png)]  # fmt: skip
    assert main([*base, "--checkpoints", str(a), str(b), "--vae", "wan2.2-debug"]) == 0
    vae = load_vae("wan2.2-debug", 48, "cpu", torch.float32)
    want = encode_frames(vae, read_image(png, 64, 64))[:, :, 0]
    assert len(seen) == 2 and len(out.with_suffix(".csv").read_text().strip().splitlines()) == 3
    for image, z in seen:
        assert image.shape == (2, 48, 4, 4) and torch.equal(image, want.expand(2, -1, -1, -1))
        assert torch.equal(z[:, :, 0], image)
    assert not torch.equal(seen[0][1], seen[1][1])  # two checkpoints, two videos, one first frame
    capsys.readouterr()
    assert main([*base, "--checkpoints", str(a), str(t2v), "--vae", "wan2.2-debug"]) == 2
    assert "text-to-video-only base" in capsys.readouterr().err
    assert main([*base, "--checkpoints", str(a)]) == 2  # --vae debug: 16 channels, not 48
    assert "latent channels" in capsys.readouterr().err
    assert len(seen) == 2  # both refused before any compute
