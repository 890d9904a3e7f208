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


def test_a_deepspeed_launch_prints_progress_and_no_noise(tmp_path):
    """`vidtrain-launch --launcher deepspeed` on 2 CPU ranks: its start line, rank 0's step lines
    with the loss, the run folder; none of DeepSpeed's runner INFO lines, accelerator probes,
    comm-op build notes, collective deprecations or wandb's banner."""
    import re

    env = {k: v for k, v in os.environ.items() if k not in ("VIDTRAIN_VERBOSE", "DS_ACCELERATOR")}
    res = subprocess.run(
        [sys.executable, "-m", "vidtrain.launch.launcher", "--launcher", "deepspeed", "--nproc", "2",
         str(ROOT / "recipes" / "tf_debug_sp2.yaml"), f"run.dir={tmp_path / 'run'}", "train.max_steps=3",
         "log.wandb=offline"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    lines = (res.stdout + res.stderr).splitlines()
    assert lines[0].startswith("[vidtrain-launch] starting 2 deepspeed rank(s)"), lines
    steps = [
        ln for ln in lines if re.match(r"\[vidtrain\] train\[teacher_forcing\] step \d/3 loss [\d.]+ ", ln)
    ]
    assert len(steps) == 3, lines
    others = [ln for ln in lines[1:] if ln not in steps]
    assert others == [f"[vidtrain] run folder: {tmp_path / 'run'} (checkpoints/, metrics.jsonl, loss.png)"], (
        lines
    )


def test_noise_filters_are_narrow(monkeypatch):
    import logging
    import warnings

    from vidtrain.utils import quiet

    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    assert quiet.noise_line(
        "[2026-12-02 00:42:50,214] [INFO] [launch.py:174:main] Setting CUDA_VISIBLE_DEVICES=0,1"
    )
    assert quiet.noise_line("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n")
    assert not quiet.noise_line("[2026-12-02 00:42:50,214] [WARNING] [engine.py:1:x] gradient overflow")
    assert not quiet.noise_line("Traceback (most recent call last):")
    monkeypatch.setenv(quiet.VERBOSE_ENV, "1")
    assert not quiet.noise_line("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    monkeypatch.delenv(quiet.VERBOSE_ENV)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning,
                               "c10d_logger.py", 83, module="torch.distributed.c10d_logger")  # fmt: skip
        warnings.warn_explicit(
            "`all_gather_into_tensor` is deprecated", FutureWarning, "mine.py", 1, module="mine"
        )
    assert [str(w.message) for w in seen] == ["`all_gather_into_tensor` is deprecated"]  # other modules: kept
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("torchao")
    log.addHandler(handler)
    try:
        log.warning("Failed to load /x/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: nope")
        log.warning("Failed to quantize layer 3")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Failed to quantize layer 3"]
