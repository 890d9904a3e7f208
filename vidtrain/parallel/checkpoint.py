"""Checkpoint adapters: how one backend's model and optimizer states leave and enter a checkpoint.

vidtrain/train/checkpoint.py owns the checkpoint folder (staging folder, sha256 manifest, one
rename, every rank agreeing on failures) and calls only an adapter (`Strategy.checkpoint`), so
every backend's files land atomically. All ranks call every method (sharded states gather).
This one serves one process and DDP (full states of the unwrapped module); FSDP
(strategies.py) and DeepSpeed (deepspeed_strategy.py) have their own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vidtrain.models.wan.state_dict import load_model_state


class CheckpointAdapter:
    """Full (unsharded) states of the plain model and the optimizer; no engine format."""

    # an exact resume (train.resume=exact) needs the backend's own engine/ folder
    resume_needs_engine = False

    def __init__(self, unwrap: Callable[[nn.Module], nn.Module]) -> None:
        self.unwrap = unwrap  # the strategy's: wrapped model -> the plain model

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) state dict of the plain model, on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.unwrap(model).state_dict().items()}

    def optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def load_weights(self, model: nn.Module, step_folder: Path) -> None:
        """The checkpoint's model/ weights into the (wrapped) model; the optimizer is untouched."""
        load_model_state(self.unwrap(model), step_folder / "model")

    def save_engine(self, model: nn.Module, folder: Path) -> None:
        """A backend with its own checkpoint format (DeepSpeed) writes it here."""

    def load_engine(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> bool:
        """Resume weights and optimizer state in the backend's own way; False: it has none."""
        return False
