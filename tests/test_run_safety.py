"""Run safety: every fault ends in an exact resume or a clear refusal, never in silent loss.

Kills are real (`os._exit` inside a child process at each stage of a checkpoint write, through
VIDTRAIN_FAULT); the resumed run is compared bit for bit with an uninterrupted one.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vidtrain.config import ConfigError, load_recipe
from vidtrain.errors import CheckpointError, NonFiniteError
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.state_dict import save_vidtrain
from vidtrain.train.checkpoint import FAULT_STAGES, MANIFEST, latest_checkpoint, step_folders
from vidtrain.train.run_lock import LOCK_NAME, RunLock, RunLockError
from vidtrain.train.trainer import Trainer, train
from vidtrain.utils.faults import FAULT_ENV, KILL_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "log.wandb=disabled", "log.plots=false", "train.progress=false", "data.synthetic_samples=6",
    "data.batch_size=2", "data.frames=6", "data.height=4", "data.width=4", "optim.warmup_steps=1",
    "train.ema_decay=0.9", "train.mixed_precision=fp32",
]  # fmt: skip
KILL = [*BASE, "train.max_steps=6", "train.ckpt_every=2", "train.keep_checkpoints=0"]


def recipe(run_dir, *extra):
    return load_recipe(None, [*BASE, f"run.dir={run_dir}", *extra])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return CausalWanDiT.from_pretrained(str(folder)).state_dict()


def losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same final checkpoint, bit for bit, and the same loss curve."""
    ca, cb = latest_checkpoint(a), latest_checkpoint(b)
    assert ca.name == cb.name
    wa, wb = weights(ca / "model"), weights(cb / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = torch.load(ca / "trainer_state.pt", weights_only=False)
    sb = torch.load(cb / "trainer_state.pt", weights_only=False)
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"]), k
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"]), k
    assert sa["data"] == sb["data"] and sa["scheduler"] == sb["scheduler"]
    assert losses(a) == losses(b)


def cli(run_dir: Path, *args: str, fault: str | None = None, timeout: int = 240):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    code = "import sys; from vidtrain.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "train", str(ROOT / "recipes" / "tf_debug.yaml"), f"run.dir={run_dir}", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    res = cli(run, *KILL)
    assert res.returncode == 0, res.stderr[-2000:]
    return run


# ---- kills at every stage of a checkpoint write (one process) -----------------------------------


@pytest.mark.parametrize("stage", FAULT_STAGES)
def test_kill_during_checkpoint_write_resumes_exactly(tmp_path, straight, stage):
    run = tmp_path / "run"
    res = cli(run, *KILL, fault=f"{stage}@4")
    assert res.returncode == KILL_EXIT_CODE, res.stderr[-2000:]
    complete = stage in ("rename", "latest")  # the folder had its manifest and its final name
    assert latest_checkpoint(run, hashes=True).name == ("step_000004" if complete else "step_000002")
    res = cli(run, *KILL)  # the same command again: takes the dead run's lock over, resumes
    assert res.returncode == 0, res.stderr[-2000:]
    assert (
        f"resumed from {run / 'checkpoints' / ('step_000004' if complete else 'step_000002')}" in res.stdout
    )
    assert "took over the lock" in res.stdout
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_same_run(straight, run)


# ---- non-finite loss ----------------------------------------------------------------------------


def test_nonfinite_stop_names_step_and_batch_and_keeps_last_finite_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan@3")
    r = recipe(tmp_path, "train.max_steps=6", "train.ckpt_every=1", "train.keep_checkpoints=1")
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss or gradient at step 3 .*batch synthetic-"
    ) as e:
        train(r)
    assert "newest intact checkpoint" in str(e.value) and "step_000002" in str(e.value)
    ckpt = latest_checkpoint(tmp_path, hashes=True)
    assert ckpt.name == "step_000002" and [s for s, _ in step_folders(tmp_path)] == [2]
    assert all(torch.isfinite(v).all() for v in weights(ckpt / "model").values())
    assert not (tmp_path / LOCK_NAME).exists()


def test_nonfinite_skip_drops_the_step_and_continues(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan@3")
    train(
        recipe(
            tmp_path,
            "train.max_steps=4",
            "train.ckpt_every=1",
            "train.on_nonfinite=skip",
            "train.keep_checkpoints=0",
        )
    )
    w2, w3 = (weights(tmp_path / "checkpoints" / f"step_00000{s}" / "model") for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 applied nothing
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skips"] for r in rows] == [0, 0, 1, 1]
    assert all(torch.isfinite(v).all() for v in weights(latest_checkpoint(tmp_path) / "model").values())


def test_nonfinite_skip_stops_after_max_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan@1")
    r = recipe(tmp_path, "train.max_steps=3", "train.on_nonfinite=skip", "train.max_nonfinite_skips=1")
    with pytest.raises(NonFiniteError, match=r"1 steps in a row .*max_nonfinite_skips=1"):
        train(r)


def test_huge_learning_rate_stops_before_a_nonfinite_checkpoint(tmp_path):
    r = recipe(
        tmp_path, "optim.lr=1e30", "train.max_steps=6", "train.ckpt_every=1", "train.keep_checkpoints=1"
    )
    with pytest.raises(NonFiniteError):
        train(r)
    ckpt = latest_checkpoint(tmp_path, hashes=True)
    assert ckpt is not None and all(torch.isfinite(v).all() for v in weights(ckpt / "model").values())


# ---- damaged checkpoints ------------------------------------------------------------------------


def _two_checkpoints(run_dir: Path) -> None:
    train(recipe(run_dir, "train.max_steps=4", "train.ckpt_every=2"))


@pytest.mark.parametrize(
    "damage", ["truncate_weights", "truncate_state", "flip_weight_byte", "drop_manifest"]
)
def test_damaged_latest_checkpoint_falls_back_to_the_intact_one(tmp_path, capsys, damage):
    _two_checkpoints(tmp_path)
    step4 = tmp_path / "checkpoints" / "step_000004"
    target = step4 / ("trainer_state.pt" if damage == "truncate_state" else "model/model.safetensors")
    if damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip_weight_byte":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0x40
        target.write_bytes(bytes(data))
    else:  # a manifest lost: the folder is legacy-looking but its state was truncated
        (step4 / MANIFEST).unlink()
        (step4 / "trainer_state.pt").unlink()
    capsys.readouterr()
    trainer = Trainer(recipe(tmp_path, "train.max_steps=4", "train.ckpt_every=2"))
    trainer.resume()
    out = capsys.readouterr().out
    assert trainer.step == 2 and "skipped step_000004" in out
    trainer.close()


def test_flipped_byte_is_missed_only_without_hash_verification(tmp_path):
    _two_checkpoints(tmp_path)
    target = tmp_path / "checkpoints" / "step_000004" / "model" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x40
    target.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path, hashes=True).name == "step_000002"
    assert latest_checkpoint(tmp_path, hashes=False).name == "step_000004"


def test_no_intact_checkpoint_is_refused_not_restarted(tmp_path):
    _two_checkpoints(tmp_path)
    for step in ("step_000002", "step_000004"):
        (tmp_path / "checkpoints" / step / "trainer_state.pt").write_bytes(b"x")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume"):
        Trainer(recipe(tmp_path, "train.max_steps=6"))
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_torn_metrics_line_does_not_block_resume(tmp_path, capsys):
    train(recipe(tmp_path, "train.max_steps=2", "train.ckpt_every=2"))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.')  # a kill mid-write
    train(recipe(tmp_path, "train.max_steps=3", "train.ckpt_every=2"))
    assert "dropped 1 torn line" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---- the run lock -------------------------------------------------------------------------------


def test_second_run_on_a_held_folder_is_refused_and_changes_nothing(tmp_path):
    train(recipe(tmp_path, "train.max_steps=1"))
    holder = RunLock(tmp_path).acquire()  # a live run (this process) holds the folder
    try:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        child = subprocess.run(
            [sys.executable, "-c", "from vidtrain.cli import main; import sys; sys.exit(main(sys.argv[1:]))",
             "train", str(ROOT / "recipes" / "tf_debug.yaml"), f"run.dir={tmp_path}", *BASE, "train.max_steps=2"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
        )  # fmt: skip
        assert child.returncode == 2
        assert f"is in use by pid {os.getpid()} on {socket.gethostname()}" in child.stderr
        assert len(child.stderr.strip().splitlines()) == 1
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    finally:
        holder.release()


def test_stale_lock_is_taken_over(tmp_path, capsys):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"})
    )
    train(recipe(tmp_path, "train.max_steps=1"))
    out = capsys.readouterr().out
    assert f"took over the lock of {tmp_path}: its process {int(dead.stdout)} is gone" in out
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_same_slurm_job_on_another_host_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-gone", "pid": 1, "slurm_job_id": "4242"}))
    lock = RunLock(tmp_path).acquire()
    assert "same Slurm job 4242" in lock.took_over
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-other", "pid": 1, "slurm_job_id": "7"}))
    with pytest.raises(RunLockError, match="in use by pid 1 on node-other, Slurm job 7"):
        RunLock(tmp_path).acquire()


# ---- resume policy ------------------------------------------------------------------------------


def test_resume_refuses_changes_it_cannot_honour(tmp_path):
    train(recipe(tmp_path, "train.max_steps=2"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"optim.lr: 0.0001 -> 0.001.*train.resume_changes=allow"):
        Trainer(recipe(tmp_path, "train.max_steps=4", "optim.lr=1e-3"))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    t = Trainer(recipe(tmp_path, "train.max_steps=4", "optim.lr=1e-3", "train.resume_changes=allow"))
    t.close()


def test_resume_applies_safe_changes_keeps_every_start_and_lr_does_not_jump(tmp_path, capsys):
    train(recipe(tmp_path, "train.max_steps=4", "train.ckpt_every=4", "optim.warmup_steps=0"))
    first = (tmp_path / "recipe.yaml").read_text()
    train(recipe(tmp_path, "train.max_steps=8", "train.ckpt_every=4", "optim.warmup_steps=0"))
    assert "resume applies train.max_steps: 4 -> 8" in capsys.readouterr().out
    assert (tmp_path / "recipe.yaml").read_text() == first  # the first start's recipe
    starts = sorted(p.name for p in (tmp_path / "recipes").iterdir())
    assert starts == ["start_1.yaml", "start_2.yaml"]
    assert yaml.safe_load((tmp_path / "recipes" / "start_2.yaml").read_text())["train"]["max_steps"] == 8
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the horizon stays the first start's 4 steps: lr keeps falling to min_lr and stays there
    assert all(b <= a for a, b in itertools.pairwise(lrs)) and lrs[-1] == pytest.approx(1e-5)


def test_weights_only_resume_is_explicit(tmp_path, capsys):
    train(recipe(tmp_path, "train.max_steps=2"))
    t = Trainer(recipe(tmp_path, "train.max_steps=3", "train.resume=weights_only"))
    t.resume()
    assert t.step == 2 and not t.optimizer.state  # fresh optimizer state, said so
    assert "weights only" in capsys.readouterr().out
    t.close()


def test_flavor_that_does_not_match_the_checkpoint_is_an_error(tmp_path):
    ckpt = tmp_path / "debug_model"
    save_vidtrain(CausalWanDiT.from_flavor("debug"), ckpt)
    with pytest.raises(ValueError, match=r"does not match model.flavor='1.3B': dim 64 \(flavor: 1536\)"):
        Trainer(recipe(tmp_path / "run", "model.flavor=1.3B", f"model.checkpoint={ckpt}"))
    assert not (tmp_path / "run").exists()


# ---- write failures -----------------------------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint_is_one_clear_line(tmp_path, monkeypatch):
    import vidtrain.train.checkpoint as ckpt_mod

    train(recipe(tmp_path, "train.max_steps=2", "train.ckpt_every=2"))
    real = ckpt_mod.torch.save

    def full(obj, path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(CheckpointError) as e:
        train(recipe(tmp_path, "train.max_steps=4", "train.ckpt_every=2"))
    monkeypatch.setattr(ckpt_mod.torch, "save", real)
    msg = str(e.value)
    assert msg.startswith("No space left on device while writing checkpoint step 4 to ")
    assert msg.endswith("step_000002 is intact") and "\n" not in msg
    assert latest_checkpoint(tmp_path, hashes=True).name == "step_000002"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_read_only_run_folder_is_a_clear_error(tmp_path, monkeypatch):
    import vidtrain.train.run_lock as run_lock

    def read_only(*a):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(run_lock.os, "link", read_only)  # root ignores chmod: fail as a RO mount does
    with pytest.raises(RunLockError, match=f"cannot write to run folder {tmp_path}: Read-only file system"):
        Trainer(recipe(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        train(recipe(tmp_path, "train.max_steps=1"))
    finally:
        os.umask(old)
    ckpt = latest_checkpoint(tmp_path)
    assert (ckpt.stat().st_mode & 0o777) == 0o755
    assert ((ckpt / "trainer_state.pt").stat().st_mode & 0o777) == 0o644
    assert (((tmp_path / "recipe.yaml").stat().st_mode) & 0o777) == 0o644


@pytest.mark.parametrize("key", ["train.ckpt_every=0", "train.log_every=0", "train.max_nonfinite_skips=0"])
def test_zero_cadences_are_refused(key):
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_recipe(None, [key])
