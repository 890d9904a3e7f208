"""`vidtrain` console script: one clear line and exit 2 on bad input; train and convert work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vidtrain.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "convert", "balance", "merge"):
        assert cmd in out


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (None, "recipe not found"),
        ("train:\n  max_steps: [1,\n", "YAML syntax error"),
        ("train:\n  max_stepz: 3\n", "unknown key 'train.max_stepz': did you mean 'max_steps'"),
    ],
)
def test_bad_recipe_is_one_line(tmp_path, setup, message):
    path = tmp_path / "r.yaml"
    if setup is not None:
        path.write_text(setup)
    proc = subprocess.run(
        [sys.executable, "-m", "vidtrain.cli", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_train_then_convert_roundtrip(tmp_path, capsys):
    rc = main([
        "train", "recipes/tf_debug.yaml", f"run.dir={tmp_path / 'run'}", "train.max_steps=1",
        "log.wandb=disabled", "train.progress=false", "data.height=4", "data.width=4",
    ])  # fmt: skip
    assert rc == 0
    assert "run folder" in capsys.readouterr().out
    from vidtrain.train.checkpoint import latest_checkpoint

    src = latest_checkpoint(tmp_path / "run") / "model"
    assert main(["convert", str(src), str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / "model.safetensors").exists()
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
