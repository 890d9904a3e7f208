"""Checkpoints: written atomically (temp folder + rename), resumed exactly.

Layout of `RUN/checkpoints/step_000123/`:
  model/            the plain model in vidtrain's format (loadable by CausalWanDiT.from_pretrained),
                    plus quant.json when it was trained with NVFP4 fake-quant (QAT)
  model_ema/        the same for the EMA weights (when train.ema_decay is set): point
                    model.checkpoint or `vidtrain sample --checkpoint` at it to use them
  trainer_state.pt  optimizer, schedule, EMA, method state, RNG, data position, step
  recipe.yaml       the recipe that produced it
  engine/           a strategy's own format where it has one (DeepSpeed)
`RUN/checkpoints/latest` names the newest complete checkpoint.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from vidtrain.utils.io import atomic_dir, atomic_write_text

_STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / "trainer_state.pt").exists():
            return cand
    steps = sorted(
        (int(m.group(1)), p)
        for p in root.glob("step_*")
        if (m := _STEP_RE.match(p.name)) and (p / "trainer_state.pt").exists()
    )
    return steps[-1][1] if steps else None


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


def save_checkpoint(trainer, step: int) -> Path:
    """All ranks call it (sharded states gather); rank 0 writes; the folder appears whole or not at all."""
    from vidtrain.models.wan.state_dict import save_model_state

    strategy = trainer.strategy
    model_sd = strategy.model_state(trainer.model)
    optim_sd = strategy.optim_state(trainer.model, trainer.optimizer)
    final = checkpoint_dir(trainer.run_dir, step)
    if strategy.is_main:
        with atomic_dir(final) as tmp:
            save_model_state(trainer.model_config, model_sd, tmp / "model")
            from vidtrain.quant.qat import write_quant_record

            write_quant_record(strategy.unwrap(trainer.model), tmp / "model")
            if trainer.ema is not None and all(k in model_sd for k in trainer.ema.shadow):
                # the EMA weights as a model folder of their own: sample / fine-tune from them
                ema_sd = {**model_sd, **{k: v.to(model_sd[k].dtype) for k, v in trainer.ema.shadow.items()}}
                save_model_state(trainer.model_config, ema_sd, tmp / "model_ema")
                write_quant_record(strategy.unwrap(trainer.model), tmp / "model_ema")
            state = {
                "step": step,
                "optimizer": optim_sd,
                "scheduler": trainer.scheduler.state_dict(),
                "ema": trainer.ema.state_dict() if trainer.ema else None,
                "method": trainer.method.state_dict(),
                "rng": rng_state(),
                "data": trainer.data_state(),
            }
            torch.save(state, tmp / "trainer_state.pt")
            from vidtrain.config import dump_recipe

            (tmp / "recipe.yaml").write_text(dump_recipe(trainer.recipe))
        atomic_write_text(final.parent / "latest", final.name + "\n")
        _prune(final.parent, trainer.recipe.train.keep_checkpoints)
    strategy.barrier()
    strategy.save_engine(trainer.model, final / "engine")
    strategy.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_RE.match(p.name)))
    for _, p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(trainer, folder: Path) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from."""
    from vidtrain.models.wan.state_dict import load_model_state

    state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
    if not trainer.strategy.load_engine(trainer.model, folder / "engine"):
        load_model_state(trainer.strategy.unwrap(trainer.model), folder / "model")
        trainer.strategy.load_optim_state(trainer.model, trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.ema and state["ema"] is not None:
        trainer.ema.load_state_dict(state["ema"])
    trainer.method.load_state_dict(state["method"])
    set_rng_state(state["rng"])
    trainer.load_data_state(state["data"])
    return int(state["step"])
