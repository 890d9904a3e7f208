"""Checkpoints: complete or absent, for every strategy; resumed exactly from the newest intact one.

Layout of `RUN/checkpoints/step_000123/`:
  model/            the plain model in vidtrain's format (loadable by CausalWanDiT.from_pretrained),
                    plus quant.json when it was trained with NVFP4 fake-quant (QAT)
  model_ema/        the same for the EMA weights (when train.ema_decay is set): point
                    model.checkpoint or `vidtrain sample --checkpoint` at it to use them
  trainer_state.pt  optimizer, schedule, EMA, method state, RNG, data position, step
  recipe.yaml       the recipe that produced it
  engine/           a strategy's own format where it has one (DeepSpeed's sharded ZeRO state)
  manifest.json     every other file's size and sha256, written last
`RUN/checkpoints/latest` names the newest complete checkpoint (for people and tools; resume
looks at every step folder itself).

Writing (all ranks take part): everything of a step, engine shards of every rank included, goes
into `.step_000123.tmp/`; rank 0 then writes the manifest (hashing and fsyncing each file), renames
the folder to its final name in one step, updates `latest` and prunes. A failure on any rank is
agreed on by all ranks (no rank hangs) and reported as one line naming the step, the path and the
newest intact step. Weights that are not finite are never written. The states themselves come
from the strategy's checkpoint adapter (`strategy.checkpoint`, vidtrain/parallel/checkpoint.py);
this module owns the folder.

Resuming: the newest step folder whose manifest verifies (sizes always; sha256 when
`train.verify_checkpoints`) is used; each one skipped is named with its reason. Without a
verifying checkpoint the run is refused rather than silently restarted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from vidtrain.config import dump_recipe
from vidtrain.errors import CheckpointError, NonFiniteError
from vidtrain.models.wan.state_dict import save_model_state
from vidtrain.quant.qat import write_quant_record
from vidtrain.utils.faults import kill_point
from vidtrain.utils.io import atomic_write_text, follow_umask, fsync_dir, replace_dir, sha256_file
from vidtrain.utils.run_folder import (
    MANIFEST,
    STATE,
    checkpoint_dir,
    find_resumable,
    latest_checkpoint,
    staging_dir,
    step_folders,
    verify_checkpoint,
)

# where the kill tests end a checkpoint write (vidtrain/utils/faults.py: VIDTRAIN_FAULT=stage@step)
FAULT_STAGES = ("begin", "model", "state", "engine_begin", "engine", "manifest", "rename", "latest")
__all__ = [
    "MANIFEST",
    "STATE",
    "CheckpointError",
    "NonFiniteError",
    "checkpoint_dir",
    "find_resumable",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "step_folders",
    "verify_checkpoint",
]


def clean_stale(run_dir: Path) -> list[str]:
    """Remove temp folders of writes that were killed (call only while holding the run lock)."""
    root = Path(run_dir) / "checkpoints"
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and (".tmp" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


# ---- RNG --------------------------------------------------------------------------------------


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ---- writing ----------------------------------------------------------------------------------


def _nonfinite_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _write_main(trainer, tmp: Path, model_sd: dict, optim_sd: dict, step: int) -> None:
    """Rank 0's part: model, EMA model, trainer state, recipe."""

    bad = _nonfinite_keys(model_sd)
    if bad:
        raise NonFiniteError(
            f"weights are not finite at step {step} ({len(bad)} tensors, e.g. {bad[0]}): no checkpoint written"
        )
    plain = trainer.strategy.unwrap(trainer.model)
    save_model_state(trainer.model_config, model_sd, tmp / "model")
    write_quant_record(plain, tmp / "model")
    kill_point("model", step, 0)
    if trainer.ema is not None and all(k in model_sd for k in trainer.ema.shadow):
        # the EMA weights as a model folder of their own: sample / fine-tune from them
        ema_sd = {**model_sd, **{k: v.to(model_sd[k].dtype) for k, v in trainer.ema.shadow.items()}}
        save_model_state(trainer.model_config, ema_sd, tmp / "model_ema")
        write_quant_record(plain, tmp / "model_ema")
    state = {
        "step": step,
        "optimizer": optim_sd,
        "scheduler": trainer.scheduler.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema else None,
        "method": trainer.method.state_dict(),
        "rng": rng_state(),
        "data": trainer.data_state(),
        "nonfinite": dict(trainer.nonfinite),
    }
    torch.save(state, tmp / STATE)
    kill_point("state", step, 0)
    (tmp / "recipe.yaml").write_text(dump_recipe(trainer.recipe))


def write_manifest(folder: Path, step: int) -> None:
    """Size and sha256 of every file under `folder` (each fsynced as it is hashed), then the
    manifest itself, fsynced: a folder with a manifest is whole."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        follow_umask(path)
        files[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        follow_umask(d, is_dir=True)
    with open(folder / MANIFEST, "w") as f:
        json.dump({"format": 1, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    follow_umask(folder / MANIFEST)


def _commit(tmp: Path, final: Path, step: int, keep: int) -> None:
    """Rank 0: manifest, one rename, `latest`, prune."""
    write_manifest(tmp, step)
    kill_point("manifest", step, 0)
    replace_dir(tmp, final)  # a damaged folder of this step (skipped at resume) is replaced whole
    fsync_dir(final.parent)
    kill_point("rename", step, 0)
    atomic_write_text(final.parent / "latest", final.name + "\n")
    kill_point("latest", step, 0)
    _prune(final.parent.parent, keep, step)


def _prune(run_dir: Path, keep: int, current: int) -> None:
    """Keep the newest `keep` checkpoints up to `current` (the one just written, verified, is
    always among them); folders of later steps (skipped as damaged at resume) are left alone."""
    if keep <= 0:
        return
    steps = [(s, p) for s, p in step_folders(run_dir) if s <= current]
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _describe_failure(e: BaseException, step: int, where: Path, intact: str) -> str:
    if isinstance(e, NonFiniteError):
        return f"{e}; {intact}"
    if isinstance(e, OSError):
        why = e.strerror or str(e)
        path = e.filename or where
    else:  # torch.save / safetensors report a full disk as RuntimeError ("unexpected pos", "write")
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        path = where
        try:
            if shutil.disk_usage(where.parent if not where.exists() else where).free < 1 << 20:
                why = f"no space left on device ({why})"
        except OSError:
            pass
    return f"{why} while writing checkpoint step {step} to {path}; {intact}"


def _agree(trainer, error: BaseException | None, step: int, where: Path) -> None:
    """All ranks learn whether any rank failed; every rank raises (no rank waits forever)."""
    intact = trainer.last_checkpoint
    intact = f"{intact.name} is intact" if intact else "no earlier checkpoint exists"
    msg = None if error is None else _describe_failure(error, step, where, intact)
    msgs = [m for m in trainer.strategy.all_gather_object(msg) if m]
    if not msgs:
        return
    if trainer.strategy.is_main:
        shutil.rmtree(staging_dir(checkpoint_dir(trainer.run_dir, step)), ignore_errors=True)
    if error is not None and not isinstance(error, OSError | RuntimeError | NonFiniteError):
        raise error  # a bug, not a fault: keep its traceback
    cls = NonFiniteError if isinstance(error, NonFiniteError) or "not finite" in msgs[0] else CheckpointError
    raise cls(msg or msgs[0]) from None


def save_checkpoint(trainer, step: int) -> Path:
    """All ranks call it (sharded states gather); the folder appears whole or not at all."""
    strategy = trainer.strategy
    adapter = strategy.checkpoint  # the backend's states in and out (vidtrain/parallel/checkpoint.py)
    model_sd = adapter.model_state(trainer.model)
    optim_sd = adapter.optim_state(trainer.model, trainer.optimizer)
    final = checkpoint_dir(trainer.run_dir, step)
    tmp = staging_dir(final)
    error = None
    if strategy.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            kill_point("begin", step, 0)
            _write_main(trainer, tmp, model_sd, optim_sd, step)
        except Exception as e:
            error = e
    _agree(trainer, error, step, tmp)
    try:
        kill_point("engine_begin", step, strategy.rank)
        adapter.save_engine(trainer.model, tmp / "engine")
        kill_point("engine", step, strategy.rank)
    except Exception as e:
        error = e
    _agree(trainer, error, step, tmp / "engine")
    if strategy.is_main:
        try:
            _commit(tmp, final, step, trainer.recipe.train.keep_checkpoints)
        except Exception as e:
            error = e
    _agree(trainer, error, step, final)
    trainer.last_checkpoint = final
    return final


# ---- loading ----------------------------------------------------------------------------------


def read_state(folder: Path) -> dict:
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {folder / STATE}: {str(e).splitlines()[0]}") from None


def load_checkpoint(trainer, folder: Path, weights_only: bool = False) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from.

    `weights_only` (train.resume=weights_only): the model weights, EMA, schedule, RNG and data
    position, with a fresh optimizer state (asked for explicitly, never a silent fallback).
    """
    state = read_state(folder)
    adapter = trainer.strategy.checkpoint
    try:
        if weights_only:
            adapter.load_weights(trainer.model, folder)
        elif not adapter.load_engine(trainer.model, trainer.optimizer, folder / "engine"):
            adapter.load_weights(trainer.model, folder)
            adapter.load_optim_state(trainer.model, trainer.optimizer, state["optimizer"])
    except (OSError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot resume from {folder}: {str(e).splitlines()[0]}") from None
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.ema and state["ema"] is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.method.load_state_dict(state["method"])
    set_rng_state(state["rng"])
    trainer.load_data_state(state["data"])
    trainer.nonfinite.update(state.get("nonfinite", {}))
    return int(state["step"])
