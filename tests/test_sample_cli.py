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
from vidtrain.sample.lora import load_lora, save_base_identity
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
        m = stream_video(sampler, conds, [2], (4, 4), [0], vae, mode, got.append)
        frames[mode] = torch.cat(got, dim=2)
        assert [r["chunk"] for r in m["timeline"]] == [0, 1]
    assert frames["sync"].shape[2] == 1 + 4 * 5
    assert torch.equal(frames["sync"], frames["async"])
    with torch.no_grad():
        torch.testing.assert_close(frames["sync"], vae.decode(m["_latents"]))


def test_cli_writes_mp4_metrics_timeline(ckpt, tmp_path):
    from vidtrain.cli import main

    shots = _shots(tmp_path, "shots:\n  - prompt: a cat\n    chunks: 2\n  - prompt: a dog\n    chunks: 1\n")
    out = tmp_path / "video.mp4"
    argv = ["sample", "--checkpoint", str(ckpt), "--shots", str(shots), "--out", str(out), "--height", "32",
            "--width", "32", "--steps", "1000,500", "--window-frames", "3", "--sink-frames", "1",
            "--kv-cache", "nvfp4", "--fps", "8"]  # fmt: skip
    assert main(argv) == 0
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


def _lora_folder(model, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q", "k", "v", "o"],
                                                  init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(str(path))
    save_base_identity(peft_model, path)
    return path


def test_lora_loads_on_its_base_and_refuses_another(tmp_path):
    torch.manual_seed(0)
    base = CausalWanDiT.from_flavor("debug")
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    folder = _lora_folder(CausalWanDiT.from_flavor("debug").requires_grad_(False), tmp_path / "lora")
    # the folder was made on a fresh random model: another base
    with pytest.raises(ValueError, match="another base"):
        load_lora(base, folder)
    torch.manual_seed(1)
    own = CausalWanDiT.from_flavor("debug")
    own_sd = {k: v.clone() for k, v in own.state_dict().items()}
    folder2 = _lora_folder(own, tmp_path / "lora2")
    fresh = CausalWanDiT.from_flavor("debug")
    fresh.load_state_dict(own_sd)
    merged = load_lora(fresh, folder2)
    assert isinstance(merged, CausalWanDiT)
    assert not torch.equal(merged.blocks[0].self_attn.q.weight, own_sd["blocks.0.self_attn.q.weight"])
    assert torch.equal(base.state_dict()["head.head.weight"], ref["head.head.weight"])


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
