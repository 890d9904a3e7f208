"""The `qat` method through the one trainer loop: convert, finite loss, checkpoints, recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vidtrain.config import ConfigError, load_recipe
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.state_dict import load_model_state
from vidtrain.quant.convert import convert_for_recipe
from vidtrain.quant.kv import KVFakeQuantHook
from vidtrain.quant.qat import NVFP4Linear
from vidtrain.train.checkpoint import latest_checkpoint
from vidtrain.train.methods import METHODS, make_method
from vidtrain.train.qat_method import QAT
from vidtrain.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _overrides(run_dir: Path, method: str, steps: int) -> list[str]:
    return [
        f"run.dir={run_dir}", f"method.name={method}", f"train.max_steps={steps}",
        f"train.ckpt_every={steps}", "train.progress=false", "train.ema_decay=null",
        "optim.warmup_steps=0", "data.frames=6", "data.height=4", "data.width=4",
        "data.synthetic_samples=4", "data.text_len=4", "log.wandb=disabled", "log.plots=false",
    ]  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


def test_qat_is_registered():
    assert "qat" in METHODS
    assert isinstance(make_method(load_recipe(None, ["method.name=qat"])), QAT)


def test_qat_trains_from_a_teacher_forcing_checkpoint_and_resumes(tmp_path):
    tf = train(load_recipe(None, _overrides(tmp_path / "tf", "teacher_forcing", 1)))
    start = latest_checkpoint(tf.run_dir) / "model"
    over = [*_overrides(tmp_path / "qat", "qat", 2), f"model.checkpoint={start}"]
    trainer = train(load_recipe(None, over))
    model = trainer.strategy.unwrap(trainer.model)
    assert sum(isinstance(m, NVFP4Linear) for m in model.modules()) == 20
    assert type(model.head.head) is nn.Linear and type(model.time_projection[1]) is nn.Linear
    losses = _losses(trainer.run_dir)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    # the checkpoint loads back into a converted model (parameter names are kept)
    ckpt = latest_checkpoint(trainer.run_dir)
    fresh = convert_model(CausalWanDiT.from_flavor("debug"))
    load_model_state(fresh, ckpt / "model")
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    # ... and the trainer resumes into its converted model
    resumed = train(load_recipe(None, [*_overrides(tmp_path / "qat", "qat", 3), f"model.checkpoint={start}"]))
    assert resumed.step == 3 and len(_losses(resumed.run_dir)) == 3


def convert_model(model: nn.Module) -> nn.Module:
    convert_for_recipe(model, load_recipe(None, []).quant, CPU)
    return model


def test_kv_hook_follows_quant_kv_fake_quant():
    on = QAT(load_recipe(None, ["method.name=qat"]))
    off = QAT(load_recipe(None, ["method.name=qat", "quant.kv_fake_quant=false"]))
    assert isinstance(on.kv_hook(None), KVFakeQuantHook)
    assert off.kv_hook(None) is None


@pytest.mark.parametrize(
    "override,match",
    [
        ("quant.backend=triton", "CUDA"),
        ("quant.backend=te", "nvfp4_te"),
    ],
)
def test_bad_quant_settings_are_clear_errors(override, match):
    quant = load_recipe(None, [override]).quant
    with pytest.raises(ValueError, match=match):
        convert_for_recipe(CausalWanDiT.from_flavor("debug"), quant, CPU)


def test_unknown_quant_format_is_refused_when_the_recipe_loads():
    with pytest.raises(ConfigError, match=r"quant\.format.*'mxfp4'.*nvfp4.*fp8"):
        load_recipe(None, ["quant.format=mxfp4"])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("qat_*.yaml")), ids=lambda p: p.name)
def test_qat_recipes_load(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "vidtrain" in first
    recipe = load_recipe(path)
    assert recipe.method.name == "qat"


def test_qat_recipes_exist():
    assert {p.name for p in (ROOT / "recipes").glob("qat_*.yaml")} >= {"qat_debug.yaml", "qat_1.3B.yaml"}
