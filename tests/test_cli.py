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


def _parser_of(entry, argv, monkeypatch):
    """The ArgumentParser an entry point builds (caught at parse_args, nothing runs)."""
    import argparse

    seen = []

    class Caught(Exception):
        pass

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught):
        entry(argv)
    return seen[0]


@pytest.mark.parametrize(
    "command",
    ["train", "convert", "sample", "eval", "balance", "merge", "shard", "encode", "inspect", "launch"],
)
def test_help_shows_every_default(command, monkeypatch):
    import argparse

    from vidtrain.data_tools import encode, inspect, shard
    from vidtrain.launch import launcher

    tools = {"shard": shard.main, "encode": encode.main, "inspect": inspect.main, "launch": launcher.main}
    entry, argv = (tools[command], []) if command in tools else (main, [command])
    parser = _parser_of(entry, argv, monkeypatch)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            continue
        assert f"(default: {action.default})" in text, (command, action.option_strings, action.default)
