"""Run safety under DeepSpeed ZeRO-2 on 2 CPU ranks (Ulysses SP 2): a rank killed at a stage of
a checkpoint write (engine shards included) ends in an exact resume, and a non-finite step is
skipped by every rank. Launched with torchrun (DeepSpeed's engine, the launcher's start-up
cost saved); compared bit for bit with an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidtrain.models.wan import CausalWanDiT
from vidtrain.train.checkpoint import latest_checkpoint
from vidtrain.utils.faults import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tf_debug_sp2.yaml"
ARGS = ["train.max_steps=4", "train.ckpt_every=2", "train.keep_checkpoints=0", "log.plots=false"]

pytestmark = pytest.mark.slow


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return CausalWanDiT.from_pretrained(str(folder)).state_dict()


def launch(run: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "vidtrain.launch.launcher", "--launcher", "torchrun", "--nproc", "2"]
    return subprocess.run(
        [*cmd, str(RECIPE), f"run.dir={run}", *ARGS, *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def assert_same(a: Path, b: Path) -> None:
    ca, cb = latest_checkpoint(a, hashes=True), latest_checkpoint(b, hashes=True)
    assert ca.name == cb.name == "step_000004"
    wa, wb = weights(ca / "model"), weights(cb / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    shards = sorted((ca / "engine" / "engine").glob("*optim_states.pt"))
    assert len(shards) == 2  # one ZeRO-2 optimizer partition per rank
    for shard in shards:
        sa = dict(_tensors(torch.load(shard, weights_only=False)["optimizer_state_dict"]))
        sb = dict(
            _tensors(
                torch.load(cb / "engine" / "engine" / shard.name, weights_only=False)["optimizer_state_dict"]
            )
        )
        assert sa.keys() == sb.keys() and sa
        assert all(torch.equal(sa[k], sb[k]) for k in sa), shard.name
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("ds_straight") / "run"
    res = launch(run)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return run


@pytest.mark.parametrize(
    "fault, resumes_at",
    [("engine_begin@4@1", 2), ("manifest@4", 2), ("rename@4", 4)],
    ids=["rank1_killed_before_its_engine_shard", "killed_before_rename", "killed_before_latest"],
)
def test_zero2_kill_during_checkpoint_resumes_exactly(tmp_path, straight, fault, resumes_at):
    run = tmp_path / "run"
    res = launch(run, fault=fault)
    assert res.returncode != 0
    assert latest_checkpoint(run, hashes=True).name == f"step_{resumes_at:06d}"
    res = launch(run)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{resumes_at:06d}'} at step {resumes_at}" in res.stdout
    assert_same(straight, run)


def test_zero2_nonfinite_step_is_skipped_on_every_rank(tmp_path):
    run = tmp_path / "run"
    res = launch(run, "train.on_nonfinite=skip", fault="nan@3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "non-finite loss or gradient at step 3" in res.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 1]
    res = launch(tmp_path / "stop", fault="nan@3")
    assert res.returncode != 0 and "stopping (train.on_nonfinite=stop)" in res.stderr + res.stdout
