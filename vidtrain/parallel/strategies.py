"""Multi-rank strategies: DDP and FSDP2, each combinable with Ulysses sequence parallelism.

Gradient scaling. With SP, each rank of an SP group back-propagates its part of the loss
(local squared errors / the group's total count), so the true gradient is the SUM over the SP
group; data-parallel ranks are AVERAGED. DDP, FSDP and DeepSpeed all average over the whole
world (dp x sp ranks); multiplying each rank's loss by sp_size before backward turns that
world average into sum-over-sp / dp. The trainer never sees the factor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vidtrain.forcing.teacher import TFSequence
from vidtrain.models.wan.state_dict import _read_weights
from vidtrain.parallel.balance import layout_report, plot_rank_figures
from vidtrain.parallel.base import STRATEGIES, FullParams, Strategy
from vidtrain.parallel.mesh import Mesh, build_mesh
from vidtrain.parallel.sequence import apply_ring, apply_ulysses, local_tf_sequence
from vidtrain.tokens import MaskRule, TokenMeta


class DistributedStrategy(Strategy):
    """Shared by ddp / fsdp / deepspeed: the dp x sp mesh, SP layouts, reductions, balance figures."""

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        self.mesh: Mesh | None = None
        self.step_times: list[list[float]] = []  # per step: every rank's step time
        self.layout_figures: dict[str, list[float]] | None = None

    def setup(self) -> None:
        p = self.recipe.parallel
        if p.sp_impl not in ("ulysses", "ring"):
            raise ValueError(f"unknown parallel.sp_impl={p.sp_impl!r}; known: ring, ulysses")
        self.mesh = m = build_mesh(p.sp_size, p.timeout_s)
        self.rank, self.world_size = m.rank, m.world_size
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = m.dp_rank, m.dp_size, m.sp_rank, m.sp_size
        self.device = m.device

    def teardown(self) -> None:
        if self.mesh is not None and self.is_main and self.step_times and self.recipe.log.plots:
            plot_rank_figures(self.rank_figures(), Path(self.recipe.run.dir) / "balance.png")
        if self.mesh is not None and self.mesh.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.mesh = None

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

    def apply_sequence_parallel(self, model: nn.Module) -> None:
        if self.sp_size > 1 and self.recipe.parallel.sp_impl == "ring":
            apply_ring(model, self.mesh.sp_group, self.sp_size, self.sp_rank)
        elif self.sp_size > 1:
            apply_ulysses(model, self.mesh.sp_group, self.sp_size)

    # ---- the step ------------------------------------------------------------------------------
    def tf_sequence(
        self, x0, noise: torch.Tensor, sigma_BF: torch.Tensor, frames_per_chunk: int
    ) -> tuple[TFSequence, TokenMeta]:
        """`x0`: latents, or a lazy source from videos of which the rank encodes only its span."""
        if self.sp_size == 1:
            return super().tf_sequence(x0, noise, sigma_BF, frames_per_chunk)
        layout = self.recipe.parallel.layout
        seq, meta = local_tf_sequence(
            layout, x0, noise, sigma_BF, frames_per_chunk, self.sp_rank, self.sp_size, self.mesh.sp_group
        )
        if self.layout_figures is None:
            self._remember_layout(x0, frames_per_chunk)
        return seq, meta

    def _remember_layout(self, x0, fpc: int) -> None:
        """The layout's per-rank figures; VAE frames with the run's halo, or 0 for latent shards."""

        f, h, w = x0.shape[2:]
        pre_encoded = isinstance(x0, torch.Tensor)
        halo = 0 if pre_encoded else x0.halo
        rule = MaskRule.of("teacher_forcing", self.recipe.model)  # the mask training runs
        rep = layout_report(self.recipe.parallel.layout, f, fpc, self.sp_size, h, w, halo, pre_encoded, rule)
        self.layout_figures = {k: v for k, v in rep["per_rank"].items()}

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

    def step_report(self, step_time_s: float, logs: dict[str, float] | None = None) -> dict[str, float]:
        self._rank_log(step_time_s, logs or {})
        t = torch.tensor([step_time_s], dtype=torch.float64)
        if self.device.type == "cuda":
            t = t.to(self.device)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        times = [float(x) for x in out]
        self.step_times.append(times)
        mean = sum(times) / len(times)
        report = {"balance/step_time_max_over_mean": max(times) / mean if mean > 0 else 1.0}
        for key, vals in (self.layout_figures or {}).items():
            m = sum(vals) / len(vals)
            report[f"balance/{key}_max_over_mean"] = max(vals) / m if m > 0 else 1.0
        return report

    def _rank_log(self, step_time_s: float, logs: dict[str, float]) -> None:
        """RUN/ranks/rank{r}.jsonl: every rank's own loss and step time (lockstep is checkable)."""
        folder = Path(self.recipe.run.dir) / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        rec = {
            "local_step": len(self.step_times) + 1,
            "rank": self.rank,
            "dp_rank": self.dp_rank,
            "sp_rank": self.sp_rank,
        }
        rec |= {k: float(v) for k, v in logs.items() if isinstance(v, int | float)} | {
            "step_time_s": step_time_s
        }
        with open(folder / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def rank_figures(self) -> dict[str, list[float]]:
        """Per-rank figures of the run: the layout's counts (per SP rank) and mean step time."""
        figs = dict(self.layout_figures or {})
        if self.step_times:
            n = len(self.step_times)
            figs["step_time_s"] = [sum(s[r] for s in self.step_times) / n for r in range(self.world_size)]
        return figs


@STRATEGIES.register("ddp")
class DDPStrategy(DistributedStrategy):
    name = "ddp"

    def wrap(self, model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]):
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.device)
        self.apply_sequence_parallel(model)
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
    """FSDP2: every block and then the root sharded over the whole world (dp x sp ranks)."""

    name = "fsdp"

    def wrap(self, model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        model.to(self.device)
        self.apply_sequence_parallel(model)
        mesh = DeviceMesh.from_group(dist.group.WORLD, self.device.type)
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, self.wrap_optimizer(make_optimizer([p for p in model.parameters() if p.requires_grad]))

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

    def load_engine(self, model: nn.Module, folder: Path) -> bool:
        """Resume a sharded model: full weights and optimizer state scattered into the shards."""
        self.load_weights(model, folder.parent)
        state = torch.load(folder.parent / "trainer_state.pt", map_location="cpu", weights_only=False)
        self.load_optim_state(model, self.optimizer, state["optimizer"])
        return True

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        self.optimizer = optimizer
        return optimizer
