"""SamplerConfig.from_run: a run samples with what it was trained with (the KV format included),
for `vidtrain sample`, `vidtrain eval` and DMD's rollouts alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vidtrain.config import load_recipe
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.state_dict import save_vidtrain
from vidtrain.quant.qat import convert, write_quant_record
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler

TINY = ["train.progress=false", "train.ema_decay=null", "log.wandb=disabled", "log.plots=false",
        "data.frames=6", "data.height=4", "data.width=4", "data.synthetic_samples=2", "data.text_len=4"]  # fmt: skip


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory) -> Path:
    """A tiny QAT run folder (one step): recipe.yaml, checkpoints/step_000001/model/quant.json."""
    from vidtrain.train.trainer import train

    run = tmp_path_factory.mktemp("qat") / "run"
    train(load_recipe(None, [f"run.dir={run}", "method.name=qat", "train.max_steps=1", *TINY]))
    return run


def _kv_formats_of_sample(argv: list[str], monkeypatch) -> list[str]:
    """The KV cache formats `vidtrain sample` streamed with."""
    from vidtrain.cli import main

    seen = []
    new_cache = StreamingSampler.new_cache

    def spy(self, tokens_per_frame):
        cache = new_cache(self, tokens_per_frame)
        seen.append(cache.kv_dtype)
        return cache

    monkeypatch.setattr(StreamingSampler, "new_cache", spy)
    assert main(argv) == 0
    return seen


def test_sample_of_a_qat_run_uses_nvfp4_kv_unless_told(qat_run, tmp_path, monkeypatch, capsys):
    shots = tmp_path / "shots.yaml"
    shots.write_text("shots:\n  - prompt: a\n    chunks: 2\n")
    base = ["sample", "--checkpoint", str(qat_run), "--shots", str(shots), "--out", str(tmp_path / "v.mp4"),
            "--height", "32", "--width", "32", "--steps", "1000,500", "--decode", "sync"]  # fmt: skip
    assert _kv_formats_of_sample(base, monkeypatch) == ["nvfp4"]
    out = capsys.readouterr().out
    assert "kv_cache=nvfp4 from quant record" in out and "quant.json" in out  # it says so
    assert _kv_formats_of_sample([*base, "--kv-cache", "bf16"], monkeypatch) == ["bf16"]
    assert "kv_cache=bf16 from flag" in capsys.readouterr().out


def test_eval_of_a_qat_run_defaults_to_its_nvfp4_kv_and_bounds_chunks(qat_run, tmp_path, capsys):
    from vidtrain.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    out = tmp_path / "t.md"
    base = ["eval", "--checkpoints", str(qat_run), "--prompts", str(prompts), "--out", str(out), "--height", "32",
            "--width", "32", "--steps", "1000"]  # fmt: skip
    assert main([*base, "--chunks", "1"]) == 0
    assert out.with_suffix(".csv").read_text().splitlines()[1].split(",")[1] == "nvfp4"
    capsys.readouterr()
    assert main([*base, "--chunks", "100000000"]) == 2  # refused before any compute, as sample does
    err = capsys.readouterr().err
    assert "temporal RoPE positions reach 299999999" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--chunks", "1", "--max-memory-gib", "0.00001"]) == 2
    assert "needs an estimated" in capsys.readouterr().err


def test_run_layers_flag_over_lora_over_recipe_over_default(qat_run, tmp_path):
    logs: list[str] = []
    cfg = SamplerConfig.from_run(qat_run, log=logs.append)
    assert cfg.kv_cache == "nvfp4" and cfg.frames_per_chunk == 3 and cfg.timesteps == SamplerConfig.timesteps
    assert any("from recipe" in line for line in logs)
    assert SamplerConfig.from_run(qat_run, overrides={"kv_cache": "fp16"}).kv_cache == "fp16"
    # a bare model folder: its quant.json alone says NVFP4
    torch.manual_seed(0)
    model = convert(CausalWanDiT.from_flavor("debug"))
    bare = save_vidtrain(model, tmp_path / "bare")
    assert SamplerConfig.from_run(bare).kv_cache == SamplerConfig.kv_cache
    write_quant_record(model, bare)
    assert SamplerConfig.from_run(bare).kv_cache == "nvfp4"
    # no window: no shot sink, whatever asked; a window without a record: a shot sink
    assert not SamplerConfig.from_run(bare, overrides={"shot_sink": True}).shot_sink
    assert SamplerConfig.from_run(bare, overrides={"window_frames": 3}).shot_sink
    with pytest.raises(ValueError, match="unknown sampler setting"):
        SamplerConfig.from_run(bare, overrides={"kv": "bf16"})


def test_a_qat_run_trained_on_high_precision_kv_samples_with_it(tmp_path):
    from vidtrain.train.trainer import train

    run = tmp_path / "run"
    train(
        load_recipe(
            None,
            [f"run.dir={run}", "method.name=qat", "train.max_steps=1", "quant.kv_fake_quant=false", *TINY],
        )
    )
    assert SamplerConfig.from_run(run).kv_cache == SamplerConfig.kv_cache


def test_dmd_rollouts_resolve_through_from_run(teacher, tmp_path, qat_run):
    from vidtrain.distill.method import DMD

    dmd = ["method.name=dmd", f"run.dir={tmp_path / 'd'}", "method.dmd.denoising_steps=[1000, 500]",
           "method.dmd.timestep_shift=3.0", "model.window_frames=3", "model.sink_frames=3"]  # fmt: skip
    plain = DMD(load_recipe(None, [*dmd, f"method.dmd.teacher={teacher}"])).sampler_config
    assert (plain.kv_cache, plain.timesteps, plain.shift, plain.window_frames, plain.sink_frames) == (
        "fp32", (1000.0, 500.0), 3.0, 3, 3)  # fmt: skip
    assert DMD(load_recipe(None, [*dmd, f"method.dmd.teacher={qat_run}"])).sampler_config.kv_cache == "nvfp4"
    on = DMD(load_recipe(None, [*dmd, f"method.dmd.teacher={teacher}", "quant.enabled=true"]))
    assert on.sampler_config.kv_cache == "nvfp4"
    # a DMD run's own recipe gives `vidtrain sample` its few-step schedule
    run = tmp_path / "d"
    run.mkdir()
    (run / "recipe.yaml").write_text(
        json.dumps(load_recipe(None, [*dmd, f"method.dmd.teacher={teacher}"]).to_dict())
    )
    step = run / "checkpoints" / "step_000001"
    save_vidtrain(CausalWanDiT.from_pretrained(teacher), step / "model")
    (step / "trainer_state.pt").write_bytes(b"")
    assert SamplerConfig.from_run(step).timesteps == (1000.0, 500.0)
