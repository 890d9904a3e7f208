"""The strategy interface and the single-process strategy.

A strategy is applied to a plain model from outside (the model never imports process groups).
It owns the process topology (world = data-parallel x sequence-parallel ranks), wraps the model
and optimizer, runs backward and the optimizer step, and picks each rank's part of a
teacher-forcing sequence (the layout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from vidtrain.forcing.teacher import TFSequence, build_tf_sequence
from vidtrain.models.wan.state_dict import load_model_state
from vidtrain.parallel.sequence import take_frames
from vidtrain.registry import Registry
from vidtrain.tokens import TokenMeta

STRATEGIES: Registry[type] = Registry("parallel strategy")


class Strategy:
    """Single process, no communication. Subclasses override what they change."""

    name = "none"

    def __init__(self, recipe) -> None:
        self.recipe = recipe
        self.rank, self.world_size = 0, 1
        self.dp_rank, self.dp_size = 0, 1
        self.sp_rank, self.sp_size = 0, 1
        self.skipped = False  # an optimizer step skipped as non-finite (pop_skipped)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # ---- life cycle ----------------------------------------------------------------------------
    def setup(self) -> None:
        if self.recipe.parallel.sp_size != 1:
            raise ValueError(
                f"parallel.sp_size={self.recipe.parallel.sp_size} needs a launcher with that many ranks "
                "and parallel.strategy ddp, fsdp or deepspeed"
            )

    def wrap(self, model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]):
        model.to(self.device)
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def teardown(self) -> None:
        pass

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj) -> list:
        """`obj` of every rank, in rank order (agreeing on errors, choices made by rank 0)."""
        return [obj]

    def all_true(self, flag: bool) -> bool:
        """True when `flag` is true on every rank (one all-reduce in parallel strategies)."""
        return bool(flag)

    # ---- the step ------------------------------------------------------------------------------
    def tf_sequence(
        self, x0, noise: torch.Tensor, sigma_BF: torch.Tensor, frames_per_chunk: int
    ) -> tuple[TFSequence, TokenMeta]:
        """This rank's part of the teacher-forcing sequence and the global token metadata.

        `x0` is a latent tensor [B, C, F, H, W] or a lazy source of latent frames (videos encoded
        on demand, `sequence.take_frames`): a rank reads only the frames its part holds.
        """
        seq = build_tf_sequence(take_frames(x0, 0, x0.shape[2]), noise, sigma_BF, frames_per_chunk)
        return seq, seq.meta

    def step_report(self, step_time_s: float, logs: dict[str, float] | None = None) -> dict[str, float]:
        """Extra per-step figures to log (per-rank balance figures in parallel strategies).

        `logs` are this rank's figures of the step (parallel strategies keep a per-rank record).
        """
        return {}

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

    # ---- checkpoint ----------------------------------------------------------------------------
    def full_params(self, model: nn.Module):
        """The trainable parameters as full tensors, as a module-like view for EMA (`named_parameters`).

        Sharding strategies (FSDP, ZeRO-3) gather them one at a time; all ranks must iterate it.
        """
        return self.unwrap(model)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) state dict of the plain model, on CPU (all ranks call it)."""
        return {k: v.detach().cpu().clone() for k, v in self.unwrap(model).state_dict().items()}

    def optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def load_weights(self, model: nn.Module, step_folder: Path) -> None:
        """The checkpoint's model/ weights into the (wrapped) model; the optimizer is untouched."""

        load_model_state(self.unwrap(model), step_folder / "model")

    def save_engine(self, model: nn.Module, folder: Path) -> None:
        """Strategies with their own checkpoint format (DeepSpeed) write it here."""

    def load_engine(self, model: nn.Module, folder: Path) -> bool:
        return False


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
