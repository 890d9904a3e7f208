"""Training methods plug into the one trainer loop by overriding its step, never by copying it.

A method decides what one optimisation step computes (teacher forcing, QAT, DMD); the trainer
owns the loop, data, strategy, optimizer, schedule, EMA, checkpoints and logging, and a method
sees it as a `StepContext` (vidtrain/train/context.py), passed as `trainer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vidtrain.forcing.error_bank import BANK_DTYPES, ErrorBank, noisy_frame_errors
from vidtrain.forcing.flow import (
    NUM_TRAIN_TIMESTEPS,
    condition_first_frame,
    frames_sigma,
    sample_chunk_sigmas,
)
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
    """Clean history + noisy targets in one sequence; flow-matching loss on noisy tokens.

    With `method.error_recycling.enabled` the method keeps an `ErrorBank` of its own per-frame
    errors (vidtrain/forcing/error_bank.py): each micro-batch draws, per sample and keyed like
    `conditioned` (equal on every rank of an SP group, after a resume, however the batch is
    split), whether its clean history (and its noisy input) gets a banked error; after the
    optimizer step every rank's noisy-frame errors are gathered over the world and written in
    (micro-batch, global sample, frame) order, so every rank, and a one-process run, holds the
    same bank. The bank is part of the method state (checkpoint, exact resume).
    """

    name = "teacher_forcing"

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        er = recipe.method.error_recycling
        self.error_bank = ErrorBank(er.buckets, er.bank_size, BANK_DTYPES[er.dtype]) if er.enabled else None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

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

    # ---- error recycling ---------------------------------------------------------------------
    def recycled_errors(self, trainer, shape, sigma_BF: torch.Tensor, micro: int) -> tuple[dict, dict]:
        """The micro-batch's error-recycling deltas for `Layout.tf_sequence` (whole-video tensors,
        none when nothing is injected: the plain sequence) and their log figures."""
        er = self.recipe.method.error_recycling
        b, c, f, h, w = shape
        if self.error_bank.empty or trainer.step < er.warmup_steps:
            return {}, {"err_inject": 0.0, "err_inject_noisy": 0.0}
        bank_shape = self.error_bank.entry_shape
        if bank_shape != (c, h, w):
            raise ValueError(
                f"error recycling banks one latent size: the bank holds {list(bank_shape)} [C, H, W], "
                f"this batch is {[c, h, w]} (train on one resolution, or turn method.error_recycling off)"
            )
        hist, noisy = torch.zeros(b, f, c, h, w), torch.zeros(b, f, c, h, w)
        n_hist = n_noisy = 0
        live_BF = sigma_BF > 0  # an image-to-video conditioning frame stays exact, as at inference
        first = trainer.strategy.dp_rank * b
        for i in range(b):
            g = keyed_generator(
                self.recipe.seed, (trainer.step, STEP_RADIX), (micro, 131), (first + i, 65_536), (2, 8)
            )
            u = torch.rand(2, generator=g, dtype=torch.float64)
            if u[0] < er.probability and (e := self.error_bank.sample_history(f, g)) is not None:
                hist[i], n_hist = e * live_BF[i, :, None, None, None], n_hist + 1
            drawn = (
                self.error_bank.sample_at(sigma_BF[i] * NUM_TRAIN_TIMESTEPS, g)
                if u[1] < er.noisy_probability
                else None
            )
            if drawn is not None:
                noisy[i], n_noisy = drawn[0] * (drawn[1] & live_BF[i])[:, None, None, None], n_noisy + 1
        deltas = {}
        if n_hist:
            deltas["history_delta_BCFHW"] = (hist * er.scale).transpose(1, 2)
        if n_noisy:
            deltas["noisy_delta_BCFHW"] = (noisy * er.scale).transpose(1, 2)
        return deltas, {"err_inject": n_hist / b, "err_inject_noisy": n_noisy / b}

    def keep_errors(self, trainer, pred_BLP, seq, sigma_BF: torch.Tensor, h: int, w: int, micro: int) -> None:
        """Hold this rank's noisy-frame errors of the micro-batch until the step commits them."""
        frames, err = noisy_frame_errors(
            pred_BLP, seq, sigma_BF, self.recipe.method.error_recycling.error, h, w
        )
        b, n = err.shape[:2]
        first = trainer.strategy.dp_rank * b
        sample = torch.arange(first, first + b).repeat_interleave(n)
        frame = frames.repeat(b)
        t = sigma_BF.cpu()[:, frames].reshape(-1).double() * NUM_TRAIN_TIMESTEPS
        keep = t > 0  # no error of an I2V conditioning frame (no loss, no prediction asked)
        key = torch.stack([torch.full_like(sample, micro), sample, frame], 1)[keep]
        self._pending.append(
            (key, t[keep], err.reshape(b * n, *err.shape[2:])[keep].to(self.error_bank.dtype))
        )

    def commit_errors(self, strategy) -> dict[str, float]:
        """Every rank's held errors, gathered over the world, written to the bank in (micro-batch,
        global sample, frame) order on every rank (non-finite entries dropped); bank figures."""
        mine, self._pending = self._pending, []
        parts = [p for rank in strategy.all_gather_object(mine) for p in rank]
        if parts:
            key = torch.cat([p[0] for p in parts])
            t, err = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
            order = torch.argsort((key[:, 0] << 40) + (key[:, 1] << 20) + key[:, 2], stable=True)
            ok = torch.isfinite(err[order].float()).flatten(1).all(1)
            self.error_bank.add(err[order][ok], t[order][ok])
        return {"err_bank_mib": self.error_bank.nbytes / 2**20, "err_bank_fill": self.error_bank.fill}

    def train_step(self, trainer: StepContext, step: int) -> dict[str, float]:
        logs = super().train_step(trainer, step)
        if self.error_bank is not None:
            logs.update(self.commit_errors(trainer.strategy))
        return logs

    def state_dict(self) -> dict:
        return {} if self.error_bank is None else {"error_bank": self.error_bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint written without error recycling (a change accepted by train.resume_changes=
        # allow) leaves the bank empty
        if self.error_bank is not None and "error_bank" in state:
            self.error_bank.load_state_dict(state["error_bank"])

    def loss(self, trainer, batch: dict, micro: int):
        x0 = batch["latents"]
        noise, sigma_BF = self.noise(trainer, batch, micro)
        dev = trainer.device
        deltas, er_logs = (
            ({}, {}) if self.error_bank is None else self.recycled_errors(trainer, x0.shape, sigma_BF, micro)
        )
        seq, global_meta = self.layout().tf_sequence(
            x0, noise, sigma_BF, self.recipe.model.frames_per_chunk, trainer.strategy.mesh, **deltas
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
        if self.error_bank is not None:
            self.keep_errors(trainer, pred, seq, sigma_BF, x0.shape[3], x0.shape[4], micro)
            logs.update(er_logs)
        return loss, logs


def make_method(recipe) -> Method:
    """The recipe's method (`method.name`); plugins register through vidtrain/plugins.py."""
    return METHODS.get(recipe.method.name)(recipe)
