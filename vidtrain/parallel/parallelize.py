"""`parallelize`: a plain model made parallel from outside, in one fixed order (torchtitan's).

  1. sequence parallelism: every attention core the model declares (`_attention_modules`)
     wrapped by Ulysses or ring attention (`parallel.sp_impl`), when `parallel.sp_size` > 1;
  2. activation checkpointing: the model's own per-block recompute (`model.activation_checkpointing`,
     for a model that declares `_supports_gradient_checkpointing`);
  3. compile: a hook, a no-op until a recipe key asks for it (GPU only then);
  4. data parallelism: the strategy's backend (one process, DDP, FSDP2, the DeepSpeed engine),
     which also builds the optimizer over the trainable parameters.
The model file knows none of this (vidtrain/models/seams.py lists what it declares).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vidtrain.models.seams import seam_owner
from vidtrain.parallel.mesh import Mesh
from vidtrain.parallel.ring import apply_ring
from vidtrain.parallel.ulysses import apply_ulysses

MakeOptimizer = Callable[[list], torch.optim.Optimizer]
# a strategy's last step (`Strategy.data_parallel`): (model, make_optimizer) -> (wrapped model, optimizer)
DataParallel = Callable[[nn.Module, MakeOptimizer], tuple[nn.Module, torch.optim.Optimizer]]


def apply_sequence_parallel(model: nn.Module, mesh: Mesh, sp_impl: str) -> None:
    """Wrap the declared attention cores for the mesh's SP group (nothing at sp_size 1)."""
    if mesh.sp_size == 1:
        return
    if sp_impl == "ring":
        apply_ring(model, mesh.sp_group, mesh.sp_size, mesh.sp_rank)
    elif sp_impl == "ulysses":
        apply_ulysses(model, mesh.sp_group, mesh.sp_size)
    else:
        raise ValueError(f"unknown parallel.sp_impl={sp_impl!r}; known: ring, ulysses")


def apply_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """The model's own flag: its forward recomputes each block in backward when set."""
    seam_owner(model, "_supports_gradient_checkpointing").gradient_checkpointing = enabled


def apply_compile(model: nn.Module, recipe) -> None:
    """torch.compile of the blocks would go here (GPU only). No recipe key asks for it yet, so
    this is a no-op hook; FlexAttention is compiled on GPU by the attention core itself."""


def parallelize(
    model: nn.Module, mesh: Mesh, recipe, data_parallel: DataParallel, make_optimizer: MakeOptimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model on the mesh's device, transformed in the fixed order above; (model, optimizer)."""
    model.to(mesh.device)
    apply_sequence_parallel(model, mesh, recipe.parallel.sp_impl)
    apply_activation_checkpointing(model, recipe.model.activation_checkpointing)
    apply_compile(model, recipe)
    return data_parallel(model, make_optimizer)
