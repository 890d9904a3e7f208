"""The strategy interface and the single-process strategy.

A strategy runs the one trainer loop's step on a `Mesh` (mesh.py: world = data-parallel x
sequence-parallel ranks): its backend's last transform of the model (`data_parallel`, applied
by `parallelize.parallelize` after SP, activation checkpointing and compile), backward and the
optimizer step, the reductions and agreements between ranks, and its checkpoint adapter
(`checkpoint`, checkpoint.py). Which tokens a rank holds is a layout's (layouts.py); the
per-rank balance figures are a logging callback's (balance_log.py). The model never imports
process groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from vidtrain.parallel.checkpoint import CheckpointAdapter
from vidtrain.parallel.mesh import Mesh
from vidtrain.registry import Registry

STRATEGIES: Registry[type] = Registry("parallel strategy")


class Strategy:
    """Single process, no communication. Subclasses override what they change."""

    name = "none"

    def __init__(self, recipe) -> None:
        self.recipe = recipe
        self.mesh = Mesh.single()  # a distributed strategy's `setup` builds the launcher's
        self.skipped = False  # an optimizer step skipped as non-finite (pop_skipped)
        self.checkpoint = self.checkpoint_adapter()

    # ---- topology (the mesh) -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank

    @property
    def dp_size(self) -> int:
        return self.mesh.dp_size

    @property
    def sp_rank(self) -> int:
        return self.mesh.sp_rank

    @property
    def sp_size(self) -> int:
        return self.mesh.sp_size

    @property
    def device(self) -> torch.device:
        return self.mesh.device

    @property
    def is_main(self) -> bool:
        return self.mesh.is_main

    # ---- life cycle ----------------------------------------------------------------------------
    def setup(self) -> None:
        if self.recipe.parallel.sp_size != 1:
            raise ValueError(
                f"parallel.sp_size={self.recipe.parallel.sp_size} needs a launcher with that many ranks "
                "and parallel.strategy ddp, fsdp or deepspeed"
            )

    def data_parallel(
        self, model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The backend's wrap of a model already on the device (parallelize's last step) and the
        optimizer over its trainable parameters."""
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def checkpoint_adapter(self) -> CheckpointAdapter:
        """How this backend's states leave and enter a checkpoint (vidtrain/train/checkpoint.py)."""
        return CheckpointAdapter(self.unwrap)

    def teardown(self) -> None:
        pass

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj) -> list:
        """`obj` of every rank, in rank order (agreeing on errors, choices made by rank 0)."""
        return [obj]

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (one all-reduce in parallel strategies)."""
        return bool(flag)

    # ---- the step ------------------------------------------------------------------------------
    def sp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the sequence-parallel group (loss numerators and denominators)."""
        return t

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        loss.backward()

    def clip_and_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, finite: bool = True
    ) -> float:
        """Clip, then step unless the gradient norm is not finite or `finite` (the step's losses
        were finite) is false on any rank: all ranks agree, the step is skipped everywhere and
        `pop_skipped()` says so. Returns the gradient norm (before clipping)."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else _grad_norm(params)
        self.step_or_skip(optimizer, finite and bool(torch.isfinite(norm)))
        return float(norm)

    def step_or_skip(self, optimizer: torch.optim.Optimizer, ok: bool) -> None:
        if self.all_true(ok):
            optimizer.step()
        else:
            self.skipped = True
        optimizer.zero_grad(set_to_none=True)

    def pop_skipped(self) -> bool:
        """Whether an optimizer step since the last call was skipped as non-finite."""
        skipped, self.skipped = self.skipped, False
        return skipped

    def full_params(self, model: nn.Module):
        """The trainable parameters as full tensors, as a module-like view for EMA (`named_parameters`).

        Sharding strategies (FSDP, ZeRO-3) gather them one at a time; all ranks must iterate it.
        """
        return self.unwrap(model)


class FullParams:
    """Module-like view for EMA: `named_parameters()` yields (name, full tensor) of each trainable
    parameter, gathered on demand by a sharding strategy (one at a time, bounded memory)."""

    def __init__(self, named: Callable[[], Iterator[tuple[str, torch.Tensor]]]) -> None:
        self._named = named

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._named()


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    if not params:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


STRATEGIES.add("none", Strategy)


def make_strategy(recipe) -> Strategy:
    """Instantiate the recipe's strategy (`parallel.strategy`)."""
    return STRATEGIES.get(recipe.parallel.strategy)(recipe)
