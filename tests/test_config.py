"""Recipes: every shipped recipe loads; strict keys and types; overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidtrain.config import ConfigError, Recipe, load_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
TRAIN_RECIPES = [p for p in RECIPES if not p.name.startswith("shots_")]


def test_recipes_exist():
    assert TRAIN_RECIPES, "no recipes shipped"


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_names_its_launch_command(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("vidtrain train" in first or "vidtrain-launch" in first), first


def test_defaults_and_fixed_key_names():
    r = load_recipe(None)
    assert r.seed == 0 and r.run.dir and r.train.max_steps > 0


def test_overrides_are_typed():
    r = load_recipe(None, ["train.max_steps=7", "optim.lr=3e-4", "model.window_frames=null", "seed=5"])
    assert (r.train.max_steps, r.optim.lr, r.model.window_frames, r.seed) == (7, 3e-4, None, 5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trian.max_steps=3"], r"unknown key 'trian': did you mean 'train'"),
        (["train.max_step=3"], r"unknown key 'train.max_step': did you mean 'max_steps'"),
        (["train.max_steps=ten"], r"train.max_steps: expected an integer"),
        (["parallel.layout=diagonal"], r"parallel.layout: 'diagonal' is not one of 'naive', 'balanced'"),
        (["optim.betas=0.9"], r"optim.betas: expected a list"),
        (["data.frames=7"], r"data.frames \(7\) must be a multiple of model.frames_per_chunk \(3\)"),
        (["train"], r"must look like key.sub=value"),
    ],
)
def test_bad_recipes_fail_with_the_path(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, overrides)


def test_yaml_errors_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_recipe(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(scalar)


def test_5b_recipes_fit_the_model_and_the_wan22_vae():
    import torch

    from vidtrain.models.vae import CausalVideoVAE
    from vidtrain.models.wan.config import flavor

    five = sorted(p for p in TRAIN_RECIPES if p.stem.endswith("_5B"))
    assert [p.stem for p in five] == [
        "dmd_long_5B",
        "dmd_lora_5B",
        "qat_5B",
        "tf_5B",
        "tf_error_recycling_5B",
    ]
    with torch.device("meta"):
        vae = CausalVideoVAE.from_flavor("wan2.2")
    assert vae.spatial_compression == 16 and vae.temporal_compression == 4
    for path in five:
        r = load_recipe(path)
        cfg = flavor(r.model.flavor)
        assert r.model.flavor == "5B" and cfg.in_channels == vae.config.z_dim == 48
        assert cfg.num_heads % r.parallel.sp_size == 0, path.name
        assert "704x1280" in path.read_text() and "latents_wan22" in r.data.shards
    # the documented clip: 24 latent frames (93 pixel frames) split into sp x chunk pieces, and
    # 704x1280 into whole (1, 2, 2) patches of 16x latents
    r = load_recipe(next(p for p in five if p.stem == "tf_5B"))
    assert 24 % (r.parallel.sp_size * r.model.frames_per_chunk) == 0 and 1 + 4 * 23 == 93
    assert 704 % 32 == 0 and 1280 % 32 == 0
