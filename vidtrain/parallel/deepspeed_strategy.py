"""The DeepSpeed strategy: the real engine (ZeRO 1/2/3) with a config generated from the recipe.

The trainer keeps its own loop: `backward` runs `engine.backward` (the trainer has already
divided the loss by grad_accum, so DeepSpeed's own division is off) and, between micro-batches,
`engine.step()` only advances DeepSpeed's accumulation counter; `clip_and_step` is the boundary
step (clipping by the config's `gradient_clipping`). The LR schedule stays the trainer's: it edits
the learning rate in the param groups that DeepSpeed's optimizer steps with. The optimizer is
the method's (`make_optimizer`, called by the engine on the trainable parameters); ZeRO flattens
each of its param groups separately, so per-group lr / betas (DMD's roles) survive.
Checkpoints (`DeepSpeedCheckpoint`): DeepSpeed's own sharded format under `engine/`
(resumable), plus the full model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vidtrain.errors import NonFiniteError
from vidtrain.parallel.base import STRATEGIES, FullParams
from vidtrain.parallel.checkpoint import CheckpointAdapter
from vidtrain.parallel.strategies import DistributedStrategy


def deepspeed_config(recipe, world_size: int, use_bf16: bool) -> dict:
    """The ds_config dict for a recipe (ZeRO stage, clipping, accumulation, precision)."""
    p, o, t = recipe.parallel, recipe.optim, recipe.train
    if p.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": recipe.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed counts every rank as data parallel; SP ranks share a sample (see strategies.py)
        "train_batch_size": recipe.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": float(o.grad_clip),
        # no "optimizer" section: the engine wraps the method's own optimizer (Method.make_optimizer,
        # torch AdamW by default; DMD's per-role subclass is not on ZeRO's list of tested types)
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@STRATEGIES.register("deepspeed")
class DeepSpeedStrategy(DistributedStrategy):
    name = "deepspeed"

    def setup(self) -> None:
        super().setup()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")

    def data_parallel(self, model: nn.Module, make_optimizer: Callable[[list], torch.optim.Optimizer]):
        """The engine around the model and the method's optimizer (`make_optimizer`)."""
        import deepspeed

        use_bf16 = self.device.type == "cuda" and self.recipe.train.mixed_precision != "fp32"
        cfg = deepspeed_config(self.recipe, self.world_size, use_bf16)
        params = [p for p in model.parameters() if p.requires_grad]
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=make_optimizer, config=cfg
        )
        # the trainer's LambdaLR edits lr in these param groups, which DeepSpeed's step reads
        return engine, getattr(optimizer, "optimizer", optimizer)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if hasattr(model, "module") else model

    def checkpoint_adapter(self) -> CheckpointAdapter:
        return DeepSpeedCheckpoint(self.unwrap, self.recipe.parallel.zero_stage)

    def backward(self, loss: torch.Tensor, model: nn.Module) -> None:
        scaled = loss * self.loss_scale() if self.sp_size > 1 else loss
        model.backward(scaled, scale_wrt_gas=False)
        if not model.is_gradient_accumulation_boundary():
            model.step()  # not a boundary: only advances the micro-step counter

    def clip_and_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, finite: bool = True
    ) -> float:
        """DeepSpeed's boundary step. ZeRO 1-3 check the gradients themselves and skip a step
        whose gradients are not finite (also in fp32); a step that it applied although the loss
        or the norm was not finite (ZeRO 0) has changed the weights: that is refused."""
        model.step()
        norm = model.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        applied = bool(model.was_step_applied())
        ok = self.all_true(finite and math.isfinite(norm) and applied)
        if not ok:
            if self.all_true(not applied):
                self.skipped = True
            else:
                raise NonFiniteError(
                    f"DeepSpeed (ZeRO stage {self.recipe.parallel.zero_stage}) applied an optimizer step "
                    f"with a non-finite loss or gradient norm ({norm}): the weights are not trustworthy; "
                    "resume from the newest checkpoint (ZeRO 1-3 skip such steps)"
                )
        return norm

    def full_grads(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for n, p in self.unwrap(model).named_parameters():
            g = safe_get_full_grad(p)
            if g is not None:
                out[n] = g.detach().float().cpu().clone()
        return out

    def full_params(self, model: nn.Module):
        """ZeRO-3 partitions parameters (the module holds empty placeholders): EMA reads each
        trainable parameter's full fp32 master copy, all-gathered one at a time."""
        if self.recipe.parallel.zero_stage != 3:
            return super().full_params(model)
        from deepspeed.utils import safe_get_full_fp32_param

        def named():
            for n, p in self.unwrap(model).named_parameters():
                if p.requires_grad:
                    yield n, safe_get_full_fp32_param(p).detach().requires_grad_(True)

        return FullParams(named)


class DeepSpeedCheckpoint(CheckpointAdapter):
    """DeepSpeed's own sharded format in engine/ (every rank writes its shards), the full model
    in model/ (ZeRO-3: gathered from the fp32 master copies)."""

    resume_needs_engine = True

    def __init__(self, unwrap, zero_stage: int) -> None:
        super().__init__(unwrap)
        self.zero_stage = zero_stage

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_full_fp32_param

            return {
                n: safe_get_full_fp32_param(p).detach().cpu().clone()
                for n, p in self.unwrap(model).named_parameters()
            } | {n: b.detach().cpu().clone() for n, b in self.unwrap(model).named_buffers()}
        return super().model_state(model)

    def optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return {}  # lives in engine/ (DeepSpeed's sharded format)

    def load_optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        pass

    def load_weights(self, model: nn.Module, step_folder: Path) -> None:
        """The module's weights alone (train.resume=weights_only): from engine/ when present,
        else from model/ with ZeRO's fp32 master copies refreshed from them."""
        if (step_folder / "engine" / "engine").exists():
            path, _ = model.load_checkpoint(str(step_folder / "engine"), tag="engine", load_module_only=True)
            if path is None:
                raise ValueError(f"DeepSpeed could not load its checkpoint from {step_folder / 'engine'}")
            return
        if self.zero_stage == 3:
            raise ValueError(
                f"{step_folder} has no engine/: train.resume=weights_only from model/ is not supported "
                "under ZeRO-3 (partitioned parameters); resume with parallel.zero_stage 1 or 2"
            )
        super().load_weights(model, step_folder)
        refresh = getattr(getattr(model, "optimizer", None), "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def save_engine(self, model: nn.Module, folder: Path) -> None:
        model.save_checkpoint(str(folder), tag="engine", save_latest=False)

    def load_engine(self, model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> bool:
        if not (folder / "engine").exists():
            return False
        path, _ = model.load_checkpoint(
            str(folder), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise ValueError(f"DeepSpeed could not load its checkpoint from {folder}")
        return True
