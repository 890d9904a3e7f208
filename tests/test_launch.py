"""vidtrain-launch: dry-run commands, clear errors, and real 2-rank CPU runs (deepspeed, torchrun, slurm)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vidtrain.config import load_recipe
from vidtrain.launch.launcher import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tf_debug_sp2.yaml"


def _rank_losses(run_dir: Path, world: int) -> list[list[float]]:
    return [
        [json.loads(line)["loss"] for line in (run_dir / "ranks" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in range(world)
    ]


def _finished(run_dir: Path, steps: int, world: int = 2) -> None:
    losses = _rank_losses(run_dir, world)
    assert all(len(x) == steps for x in losses), losses
    assert all(x == losses[0] for x in losses), losses  # SP lockstep: both ranks log the group's loss
    assert (run_dir / "checkpoints" / f"step_{steps:06d}" / "trainer_state.pt").exists()
    assert (run_dir / "balance.png").exists()


def test_recipe_loads_and_starts_with_its_command():
    r = load_recipe(RECIPE)
    assert (r.parallel.strategy, r.parallel.sp_size, r.parallel.layout) == ("deepspeed", 2, "balanced")
    assert RECIPE.read_text().startswith(
        "# vidtrain-launch --launcher deepspeed --nproc 2 recipes/tf_debug_sp2.yaml"
    )


def test_dry_runs(capsys):
    assert (
        main(["--launcher", "deepspeed", "--nproc", "2", "--dry-run", str(RECIPE), "train.max_steps=1"]) == 0
    )
    out = capsys.readouterr().out
    assert "deepspeed --num_gpus 2 --no_local_rank --module" in out and "train.max_steps=1" in out
    args = ["--launcher", "torchrun", "--nproc", "4", "--nnodes", "2", "--master-addr", "n0", "--dry-run"]
    assert main([*args, str(RECIPE)]) == 0
    out = capsys.readouterr().out
    assert "--nnodes 2" in out and "--master_addr n0" in out and "vidtrain.cli train" in out
    args = [
        "--launcher",
        "slurm",
        "--nproc",
        "8",
        "--nnodes",
        "2",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
    ]
    assert main([*args, "--time", "01:00:00", "--dry-run", str(RECIPE)]) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "scontrol show hostnames",
                 "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID"):  # fmt: skip
        assert line in script


def test_clear_errors(capsys, tmp_path):
    assert main(["--launcher", "deepspeed", "--nnodes", "2", "--dry-run", str(RECIPE)]) == 2
    assert "needs --hostfile" in capsys.readouterr().err
    assert (
        main(["--launcher", "deepspeed", "--hostfile", str(tmp_path / "nope"), "--dry-run", str(RECIPE)]) == 2
    )
    assert "does not exist" in capsys.readouterr().err


def _run(launcher: str, run_dir: Path, steps: int) -> None:
    args = [
        sys.executable,
        "-m",
        "vidtrain.launch.launcher",
        "--launcher",
        launcher,
        "--nproc",
        "2",
        str(RECIPE),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*args, f"run.dir={run_dir}", f"train.max_steps={steps}", "parallel.timeout_s=60"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_deepspeed_launcher_two_cpu_ranks(tmp_path):
    _run("deepspeed", tmp_path / "run", 2)
    _finished(tmp_path / "run", 2)


def test_torchrun_two_cpu_ranks_ddp(tmp_path):
    # same recipe, DDP x Ulysses through torchrun (skips DeepSpeed's start-up cost)
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "vidtrain.launch.launcher",
        "--launcher",
        "torchrun",
        "--nproc",
        "2",
        str(RECIPE),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [*args, f"run.dir={run}", "train.max_steps=2", "parallel.strategy=ddp", "parallel.layout=naive"],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _finished(run, 2)


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no Slurm (run .ci/setup_slurm.sh as root)")
def test_slurm_sbatch_two_tasks(tmp_path):
    run = tmp_path / "run"
    args = ["--launcher", "slurm", "--nproc", "2", "--job-name", "vidtrain-test", "--log-dir", str(tmp_path)]
    args += ["--script-out", str(tmp_path / "job.sbatch"), str(RECIPE)]
    overrides = [f"run.dir={run}", "train.max_steps=2", "parallel.strategy=ddp", "parallel.timeout_s=60"]
    res = subprocess.run(
        [sys.executable, "-m", "vidtrain.launch.launcher", *args, *overrides],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split()[0]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", job])
        pytest.fail(f"slurm job {job} did not finish in 240 s")
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert "run folder" in logs, logs[-3000:]
    _finished(run, 2)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "slurm"])
def test_recipe_and_overrides_are_checked_before_anything_starts(capsys, tmp_path, launcher):
    script = tmp_path / "job.sbatch"
    base = ["--launcher", launcher, "--nproc", "2", "--script-out", str(script)]
    for extra in ([], ["--dry-run"]):  # a real launch would fail the same way, before any process
        assert main([*base, *extra, str(RECIPE), "train.max_step=3"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            "vidtrain-launch: error: unknown key 'train.max_step': did you mean 'max_steps'"
        )
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  ckpt_every: 0\n")
    assert main([*base, "--dry-run", str(bad)]) == 2
    assert "train.ckpt_every must be >= 1" in capsys.readouterr().err
    # sequence-parallel groups must tile the ranks
    assert main(["--launcher", launcher, "--nproc", "3", "--dry-run", str(RECIPE)]) == 2
    assert "not divisible by parallel.sp_size=2" in capsys.readouterr().err
    assert not script.exists()


def test_launch_typo_in_a_subprocess_is_one_line_exit_2(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "vidtrain.launch.launcher", "--launcher", "slurm", "--dry-run", str(RECIPE),
         "data.batchsize=2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 2 and res.stdout == ""
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'data.batchsize'" in err and "batch_size" in err
