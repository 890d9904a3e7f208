"""Training methods plug into the one trainer loop by overriding its step, never by copying it.

A method decides what one optimisation step computes (teacher forcing, QAT, DMD); the trainer
owns the loop, data, strategy, optimizer, schedule, EMA, checkpoints and logging, and a method
sees it as a `StepContext` (vidtrain/train/context.py), passed as `trainer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vidtrain.forcing.flow import condition_first_frame, frames_sigma, sample_chunk_sigmas
from vidtrain.forcing.teacher import tf_loss_terms
from vidtrain.models.text import text_context
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.parallel.layouts import LAYOUTS, Layout
from vidtrain.registry import Registry
from vidtrain.tokens import MaskRule
from vidtrain.utils.faults import fault
from vidtrain.utils.rng import STEP_RADIX, keyed_generator

if TYPE_CHECKING:
    from vidtrain.train.context import StepContext

METHODS: Registry[type] = Registry("training method")


class Method:
    """Base method: one optimizer over the trainable parameters, gradient accumulation."""

    name = "base"

    def __init__(self, recipe) -> None:
        self.recipe = recipe

    def prepare_model(self, model: torch.nn.Module, trainer: StepContext) -> torch.nn.Module:
        """Transform the plain model before the strategy wraps it (convert, adapters)."""
        return model

    def make_optimizer(self, trainer: StepContext, params: list) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters (called by the strategy's wrap)."""
        return trainer.default_optimizer(params)

    def loss(self, trainer: StepContext, batch: dict, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def train_step(self, trainer: StepContext, step: int) -> dict[str, float]:
        """One optimizer step: `grad_accum` micro-batches, backward through the strategy, step."""
        accum = self.recipe.train.grad_accum
        logs: dict[str, float] = {}
        finite = True
        for micro in range(accum):
            batch = trainer.next_batch()
            with trainer.autocast():
                loss, extra = self.loss(trainer, batch, micro)
            if fault("nan", step + 1, trainer.strategy.rank):  # fault injection (tests)
                loss = loss * float("nan")
            finite = finite and bool(torch.isfinite(loss.detach()))
            trainer.strategy.backward(loss / accum, trainer.model)
            for k, v in extra.items():
                logs[k] = logs.get(k, 0.0) + v / accum
        # a non-finite loss on any rank (or gradient norm) skips the step on every rank
        logs["grad_norm"] = trainer.optimizer_step(finite)
        trainer.scheduler_step()
        return logs

    def on_checkpoint(self, trainer: StepContext, step: int) -> None:
        """Called on every rank whenever the trainer checkpoints (after `step` optimizer steps),
        before it writes: a method's own exports go here (DMD's RUN/lora/)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def caption_context(self, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's caption context and cross-attention mask on `device`, as the recipe's
        `model.text_padding` says (the loader pads so already; a batch built by hand gets the same)."""
        m = self.recipe.model
        text, mask = text_context(batch["text"], batch.get("text_mask"), m.text_padding, m.text_len)
        return text.to(device), None if mask is None else mask.to(device)


@METHODS.register("teacher_forcing")
class TeacherForcing(Method):
    """Clean history + noisy targets in one sequence; flow-matching loss on noisy tokens."""

    name = "teacher_forcing"

    def mask_rule(self) -> MaskRule:
        return MaskRule.of("teacher_forcing", self.recipe.model)

    def layout(self) -> Layout:
        """Which tokens of the sequence this rank holds (`parallel.layout`; all of them at sp_size 1)."""
        return LAYOUTS.get(self.recipe.parallel.layout)

    def kv_hook(self, trainer):
        return None

    def noise(self, trainer, batch: dict, micro: int):
        """Noise and per-frame sigmas, identical on every rank of a sequence-parallel group."""
        x0 = batch["latents"]
        b, _, f = x0.shape[:3]
        fpc = self.recipe.model.frames_per_chunk
        if f % fpc:
            raise ValueError(f"latents have {f} frames, not a multiple of model.frames_per_chunk={fpc}")
        g = trainer.step_generator(micro)
        fc = self.recipe.method.forcing
        sigma_BK = sample_chunk_sigmas(
            b, f // fpc, shift=fc.timestep_shift, min_t=fc.min_timestep, max_t=fc.max_timestep, generator=g
        )
        noise = torch.randn(x0.shape, generator=g)
        sigma_BF = frames_sigma(sigma_BK, fpc)
        if self.recipe.data.task == "t2v":
            return noise, sigma_BF
        return noise, condition_first_frame(sigma_BF, self.conditioned(trainer, b, micro))

    def conditioned(self, trainer, batch_size: int, micro: int) -> torch.Tensor:
        """Which samples are image-to-video [B] (`data.task`): i2v all, t2v none, mixed a draw
        per sample keyed by (seed, step, micro-batch, the sample's index in the global batch):
        the same on every rank of a sequence-parallel group, after a resume and however the
        batch is split over data-parallel ranks."""
        task = self.recipe.data.task
        if task != "mixed":
            return torch.full((batch_size,), task == "i2v")
        first = trainer.strategy.dp_rank * batch_size
        u = [
            float(torch.rand(1, generator=keyed_generator(
                self.recipe.seed, (trainer.step, STEP_RADIX), (micro, 131), (first + i, 65_536), (1, 8)
            )))
            for i in range(batch_size)
        ]  # fmt: skip
        return torch.tensor(u) < self.recipe.data.i2v_fraction

    def loss(self, trainer, batch: dict, micro: int):
        x0 = batch["latents"]
        noise, sigma_BF = self.noise(trainer, batch, micro)
        dev = trainer.device
        seq, global_meta = self.layout().tf_sequence(
            x0, noise, sigma_BF, self.recipe.model.frames_per_chunk, trainer.strategy.mesh
        )
        attn = AttentionContext(
            rule=self.mask_rule(), meta=global_meta.to(dev), kv_hook=self.kv_hook(trainer)
        )
        text, mask = self.caption_context(batch, dev)
        pred = trainer.model(
            seq.x_BLP.to(dev), seq.t_BL.to(dev), text, meta=seq.meta.to(dev), attn=attn, context_mask_BS=mask
        )
        sq, count = tf_loss_terms(pred, seq)
        total = trainer.strategy.sp_sum(count.detach())
        loss = sq / total
        logs = {"loss": float(trainer.strategy.sp_sum(loss.detach()))}
        if self.recipe.data.task != "t2v":  # a conditioned sample's frame 0 is at sigma 0 (min_timestep > 0)
            logs["i2v_fraction"] = float((sigma_BF[:, 0] == 0).float().mean())
        return loss, logs


def make_method(recipe) -> Method:
    """The recipe's method (`method.name`); plugins register through vidtrain/plugins.py."""
    return METHODS.get(recipe.method.name)(recipe)
