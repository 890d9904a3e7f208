"""Multi-rank strategies: DDP and FSDP2, each combinable with sequence parallelism.

Gradient scaling. With SP, each rank of an SP group back-propagates its part of the loss
(local squared errors / the group's total count), so the true gradient is the SUM over the SP
group; data-parallel ranks are AVERAGED. DDP, FSDP and DeepSpeed all average over the whole
world (dp x sp ranks); multiplying each rank's loss by sp_size before backward turns that
world average into sum-over-sp / dp. The trainer never sees the factor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vidtrain.models.seams import declared_modules
from vidtrain.models.wan.state_dict import _read_weights
from vidtrain.parallel.base import STRATEGIES, FullParams, Strategy
from vidtrain.parallel.checkpoint import CheckpointAdapter
from vidtrain.parallel.mesh import build_mesh


class DistributedStrategy(Strategy):
    """Shared by ddp / fsdp / deepspeed: the launcher's dp x sp mesh, reductions, agreement."""

    def setup(self) -> None:
        p = self.recipe.parallel
        if p.sp_impl not in ("ulysses", "ring"):
            raise ValueError(f"unknown parallel.sp_impl={p.sp_impl!r}; known: ring, ulysses")
        self.mesh = build_mesh(p.sp_size, p.timeout_s)

    def teardown(self) -> None:
        if self.mesh.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        dist.barrier()

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    # ---- the step ------------------------------------------------------------------------------
    def sp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.sp_size == 1:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, group=self.mesh.sp_group)
        return out

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.mesh.dp_group)
        return out / self.dp_size

    def loss_scale(self) -> float:
        return float(self.sp_size)

    def sync_grads(self, model: nn.Module) -> None:
        """Data-parallel gradient average after a backward whose forward ran on the unwrapped
        module (a method that runs several roles of one module per step: DMD). FSDP and DeepSpeed
        reduce in backward hooks whatever the forward went through, so nothing is left to do."""

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        (loss * self.loss_scale() if self.sp_size > 1 else loss).backward()

    def full_grads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter's full gradient after backward (tests and debugging; all ranks call it)."""
        return {
            n: p.grad.detach().cpu().clone()
            for n, p in self.unwrap(model).named_parameters()
            if p.grad is not None
        }


@STRATEGIES.register("ddp")
class DDPStrategy(DistributedStrategy):
    name = "ddp"

    def data_parallel(self, model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        return ddp, make_optimizer([p for p in ddp.parameters() if p.requires_grad])

    def sync_grads(self, model: nn.Module) -> None:
        """DDP's reducer only runs after a forward through the wrapper: average by hand, one flat
        all-reduce over every gradient present (the same parameters on every rank)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.unwrap(model).parameters() if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.mesh.dp_group)
        for g, mean in zip(grads, _unflatten_dense_tensors(flat / self.dp_size, grads), strict=True):
            g.copy_(mean)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if hasattr(model, "module") else model


@STRATEGIES.register("fsdp")
class FSDPStrategy(DistributedStrategy):
    """FSDP2: every shard unit the model declares (`_shard_units`: its blocks) and then the root
    sharded over the whole world (dp x sp ranks)."""

    name = "fsdp"

    def data_parallel(self, model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(dist.group.WORLD, self.device.type)
        for unit in declared_modules(model, "_shard_units"):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, make_optimizer([p for p in model.parameters() if p.requires_grad])

    def checkpoint_adapter(self) -> CheckpointAdapter:
        return FSDPCheckpoint(self.unwrap)

    def clip_and_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, finite: bool = True
    ) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.step_or_skip(optimizer, finite and bool(torch.isfinite(norm)))
        return float(norm)

    def full_grads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                out[n] = g.detach().cpu().clone()
        return out

    def full_params(self, model: nn.Module) -> FullParams:
        """Each trainable DTensor shard all-gathered to the full parameter, one at a time."""

        def named():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    full = p.full_tensor() if hasattr(p, "full_tensor") else p
                    yield n, full.detach().requires_grad_(True)

        return FullParams(named)


class FSDPCheckpoint(CheckpointAdapter):
    """Full states gathered from the shards (written by rank 0), scattered back into them."""

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        sd = get_model_state_dict(model, options=opts)
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    def optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=opts)

    def load_optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def load_weights(self, model: nn.Module, step_folder: Path) -> None:
        """Full weights scattered into the shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        sd = _read_weights(step_folder / "model")
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))

    def load_engine(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> bool:
        """Resume a sharded model: full weights and optimizer state scattered into the shards."""
        self.load_weights(model, folder.parent)
        state = torch.load(folder.parent / "trainer_state.pt", map_location="cpu", weights_only=False)
        self.load_optim_state(model, optimizer, state["optimizer"])
        return True
