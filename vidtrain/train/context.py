"""`StepContext`: what a training method may use of the one loop (the `Trainer` provides it).

A method (`vidtrain/train/methods.py`, the `qat` and `dmd` methods) computes one optimisation
step through these and nothing else of the trainer: the run's recipe, device, strategy and
wrapped model, the next batch, autocast, the step's keyed noise, the optimizer step (with an
optional role: one parameter group of a `RoleOptimizer`, as DMD's generator and critic), the
learning-rate schedule. The trainer calls `Method.on_checkpoint` whenever it checkpoints.

Legend: none (no tensors here).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from vidtrain.config import Recipe
    from vidtrain.parallel.base import Strategy


@runtime_checkable
class RoleOptimizer(Protocol):
    """An optimizer with one parameter group per role whose `step` updates only `active_role`'s
    group (None: every group)."""

    active_role: str | None


class StepContext(Protocol):
    """The trainer as a method sees it."""

    recipe: Recipe
    device: torch.device
    strategy: Strategy
    model: torch.nn.Module  # as the strategy wrapped it
    optimizer: torch.optim.Optimizer
    step: int  # optimizer steps done before this one
    run_dir: Path

    def next_batch(self) -> dict: ...

    def autocast(self) -> AbstractContextManager: ...

    def step_generator(self, micro: int = 0, salt: int = 0) -> torch.Generator: ...

    def default_optimizer(self, params: list) -> torch.optim.Optimizer: ...

    def optimizer_step(self, finite: bool = True, role: str | None = None) -> float:
        """Clip and step through the strategy (skipped on every rank unless `finite` everywhere);
        `role`: step only that role's parameter group. Returns the gradient norm."""
        ...

    def scheduler_step(self) -> None:
        """Advance the learning-rate schedule by one optimizer step."""
        ...
