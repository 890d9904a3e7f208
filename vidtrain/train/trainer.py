"""The one training loop. Methods (teacher forcing, QAT, DMD) plug in through `Method`."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from vidtrain.config import Recipe, dump_recipe
from vidtrain.models.wan import CausalWanDiT
from vidtrain.parallel import make_strategy
from vidtrain.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vidtrain.train.ema import EMA
from vidtrain.train.logging import MetricsLogger, plot_loss
from vidtrain.train.methods import make_method
from vidtrain.utils.io import atomic_write_text


def build_model(recipe: Recipe) -> CausalWanDiT:
    m = recipe.model
    if m.checkpoint:
        model = CausalWanDiT.from_pretrained(m.checkpoint, m.attn_backend)
    else:
        overrides = {
            k: v for k, v in (("in_channels", m.in_channels), ("text_dim", m.text_dim)) if v is not None
        }
        if "in_channels" in overrides:
            overrides["out_channels"] = overrides["in_channels"]
        model = CausalWanDiT.from_flavor(m.flavor, m.attn_backend, **overrides)
    model.gradient_checkpointing = m.activation_checkpointing
    return model


def lr_lambda(recipe: Recipe):
    o, total = recipe.optim, max(1, recipe.train.max_steps)

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class Trainer:
    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        torch.manual_seed(recipe.seed)
        self.strategy = make_strategy(recipe)
        self.strategy.setup()
        self.device = self.strategy.device
        det = recipe.train.deterministic
        if det if det is not None else self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.run_dir = Path(recipe.run.dir)
        if self.strategy.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.strategy.barrier()
        self.method = make_method(recipe)
        plain = build_model(recipe)
        self.model_config = plain.cfg
        plain = self.method.prepare_model(plain, self)
        self.model, self.optimizer = self.strategy.wrap(
            plain, lambda params: self.method.make_optimizer(self, params)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(recipe))
        ema_decay = recipe.train.ema_decay
        self.ema = EMA(self.strategy.full_params(self.model), ema_decay) if ema_decay else None
        self.loader = self.make_loader()
        self._batches = None
        self.step = 0
        self.logger = MetricsLogger(self.run_dir, recipe, enabled=self.strategy.is_main)
        if self.strategy.is_main:  # only once everything was built: a failed start overwrites nothing
            atomic_write_text(self.run_dir / "recipe.yaml", dump_recipe(recipe))

    # ---- construction --------------------------------------------------------------------------
    def default_optimizer(self, params: list) -> torch.optim.Optimizer:
        """AdamW from `optim` over `params`; methods may build their own (Method.make_optimizer)."""
        o = self.recipe.optim
        return torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )

    def make_loader(self):
        from vidtrain.data import LatentLoader, LatentShardDataset, SyntheticLatentDataset

        d, s = self.recipe.data, self.strategy
        if d.source == "videos":  # latents VAE-encoded per rank on demand (vidtrain/data/videos.py)
            from vidtrain.data.videos import make_video_loader

            return make_video_loader(
                self.recipe, s, self.model_config.in_channels, self.model_config.text_dim
            )
        if d.source == "synthetic":
            ds = SyntheticLatentDataset(
                d.synthetic_samples, self.model_config.in_channels, d.frames, d.height, d.width,
                d.text_len, self.model_config.text_dim, seed=self.recipe.seed, rank=s.dp_rank, world_size=s.dp_size,
            )  # fmt: skip
        else:
            ds = LatentShardDataset(
                d.shards,
                shuffle_buffer=d.shuffle_buffer,
                seed=self.recipe.seed,
                rank=s.dp_rank,
                world_size=s.dp_size,
            )
        return LatentLoader(ds, d.batch_size, d.num_workers)

    # ---- helpers used by methods ---------------------------------------------------------------
    def next_batch(self) -> dict:
        if self._batches is None:
            self._batches = iter(self.loader)
        batch = next(self._batches)
        x = batch["latents"]
        if x.ndim != 5 or x.shape[1] != self.model_config.in_channels:
            raise ValueError(
                f"latent batch {list(x.shape)} does not fit the model: expected [B, {self.model_config.in_channels}, F, H, W]"
            )
        return batch

    def step_generator(self, micro: int = 0, salt: int = 0) -> torch.Generator:
        """Noise RNG of this step: a function of (seed, step, micro-batch, data-parallel rank).

        The same on every rank of a sequence-parallel group (lockstep) and across a resume.
        """
        key = ((self.recipe.seed * 1_000_003 + self.step) * 131 + micro) * 1009 + self.strategy.dp_rank
        return torch.Generator().manual_seed(key * 7 + salt)

    def autocast(self):
        mp = self.recipe.train.mixed_precision
        if mp == "bf16" or (mp == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def data_state(self) -> dict:
        return self.loader.state_dict()

    def load_data_state(self, state: dict) -> None:
        # the checkpoint holds rank 0's position; data-parallel ranks take batches in lockstep, so
        # every rank resumes at the same count of its own stream
        self.loader.load_state_dict({**state, "rank": self.strategy.dp_rank})
        self._batches = None

    # ---- the loop ------------------------------------------------------------------------------
    def resume(self) -> None:
        if not self.recipe.run.resume:
            return
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        self.step = load_checkpoint(self, ckpt)
        self.logger.truncate_after(self.step)
        if self.strategy.is_main:
            print(f"[vidtrain] resumed from {ckpt} at step {self.step}")

    def fit(self) -> dict:
        self.resume()
        t = self.recipe.train
        bar = None
        if self.strategy.is_main and t.progress and self.step < t.max_steps:
            from tqdm import tqdm

            bar = tqdm(
                total=t.max_steps,
                initial=self.step,
                desc=f"train[{self.recipe.method.name}]",
                dynamic_ncols=True,
            )
        last: dict = {}
        while self.step < t.max_steps:
            start = time.perf_counter()
            self.model.train()
            logs = self.method.train_step(self, self.step)
            if self.ema:
                self.ema.update(self.strategy.full_params(self.model))
            self.step += 1
            logs.update(self.step_figures(time.perf_counter() - start))
            logs.update(self.strategy.step_report(logs["step_time_s"], logs))
            last = logs
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.logger.log({"step": self.step, **logs})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{logs.get('loss', float('nan')):.4f}", sps=f"{logs['samples_per_s']:.2f}"
                )
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                save_checkpoint(self, self.step)
        if bar is not None:
            bar.close()
        self.finish()
        return last

    def step_figures(self, seconds: float) -> dict[str, float]:
        d = self.recipe.data
        samples = d.batch_size * self.recipe.train.grad_accum * self.strategy.dp_size
        return {
            "lr": self.scheduler.get_last_lr()[0],
            "step_time_s": seconds,
            "samples_per_s": samples / seconds,
        }

    def finish(self) -> None:
        if self.strategy.is_main and self.recipe.log.plots:
            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        self.logger.close()
        self.strategy.barrier()


def train(recipe: Recipe) -> Trainer:
    trainer = Trainer(recipe)
    try:
        trainer.fit()
    finally:
        trainer.strategy.teardown()
    return trainer
