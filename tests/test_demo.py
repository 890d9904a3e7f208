"""`make demo`'s job end to end (shortened): every stage's console command, the report, the video;
the shipped demo weights (vidtrain/assets/demo/) against the random-init baseline; the report's
grids, fidelity table and relative paths."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vidtrain.assets_paths import sample_video_dir
from vidtrain.data_tools import shard
from vidtrain.demo import DEMO_ASSETS
from vidtrain.models.text import TextEncoder
from vidtrain.models.vae import CausalVideoVAE
from vidtrain.models.wan import CausalWanDiT
from vidtrain.report import (
    fidelity,
    frame_distance,
    generate,
    plot_grid,
    prompts_of,
    random_init,
    read_clips,
    reconstruct,
    shot_frames,
    write_report,
)
from vidtrain.sample.sampler import SamplerConfig

LINK = re.compile(r"!?\[[^\]]*\]\(([^)]+)\)")


def report_links(report: Path) -> list[str]:
    return LINK.findall(report.read_text())


def assert_relative_links(out: Path) -> list[str]:
    """Every link of out/report.md is relative and names a file or folder under out."""
    links = report_links(out / "report.md")
    for link in links:
        assert not Path(link).is_absolute() and "://" not in link, link
        assert (out / link).exists(), link
    assert "/tmp" not in (out / "report.md").read_text()
    return links


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "vidtrain.demo", "--out", str(out), "--steps", "2", "--dmd-steps", "5"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "vidtrain demo finished" in proc.stdout
    for rel in ("video.mp4", "video.metrics.json", "video.timeline.png", "report.md", "dmd/lora/adapter_config.json",
                "tf/balance.png", "qat/checkpoints/latest", "qat/checkpoints/step_000020/model/quant.json",
                "fidelity.json", "grids/tf.png", "grids/qat.png", "grids/dmd.png", "grids/random.png",
                "drift/eval.md", "drift/eval.drift.json", "drift/eval.drift.png"):  # fmt: skip
        assert (out / rel).exists(), rel
    metrics = json.loads((out / "video.metrics.json").read_text())
    assert metrics["fps_end_to_end"] > 0 and metrics["kv_cache_bytes"] > 0
    import imageio.v3 as iio

    frames = iio.imread(out / "video.mp4")
    assert frames.shape[0] == 1 + 4 * (3 * 7 - 1)  # 7 chunks of 3 latent frames
    # teacher forcing started from the shipped DiT
    assert f"model.checkpoint={DEMO_ASSETS / 'dit'}" in proc.stdout
    # the report: each stage's grid, the fidelity table, only relative paths (the folder can move)
    links = assert_relative_links(out)
    for stage in ("tf", "qat", "dmd", "random"):
        assert f"grids/{stage}.png" in links
    assert "drift/eval.drift.png" in links  # the drift plot of the 8x-long generations
    drift = json.loads((out / "drift" / "eval.drift.json").read_text())
    assert len(drift["runs"]) == 2  # teacher forcing and QAT side by side
    fid = json.loads((out / "fidelity.json").read_text())
    for stage in ("tf", "qat", "dmd"):
        assert fid["stages"][stage]["prompted"] < fid["stages"]["random"]["prompted"], (stage, fid)
    assert [s["chunks"] for s in fid["video"]["shots"]] == [3, 2, 2]
    assert fid["video"]["distance"] < fid["video"]["random"]
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)
    assert_relative_links(moved)


def test_i2v_demo_end_to_end(tmp_path):
    """`python -m vidtrain.demo --i2v` (shortened): the Wan2.2-shaped pair's shipped weights,
    teacher forcing with data.task=mixed, `vidtrain sample --image`; the first generated frame
    is the image through the VAE, and image-conditioned samples are closer to their clips than
    the random-init pair's."""
    out = tmp_path / "demo_i2v"
    proc = subprocess.run(
        [sys.executable, "-m", "vidtrain.demo", "--i2v", "--out", str(out), "--steps", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "image-to-video demo finished" in proc.stdout
    for rel in (
        "video.mp4",
        "first_frame.png",
        "report.md",
        "fidelity.json",
        "grids/i2v.png",
        "grids/i2v_random.png",
    ):
        assert (out / rel).exists(), rel
    fid = json.loads((out / "fidelity.json").read_text())
    assert fid["task"] == "i2v" and fid["first_frame"]["max_abs_vs_vae_round_trip"] <= 1
    st = fid["stages"]
    assert st["i2v"]["prompted"] < st["i2v_random"]["prompted"], st  # the shipped pair beats random init
    assert set(fid["swapped"]) >= {"to_caption_clips", "to_image_clips"}
    links = assert_relative_links(out)
    assert "grids/i2v.png" in links and "video.mp4" in links


# ---------------------------------------------------------------- the shipped weights


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The demo's clips, cut by vidtrain-shard with the demo's arguments."""
    out = tmp_path_factory.mktemp("demo_clips") / "video_shards"
    rc = shard.main([str(sample_video_dir()), str(out), "--height", "64", "--width", "64", "--frames", "21",
                     "--fps", "8", "--max-clips-per-video", "3", "--samples-per-shard", "4", "--no-progress"])  # fmt: skip
    assert rc == 0
    return read_clips(out)


def test_shipped_weights_load():
    for name in ("vae.safetensors", "text_encoder", "dit", "shots.yaml", "README.md", "train_log.txt"):
        assert (DEMO_ASSETS / name).exists(), name
    vae = CausalVideoVAE.from_pretrained(DEMO_ASSETS / "vae.safetensors")
    assert vae.config == CausalVideoVAE.from_flavor("debug").config
    model = CausalWanDiT.from_pretrained(str(DEMO_ASSETS / "dit"), flavor="debug")
    te = TextEncoder.from_pretrained(DEMO_ASSETS / "text_encoder", max_length=16)
    assert te.dim == model.cfg.text_dim
    for p in (*vae.parameters(), *model.parameters()):
        assert torch.isfinite(p).all()


def test_shipped_weights_beat_random_init(clips):
    """One short generation (2 chunks, 64x64) per clip caption: the trained weights' frames are
    measurably closer to the clips than the random-init baseline's under the report's figure, and
    the prompt steers the content (closer to the prompted video than to the others)."""
    prompts = prompts_of(clips)
    assert len(prompts) == 4  # bigbuckbunny, bikes, carphone_distorted, carphone_pristine
    cfg = SamplerConfig.from_run(DEMO_ASSETS / "dit")  # as trained: window, sinks, text length
    assert (cfg.window_frames, cfg.sink_frames, cfg.shot_sink) == (6, 3, True)
    te = TextEncoder.from_pretrained(DEMO_ASSETS / "text_encoder", max_length=cfg.text_len)
    vae = CausalVideoVAE.from_pretrained(DEMO_ASSETS / "vae.safetensors")
    model = CausalWanDiT.from_pretrained(str(DEMO_ASSETS / "dit"))
    rand_model, rand_vae = random_init(0)
    trained = fidelity(generate(model, cfg, vae, te, prompts, chunks=2, seed=0), clips)
    rand = fidelity(generate(rand_model, cfg, rand_vae, te, prompts, chunks=2, seed=0), clips)
    assert trained["prompted"] < 0.6 * rand["prompted"], (trained, rand)
    # the caption steers the content: each of the two unlike videos comes out nearest its own clips
    for prompt in ("bigbuckbunny", "bikes"):
        row = trained["by_caption"][prompt]
        assert min(row, key=row.get) == prompt, row
    assert trained["motion"] > 0.0
    # the VAE alone: the clips through the trained VAE vs through the random one
    first = [next(c for c in clips if c[0] == p) for p in prompts]
    recon = {c: f for c, f in reconstruct(vae, first)}
    recon_rand = {c: f for c, f in reconstruct(rand_vae, first)}
    assert fidelity(recon, clips)["prompted"] < 0.5 * fidelity(recon_rand, clips)["prompted"]


# ---------------------------------------------------------------- the report on a fake run folder


def test_frame_distance():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    assert frame_distance(ref, ref) == pytest.approx(0.0, abs=1e-7)
    assert frame_distance(ref[2:3], ref) == pytest.approx(0.0, abs=1e-7)  # the nearest frame counts
    black, white = np.zeros_like(ref[:1]), np.full_like(ref[:1], 255)
    assert frame_distance(white, black) == pytest.approx(1.0)
    assert frame_distance(ref[:1] // 2, ref) > 0.0


def test_shot_frames():
    """The demo video's shots (3, 2, 2 chunks of 3 latent frames) in its 81 pixel frames."""
    shots = [{"chunks": 3}, {"chunks": 2}, {"chunks": 2}]
    assert shot_frames(shots, 3) == [(0, 33), (33, 57), (57, 81)]


def test_write_report_grids_and_relative_paths(tmp_path):
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    clips = [(c, rng.integers(0, 256, (21, 16, 16, 3), dtype=np.uint8)) for c in ("a", "b", "a")]
    stages = {}
    for stage in ("random", "tf", "qat", "dmd", "vae"):
        gen = {p: rng.integers(0, 256, (21, 16, 16, 3), dtype=np.uint8) for p in ("a", "b")}
        stages[stage] = fidelity(gen, clips) | {"grid": f"grids/{stage}.png"}
        plot_grid(gen, clips, out / "grids" / f"{stage}.png", stage)
    (out / "fidelity.json").write_text(
        json.dumps({"chunks": 2, "size": [16, 16], "seed": 0, "prompts": ["a", "b"], "stages": stages})
    )
    for run in ("tf", "qat", "dmd/lora"):
        (out / run).mkdir(parents=True, exist_ok=True)
    (out / "tf" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    (out / "video.mp4").write_bytes(b"")
    (out / "video.metrics.json").write_text(json.dumps({"fps_end_to_end": 10.0, "timeline": []}))
    report = write_report(out, {"train": 1.0, "figures": 2.0}, {"train": (3.25, 2.0, 1.0), "figures": None})
    text = report.read_text()
    assert "| train | 1.0 | 3.2 |" in text and "| figures | 2.0 |  |" in text  # the load beside the time
    assert "1-minute load average" in text
    assert "## What the model learned" in text and "| teacher forcing |" in text and "cannot" in text
    links = assert_relative_links(out)
    for stage in ("random", "tf", "qat", "dmd", "vae"):
        assert f"grids/{stage}.png" in links
        png = out / "grids" / f"{stage}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert_relative_links(moved)
