"""DMD (DMD2 as CausVid / Self-Forcing / LongLive use it) as a method of the one trainer loop.

Per step (`train_step`):
  1. roll out the few-step generator (adapter `dmd`): self forcing through the streaming
     sampler's chunk loop (gradient at a random exit step per chunk), or teacher forcing on data;
  2. every `generator_update_every`-th step: generator update with the DMD loss
        g = (x0_fake − x0_real) / mean|x − x0_real|   (normalised per chunk)
        L = 0.5·‖x − stopgrad(x − g)‖² / N            (so dL/dx = g / N)
     x0_real from the frozen teacher (adapters off) with CFG, x0_fake from the critic;
  3. every step: critic update (adapter `critic`), flow matching on the generator's outputs.
Both roles share one AdamW with a parameter group per role (own lr and betas); each update
steps only its role's group (`RoleAdamW`), so the roles keep independent weights, moments and
step counts: two optimizers in one state dict (resumed by the trainer's checkpoint).
Parallel: data-parallel ranks (ddp, deepspeed ZeRO 0-2) roll out their own samples; every random
draw of a sample is keyed by its index in the global batch, so a step does not depend on how
the batch is split (equal to one process on the concatenated batch, tests/test_dmd_parallel.py).
The generator LoRA keeps its own EMA (`method.dmd.ema_decay`, vidtrain/train/ema.py); the export
(RUN/lora/, whenever the trainer checkpoints: `on_checkpoint`) writes the EMA weights.
The rollouts' sampler settings are resolved once, from the recipe, by `SamplerConfig.from_run`
(the settings `vidtrain sample` takes from the run): on an NVFP4 (QAT) base the self-forcing
rollouts use the NVFP4 KV cache, as deployed (on an FP8 base, `quant.format: fp8` or an FP8
teacher's quant.json, the FP8 cache); on a high-precision base fp32 K/V. On a quantized base
(NVFP4 or FP8 linears) the peft LoRA adapters run beside the quantized linear in high precision. The caption
context follows `model.text_padding` everywhere (`Method.caption_context`): rollouts, the
teacher's and critic's scores and the critic loss see the same context, and the LoRA record
carries the setting so `vidtrain sample --lora` pads as the distillation did.

Long self-rollout tuning (`method.dmd.rollout_frames` > the clip, or `window_frames` < it;
`DMD.long_rollout`, vidtrain/distill/rollout.py `long_self_rollout`): the generator rolls out
`rollout_frames` through the sampler's chunk loop with the rolling KV cache (the recipe's window
and sinks, the KV format above), and DMD is applied on `windows` windows of `window_frames`
drawn per step from (seed, step) alone (equal on every rank, resume-exact). The graph exists only
inside the windows. Teacher and critic see each window alone, as a clip of its own (no clean
history before it) whose frames keep their rollout positions (`frame_offset`: RoPE positions and
the mask's frame indices of where it sits, so no global sink frame lies in it), with the caption
of the shot it lies in (windows never straddle a cut). `rollout_shots`: equal shots, each with its
caption (`shot_captions`) and the sampler's shot sink re-pinned at the cut. With the defaults
(null lengths, one window, one shot) the step is today's, bit for bit.

Image-to-video (`data.task: i2v | mixed`, a Wan2.2 TI2V base), as teacher forcing does it: a
conditioned sample (every sample for i2v; for mixed the per-sample draw of
`TeacherForcing.conditioned`, micro-batch 0, so deterministic and rank-consistent) has its latent
frame 0 = the batch's clean latent frame 0 (the image). Self-forcing rollouts pin it at timestep
0 in every generator pass (the sampler's `Conditioning.image_latent`; the sampler pins a whole
batch, so a mixed batch rolls out its conditioned and its other samples apart, each sample with
its own seed as before); the teacher-forcing rollout keeps it clean (sigma 0, output = the image).
The teacher's and critic's teacher-forced forwards see it clean at timestep 0 (per-frame sigma 0,
`flow.condition_first_frame`), and the DMD loss (its per-chunk normalisation included) and the
critic's flow-matching loss are masked means over the other frames: no loss on the conditioning
frame. A long rollout conditions chunk 0 only: the window holding it (frame offset 0) is scored
so, the others as usual; backward noise init leaves a conditioned chunk 0 un-re-noised
(`long_self_rollout`). T2V samples and `data.task: t2v` run today's code, bit for bit.

Legend: B batch, C channels, F latent frames, K chunks, H/W latent size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vidtrain.config import check_dmd_long_lengths, validate
from vidtrain.distill.rollout import long_self_rollout, tf_velocity, window_starts
from vidtrain.forcing.flow import condition_first_frame, frames_sigma, noise_latents, sample_chunk_sigmas
from vidtrain.lora import roles as lora
from vidtrain.lora.files import export_lora
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.state_dict import resolve_model_folder
from vidtrain.quant.convert import FP8_QUANTIZERS, convert_for_recipe
from vidtrain.quant.qat import apply_quant_record
from vidtrain.sample import SamplerConfig, StreamingSampler
from vidtrain.tokens import MaskRule
from vidtrain.train.ema import EMA
from vidtrain.train.methods import METHODS, Method, TeacherForcing
from vidtrain.utils import rng

if TYPE_CHECKING:
    from vidtrain.train.context import StepContext

# the rollouts' K/V on a high-precision base: the training precision (an NVFP4 base: "nvfp4")
ROLLOUT_KV = "fp32"


def dmd_gradient(
    x_BCFHW, real_x0, fake_x0, frames_per_chunk: int, keep_BF: torch.Tensor | None = None
) -> torch.Tensor:
    """(fake − real) divided by mean |x − real| over each chunk of each sample (DMD2).
    `keep_BF` (I2V): the frames that count; the others (a conditioning frame) get g = 0 and are
    left out of their chunk's mean."""
    b, c, f, h, w = x_BCFHW.shape
    k = f // frames_per_chunk
    if keep_BF is not None:
        m = keep_BF.to(x_BCFHW.device)[:, None, :, None, None].expand(b, 1, f, h, w)
        m6 = m.reshape(b, 1, k, frames_per_chunk, h, w)
        diff = torch.where(m, (x_BCFHW - real_x0).abs(), 0.0).reshape(b, c, k, frames_per_chunk, h, w)
        count = (m6.sum(dim=(1, 3, 4, 5), keepdim=True) * c).clamp_min(1)
        norm = (diff.sum(dim=(1, 3, 4, 5), keepdim=True) / count).clamp_min(1e-12)  # [B, 1, K, 1, 1, 1]
        g = torch.where(m, fake_x0 - real_x0, 0.0).reshape(b, c, k, frames_per_chunk, h, w) / norm
        return g.reshape(b, c, f, h, w)
    diff = (x_BCFHW - real_x0).abs().reshape(b, c, k, frames_per_chunk, h, w)
    norm = diff.mean(dim=(1, 3, 4, 5), keepdim=True).clamp_min(1e-12)  # [B, 1, K, 1, 1, 1]
    g = (fake_x0 - real_x0).reshape(b, c, k, frames_per_chunk, h, w) / norm
    return g.reshape(b, c, f, h, w)


def dmd_loss(
    x_BCFHW: torch.Tensor, g_BCFHW: torch.Tensor, keep_BF: torch.Tensor | None = None
) -> torch.Tensor:
    """0.5·MSE(x, stopgrad(x − g)): its gradient in x is g / numel. `keep_BF` (I2V): the mean over
    the kept frames only (gradient g / kept elements there, 0 on the others)."""
    x = x_BCFHW.float()
    if keep_BF is None:
        return 0.5 * F.mse_loss(x, (x - g_BCFHW.float()).detach())
    return 0.5 * masked_mean((x - (x - g_BCFHW.float()).detach()).pow(2), keep_BF)


def masked_mean(e_BCFHW: torch.Tensor, keep_BF: torch.Tensor) -> torch.Tensor:
    """Mean of `e` over the elements of the kept frames (the others, even non-finite, ignored)."""
    b, c, f, h, w = e_BCFHW.shape
    m = keep_BF.to(e_BCFHW.device)[:, None, :, None, None].expand(b, c, f, h, w)
    return torch.where(m, e_BCFHW, 0.0).sum() / (m.sum() * 1.0).clamp_min(1)


def loss_frames(conditioned_B: torch.Tensor, num_frames: int) -> torch.Tensor | None:
    """[B, F] the frames a loss counts: all but frame 0 of a conditioned (I2V) sample; None when
    no sample is conditioned (today's unmasked losses)."""
    if not bool(conditioned_B.any()):
        return None
    keep = torch.ones(conditioned_B.shape[0], num_frames, dtype=torch.bool)
    keep[conditioned_B.cpu(), 0] = False
    return keep


def check_dmd_recipe(recipe) -> Path:
    """Clear errors before any model is built; returns the teacher checkpoint folder.

    The recipe's own checks are `config.validate`'s (run again here: a recipe may have been
    changed after loading); what is left is the teacher a run needs (shipped recipes leave it to
    the command line)."""
    validate(recipe)
    d, m = recipe.method.dmd, recipe.model
    teacher = d.teacher or m.checkpoint
    if teacher is None:
        raise ValueError("method.dmd.teacher (or model.checkpoint) must name the teacher checkpoint")
    if not Path(teacher).exists():
        raise FileNotFoundError(f"method.dmd.teacher: checkpoint not found: {teacher}")
    return Path(teacher)


@dataclass
class Window:
    """One supervised window of a long rollout: its generator latents [B, C, Fw, H, W] (graph
    through its chunks' exit steps on a generator step), its first latent frame in the rollout,
    the caption context (and mask) of its shot, its index among the step's windows."""

    x_BCFHW: torch.Tensor
    frame_offset: int
    text: torch.Tensor
    mask: torch.Tensor | None
    index: int


class RoleAdamW(torch.optim.AdamW):
    """AdamW over one param group per role whose `step` updates only `active_role`'s group.

    Plain Adam skips parameters without a gradient, but ZeRO hands every parameter of a group a
    (zero) gradient and steps every group: without the switch a generator update would advance
    the critic's moments and step count (and move its weights unless beta1 = 0).
    """

    active_role: str | None = None  # None: every group

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [g for g in groups if self.active_role in (None, g["role"])]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


@METHODS.register("dmd")
class DMD(Method):
    name = "dmd"

    def __init__(self, recipe) -> None:
        super().__init__(recipe)
        self.teacher_path = check_dmd_recipe(recipe)
        self.cfg = recipe.method.dmd
        self.fpc = recipe.model.frames_per_chunk
        # the self-forcing rollouts' settings, as `vidtrain sample` resolves them for this run
        self.sampler_config = SamplerConfig.from_run(recipe, defaults={"kv_cache": ROLLOUT_KV})
        self.sigmas = self.sampler_config.sigmas()  # the few-step schedule (denoising_steps, shift)
        self.ema: EMA | None = None
        self.updates = {"generator": 0, "critic": 0}
        self.rollout_stats: dict = {}  # the last long rollout's KV peak and chunks generated

    # ---- set-up --------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module, trainer: StepContext) -> torch.nn.Module:
        """Teacher weights into the base, optional NVFP4 convert, then the two adapters."""
        if self.recipe.model.checkpoint is None:
            teacher = CausalWanDiT.from_pretrained(str(self.teacher_path))
            if teacher.cfg != model.cfg:
                raise ValueError(
                    f"teacher {self.teacher_path} is {teacher.cfg}, the recipe's model is {model.cfg}"
                )
            model.load_state_dict(teacher.state_dict())
            del teacher
        # a QAT teacher is distilled as it will be deployed: on its NVFP4 fake-quant base
        quant = self.recipe.quant  # an FP8 record's linears on the recipe's FP8 backend
        fp8_backend = (
            quant.backend if quant.format == "fp8" and quant.backend in FP8_QUANTIZERS else "emulate"
        )
        teacher_folder = resolve_model_folder(self.teacher_path)
        if not apply_quant_record(model, teacher_folder, fp8_backend=fp8_backend) and self.recipe.quantized:
            convert_for_recipe(model, self.recipe.quant, trainer.device)
        d = self.cfg
        peft_model = lora.add_roles(model, d.lora_rank, d.lora_alpha, d.lora_targets)
        if d.ema_decay > 0:
            self.ema = EMA(lora.adapter_params(peft_model, lora.GENERATOR), d.ema_decay)
        self._peft_model = peft_model
        return peft_model

    def make_optimizer(self, trainer: StepContext, params: list) -> torch.optim.Optimizer:
        """One AdamW, a parameter group per role (its own lr and betas); `update` steps one role's
        group at a time, and one state dict resumes both."""
        o, d = self.recipe.optim, self.cfg
        gen_ids = {id(p) for p in lora.adapter_params(self._peft_model, lora.GENERATOR).values()}
        gen = [p for p in params if id(p) in gen_ids]
        critic = [p for p in params if id(p) not in gen_ids]
        return RoleAdamW(
            [
                {"params": gen, "lr": d.generator_lr, "betas": tuple(d.generator_betas), "role": "generator"},
                {"params": critic, "lr": d.critic_lr, "betas": tuple(d.critic_betas), "role": "critic"},
            ],
            eps=o.eps,
            weight_decay=o.weight_decay,
        )

    # ---- pieces --------------------------------------------------------------------------------
    def rule(self, kind: str) -> MaskRule:
        return MaskRule.of(kind, self.recipe.model)

    def exit_steps(self, step: int, num_chunks: int) -> list[int]:
        """The rollout's exit step of each chunk: a function of (seed, step) only, so equal on
        every rank (Self-Forcing draws one per chunk)."""
        g = rng.step_only_generator(self.recipe.seed, step)
        return torch.randint(len(self.sigmas), (num_chunks,), generator=g).tolist()

    def is_generator_step(self, step: int) -> bool:
        return step % self.cfg.generator_update_every == 0

    def conditioned(self, trainer, batch_size: int) -> torch.Tensor:
        """Which samples of this rank's batch are image-to-video [B] (`data.task`): teacher
        forcing's own decision (`TeacherForcing.conditioned`, micro-batch 0): keyed by (seed, step,
        the sample's index in the global batch), equal on every rank, after a resume."""
        if self.recipe.data.task == "t2v":
            return torch.zeros(batch_size, dtype=torch.bool)
        return TeacherForcing.conditioned(self, trainer, batch_size, 0)

    def scored_conditioned(self, trainer, batch_size: int, window: Window | None) -> torch.Tensor:
        """The conditioned samples of a scored clip: a long rollout's window only when it holds
        chunk 0 (the image frame); other windows are scored as text-to-video."""
        if window is not None and window.frame_offset != 0:
            return torch.zeros(batch_size, dtype=torch.bool)
        return self.conditioned(trainer, batch_size)

    @staticmethod
    def by_condition(conditioned_B: torch.Tensor, run):
        """`run(rows, image)` over the batch: once when all samples agree (rows None), else once
        for the unconditioned and once for the conditioned rows (the sampler pins frame 0 of a
        whole batch), the results (a tensor or a list of them, batch first) put back in order."""
        if not bool(conditioned_B.any()) or bool(conditioned_B.all()):
            return run(None, bool(conditioned_B.any()))
        rows = [torch.nonzero(~conditioned_B).squeeze(1), torch.nonzero(conditioned_B).squeeze(1)]
        parts = [run(r, flag) for r, flag in zip(rows, (False, True), strict=True)]
        order = torch.argsort(torch.cat(rows))

        def merge(a, b):
            return torch.cat([a, b])[order.to(a.device)]

        if isinstance(parts[0], list):
            return [merge(a, b) for a, b in zip(*parts, strict=True)]
        return merge(*parts)

    def long_plan(self, clip_frames: int) -> tuple[int, int] | None:
        """(rollout frames, window frames) of a long rollout; None: today's rollout of the clip."""
        d = self.cfg
        if (
            d.rollout_frames in (None, clip_frames)
            and d.window_frames in (None, clip_frames)
            and d.windows == 1
            and d.rollout_shots == 1
            and not d.backward_noise_init
        ):
            return None
        return check_dmd_long_lengths(d, self.fpc, clip_frames)

    def window_generator(self, step: int) -> torch.Generator:
        """The windows' placement draw: (seed, step) alone, a stream apart from the exit steps'."""
        return rng.keyed_generator(self.recipe.seed, (step * 7919 + 103, rng.STEP_RADIX))

    def shot_text(self, text, mask, shot: int):
        """Shot `shot`'s caption context: the sample's own ("same") or sample (b + shot) mod B's of
        this rank's batch ("batch"; with data parallelism the pairing follows the split)."""
        if self.cfg.shot_captions == "same" or shot == 0:
            return text, mask
        return torch.roll(text, -shot, 0), None if mask is None else torch.roll(mask, -shot, 0)

    def long_rollout(self, trainer, model, batch: dict, step: int, grad: bool, plan) -> list[Window]:
        """The windows of a long self-forcing rollout (module docstring; rollout.long_self_rollout)."""
        d, fpc = self.cfg, self.fpc
        b, _, _, h, w = batch["latents"].shape
        k_roll, wk = plan[0] // fpc, plan[1] // fpc
        cps = k_roll // d.rollout_shots
        text, mask = self.text(trainer, batch)
        shots = [self.shot_text(text, mask, s) for s in range(d.rollout_shots)]
        starts = window_starts(k_roll, wk, d.windows, cps, self.window_generator(step))
        exits = self.exit_steps(step, k_roll) if grad else None
        seeds = self.sample_seeds(trainer, b, salt=0)

        def run(rows, image: bool):
            pick = _rows(rows)
            conds = [self.sampler_config.condition(pick(t), pick(m)) for t, m in shots]
            if image:  # shot 0's first frame: the clip's clean latent frame 0
                conds[0].image_latent = pick(batch["latents"].to(trainer.device))[:, :, 0]
            return long_self_rollout(
                StreamingSampler(model, self.sampler_config), conds, [cps] * d.rollout_shots, (h, w),
                seeds if rows is None else [seeds[i] for i in rows.tolist()], starts, wk,
                exits=exits, grad=grad, backward_noise_init=d.backward_noise_init, stats=self.rollout_stats,
            )  # fmt: skip

        with lora.use_role(model, lora.GENERATOR), trainer.autocast(), torch.set_grad_enabled(grad):
            xs = self.by_condition(self.conditioned(trainer, b), run)
        return [
            Window(x, s * fpc, *shots[s // cps], i) for i, (x, s) in enumerate(zip(xs, starts, strict=True))
        ]

    def rollout(self, trainer, model, batch: dict, step: int, grad: bool) -> torch.Tensor | list[Window]:
        """Generator output x0 [B, C, F, H, W]; graph only through the exit step when `grad`.
        A long rollout (`long_plan`) gives its supervised windows instead."""
        plan = self.long_plan(batch["latents"].shape[2])
        if plan is not None:
            return self.long_rollout(trainer, model, batch, step, grad, plan)
        x_data = batch["latents"].to(trainer.device)
        text, mask = self.text(trainer, batch)
        exit_step = self.exit_steps(step, x_data.shape[2] // self.fpc)
        cond_B = self.conditioned(trainer, x_data.shape[0])
        with lora.use_role(model, lora.GENERATOR), trainer.autocast(), torch.set_grad_enabled(grad):
            if self.cfg.rollout == "teacher_forcing":
                return self.tf_rollout(trainer, model, x_data, text, mask, exit_step, cond_B)
            return self.self_forcing_rollout(trainer, model, x_data, text, mask, exit_step, grad, cond_B)

    def tf_rollout(
        self, trainer, model, x_data, text, mask, exit_step: list[int], cond_B: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cheap option: every chunk noised to its exit step's sigma, clean data as history.
        A conditioned sample's frame 0 stays clean (sigma 0) and is output as it is."""
        gens = self.generators(trainer, x_data, salt=1)
        noise = torch.stack([torch.randn(x_data.shape[1:], generator=g) for g in gens]).to(x_data.device)
        sigma_BK = torch.tensor([[self.sigmas[k] for k in exit_step]]).expand(x_data.shape[0], -1)
        sigma_BF = frames_sigma(sigma_BK, self.fpc).to(x_data.device)
        pinned = cond_B is not None and bool(cond_B.any())
        if pinned:
            sigma_BF = condition_first_frame(sigma_BF, cond_B)
        v = tf_velocity(model, x_data, noise, sigma_BF, text, self.rule("teacher_forcing"), mask)
        x0 = noise_latents(x_data, noise, sigma_BF) - sigma_BF[:, None, :, None, None] * v.float()
        if pinned:  # the conditioning frame's output is the image, bit-exactly
            first = (
                cond_B.to(x0.device)[:, None, None, None, None]
                & (torch.arange(x0.shape[2]) == 0).to(x0.device)[None, None, :, None, None]
            )
            x0 = torch.where(first, x_data.to(x0.dtype), x0)
        return x0

    def self_forcing_rollout(
        self, trainer, model, x_data, text, mask, exit_step: list[int], grad: bool,
        cond_B: torch.Tensor | None = None,
    ):  # fmt: skip
        """The sampler's chunk loop; a conditioned sample's frame 0 pinned to its clean latent
        frame 0 (`Conditioning.image_latent`)."""
        b, _, f, h, w = x_data.shape
        seeds = self.sample_seeds(trainer, b, salt=0)

        def run(rows, image: bool):
            pick = _rows(rows)
            cond = self.sampler_config.condition(pick(text), pick(mask))
            if image:
                cond.image_latent = pick(x_data)[:, :, 0]
            out = StreamingSampler(model, self.sampler_config).generate_latents(
                cond,
                f // self.fpc,
                (h, w),
                seeds if rows is None else [seeds[i] for i in rows.tolist()],
                grad_exit=exit_step if grad else None,
            )
            return out.latents_BCFHW

        return self.by_condition(torch.zeros(b, dtype=torch.bool) if cond_B is None else cond_B, run)

    def text(self, trainer, batch: dict):
        """Caption context and mask as `model.text_padding` says: the teacher's and critic's scores
        and both rollouts (the sampler's Conditioning) see the same context."""
        return self.caption_context(batch, trainer.device)

    def sample_seeds(self, trainer, batch_size: int, salt: int) -> list[int]:
        """One seed per sample from (seed, step, the sample's index in the global batch, salt):
        a step draws the same numbers however its batch is split over data-parallel ranks."""
        first = trainer.strategy.dp_rank * batch_size
        return rng.sample_seeds(self.recipe.seed, trainer.step, first, batch_size, salt)

    def generators(self, trainer, x: torch.Tensor, salt: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in self.sample_seeds(trainer, x.shape[0], salt)]

    def score_noise(self, trainer, x: torch.Tensor, salt: int, window: int = 0):
        """Per-chunk shifted sigmas clamped to [min, max] timestep, and the noise (per sample);
        window i > 0 of a long rollout: the sample's seed extended by i."""
        d, k = self.cfg, x.shape[2] // self.fpc
        sigmas, noise = [], []
        if window:
            seeds = self.sample_seeds(trainer, x.shape[0], salt)
            gens = [torch.Generator().manual_seed(rng.keyed_seed(s, (window, 1009))) for s in seeds]
        else:
            gens = self.generators(trainer, x, salt)
        for g in gens:
            sigmas.append(
                sample_chunk_sigmas(
                    1, k, shift=d.timestep_shift, min_t=d.min_timestep, max_t=d.max_timestep, generator=g
                )
            )
            noise.append(torch.randn(x.shape[1:], generator=g))
        sigma_BK = torch.cat(sigmas)  # [B, K]
        return frames_sigma(sigma_BK, self.fpc).to(x.device), torch.stack(noise).to(x.device)

    def score_inputs(self, trainer, x, salt: int, window: Window | None):
        """(sigma_BF, noise, kept frames) of a scored clip: `score_noise`'s draws, and for I2V
        the conditioning frame at sigma 0 and left out of the loss (keep None: no sample is)."""
        sigma_BF, noise = self.score_noise(
            trainer, x, salt=salt, window=0 if window is None else window.index
        )
        cond_B = self.scored_conditioned(trainer, x.shape[0], window)
        keep = loss_frames(cond_B, x.shape[2])
        if keep is not None:  # I2V: frame 0 clean at timestep 0, no loss on it
            sigma_BF = condition_first_frame(sigma_BF, cond_B)
        return sigma_BF, noise, keep

    def clip_text(self, trainer, batch: dict, window: Window | None):
        """(text, mask, frame offset) of a scored clip: the batch's, or a long rollout window's."""
        if window is None:
            return (*self.text(trainer, batch), 0)
        return window.text, window.mask, window.frame_offset

    @torch.no_grad()
    def scores(self, trainer, model, x, batch, sigma_BF, noise, window: Window | None = None):
        """x0 predictions of the teacher (CFG) and of the critic for x noised at sigma_BF (a long
        rollout's window: its shot's caption, its frame positions). An I2V conditioning frame
        comes with sigma 0 (`flow.condition_first_frame`): clean, at timestep 0, its x0 the frame itself."""
        text, mask, off = self.clip_text(trainer, batch, window)
        rule = self.rule("teacher_forcing")
        with trainer.autocast():
            with lora.use_role(model, lora.TEACHER):
                v_c = tf_velocity(model, x, noise, sigma_BF, text, rule, mask, off).float()
                v_u = tf_velocity(model, x, noise, sigma_BF, torch.zeros_like(text), rule, None, off).float()
            with lora.use_role(model, lora.CRITIC):
                v_fake = tf_velocity(model, x, noise, sigma_BF, text, rule, mask, off).float()
        v_real = v_u + self.cfg.guidance_scale * (v_c - v_u)
        x_t = noise_latents(x, noise, sigma_BF)
        s = sigma_BF[:, None, :, None, None]
        return x_t - s * v_real, x_t - s * v_fake

    def generator_loss(
        self, trainer, model, x, batch, window: Window | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The DMD loss of the rollout (a long rollout: the mean over its windows)."""
        if isinstance(x, list):
            parts = [self.generator_loss(trainer, model, win.x_BCFHW, batch, win) for win in x]
            logs = {"dmd_grad_abs": sum(p[1]["dmd_grad_abs"] for p in parts) / len(parts)}
            return sum(p[0] for p in parts) / len(parts), logs
        sigma_BF, noise, keep = self.score_inputs(trainer, x, 2, window)
        real_x0, fake_x0 = self.scores(trainer, model, x.detach().float(), batch, sigma_BF, noise, window)
        g = dmd_gradient(x.detach().float(), real_x0, fake_x0, self.fpc, keep)
        grad_abs = g.abs().mean() if keep is None else masked_mean(g.abs(), keep)
        return dmd_loss(x, g, keep), {"dmd_grad_abs": float(grad_abs)}

    def critic_loss(self, trainer, model, x, batch, window: Window | None = None) -> torch.Tensor:
        """Flow matching of the critic on generator outputs (velocity target ε − x0); a long
        rollout: the mean over its windows, each a clip at its own frame positions."""
        if isinstance(x, list):
            return sum(self.critic_loss(trainer, model, win.x_BCFHW, batch, win) for win in x) / len(x)
        x = x.detach().float()
        sigma_BF, noise, keep = self.score_inputs(trainer, x, 3, window)
        text, mask, off = self.clip_text(trainer, batch, window)
        with lora.use_role(model, lora.CRITIC), trainer.autocast():
            v = tf_velocity(model, x, noise, sigma_BF, text, self.rule("teacher_forcing"), mask, off)
        if keep is None:
            return F.mse_loss(v.float(), noise - x)
        return masked_mean((v.float() - (noise - x)).pow(2), keep)

    def update(self, trainer, role: str, loss: torch.Tensor) -> float:
        """Backward, data-parallel gradient average, clip and step of one role's param group."""
        s = trainer.strategy
        s.backward(loss, trainer.model)
        if s.dp_size > 1:  # the roles ran on the unwrapped module: DDP needs its average by hand
            s.sync_grads(trainer.model)
        return trainer.optimizer_step(bool(torch.isfinite(loss.detach())), role=role)

    # ---- the step ------------------------------------------------------------------------------
    def train_step(self, trainer: StepContext, step: int) -> dict[str, float]:
        model = trainer.strategy.unwrap(trainer.model)
        batch = trainer.next_batch()
        logs: dict[str, float] = {}
        x = None
        if self.is_generator_step(step):
            x = self.rollout(trainer, model, batch, step, grad=True)
            loss_g, extra = self.generator_loss(trainer, model, x, batch)
            logs.update(extra, generator_loss=float(loss_g.detach()))
            logs["generator_grad_norm"] = self.update(trainer, "generator", loss_g)
            self.updates["generator"] += 1
            self.update_ema(model)
        if x is None:
            x = self.rollout(trainer, model, batch, step, grad=False)
        loss_c = self.critic_loss(trainer, model, x, batch)
        if isinstance(x, list):
            logs["window_start_frame"] = float(x[0].frame_offset)
        if self.recipe.data.task != "t2v":
            logs["i2v_fraction"] = float(self.conditioned(trainer, batch["latents"].shape[0]).float().mean())
        logs["critic_grad_norm"] = self.update(trainer, "critic", loss_c)
        self.updates["critic"] += 1
        trainer.scheduler_step()
        logs.update(loss=float(loss_c.detach()), critic_loss=float(loss_c.detach()))
        logs.update({f"{k}_updates": float(v) for k, v in self.updates.items()})
        return logs

    def update_ema(self, model) -> None:
        if self.ema is not None:
            self.ema.update(lora.adapter_params(model, lora.GENERATOR))

    def on_checkpoint(self, trainer: StepContext, step: int) -> None:
        """RUN/lora/ with every checkpoint (and so at the end of training)."""
        self.export(trainer, trainer.strategy.unwrap(trainer.model))

    def export(self, trainer, model) -> None:
        """RUN/lora/: the generator LoRA (EMA weights when EMA is on), peft format, atomically."""
        if trainer.strategy.is_main:
            export_lora(
                model, trainer.run_dir / "lora", weights=None if self.ema is None else self.ema.shadow,
                teacher=str(self.teacher_path),
                extra={"denoising_steps": list(self.cfg.denoising_steps), "timestep_shift": self.cfg.timestep_shift,
                       "frames_per_chunk": self.fpc, "quant": self.recipe.quantized,
                       "text_padding": self.recipe.model.text_padding, "text_len": self.recipe.model.text_len},
            )  # fmt: skip
        trainer.strategy.barrier()

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.shadow, "updates": dict(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("ema")
        if shadow is None:
            self.ema = None
        elif self.ema is not None:  # built by prepare_model (method.dmd.ema_decay > 0)
            self.ema.load_shadow(shadow)
        self.updates = dict(state["updates"])


def _rows(rows: torch.Tensor | None):
    """Select `rows` of a batch-first tensor (None: all of it; a None tensor stays None)."""

    def pick(t):
        return t if rows is None or t is None else t[rows.to(t.device)]

    return pick
