"""A training command prints its own lines only: no wandb banner or summary, no deprecation noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_output_has_no_third_party_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "VIDTRAIN_VERBOSE")}
    res = subprocess.run(
        [sys.executable, "-m", "vidtrain.cli", "train", str(ROOT / "recipes" / "tf_debug.yaml"),
         f"run.dir={tmp_path / 'run'}", "train.max_steps=2", "log.wandb=offline", "train.progress=false"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    lines = (res.stdout + res.stderr).splitlines()
    assert lines == [f"[vidtrain] run folder: {tmp_path / 'run'} (checkpoints/, metrics.jsonl, loss.png)"], (
        lines
    )
    assert (tmp_path / "run" / "wandb").is_dir()  # wandb still ran (offline), silently
