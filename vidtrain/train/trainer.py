"""The one training loop. Methods (teacher forcing, QAT, DMD) plug in through `Method`, and see
the trainer as a `StepContext` (vidtrain/train/context.py)."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import yaml

from vidtrain.config import ConfigError, Recipe, dump_recipe
from vidtrain.data import LatentLoader, LatentShardDataset, SyntheticLatentDataset
from vidtrain.data.latents import latent_collate
from vidtrain.data.videos import make_video_loader
from vidtrain.errors import CheckpointError, NonFiniteError
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.config import flavor
from vidtrain.parallel import BalanceLog, make_strategy, parallelize
from vidtrain.train.checkpoint import (
    clean_stale,
    find_resumable,
    load_checkpoint,
    save_checkpoint,
    step_folders,
)
from vidtrain.train.context import RoleOptimizer
from vidtrain.train.ema import EMA
from vidtrain.train.logging import MetricsLogger, StepCallback, plot_loss
from vidtrain.train.methods import make_method
from vidtrain.train.resume_policy import check_resume
from vidtrain.train.run_lock import RunLock, RunLockError
from vidtrain.utils import rng
from vidtrain.utils.io import atomic_write_text
from vidtrain.utils.progress import StepProgress


def build_model(recipe: Recipe) -> CausalWanDiT:
    m = recipe.model
    if m.checkpoint:
        model = CausalWanDiT.from_pretrained(m.checkpoint, m.attn_backend)
        ref = flavor(m.flavor)
        shape = ("dim", "num_heads", "num_layers", "ffn_dim")
        diff = [f"{k} {getattr(model.cfg, k)} (flavor: {getattr(ref, k)})" for k in shape
                if getattr(model.cfg, k) != getattr(ref, k)]  # fmt: skip
        if diff:
            raise ValueError(
                f"model.checkpoint={m.checkpoint} does not match model.flavor={m.flavor!r}: {', '.join(diff)}; "
                "set model.flavor to the checkpoint's size"
            )
    else:
        overrides = {
            k: v for k, v in (("in_channels", m.in_channels), ("text_dim", m.text_dim)) if v is not None
        }
        if "in_channels" in overrides:
            overrides["out_channels"] = overrides["in_channels"]
        model = CausalWanDiT.from_flavor(m.flavor, m.attn_backend, **overrides)
    return model  # activation checkpointing is applied by parallelize


class LRSchedule:
    """Linear warmup, then cosine decay to `min_lr_ratio` over `decay_steps` (or constant).

    An object, not a closure: LambdaLR stores its attributes in the checkpoint, so the decay
    horizon fixed at a run's first start (`optim.decay_steps`, else that start's
    `train.max_steps`) survives a resume that extends `train.max_steps`: the rate never jumps,
    and past the horizon it stays at `min_lr_ratio`.
    """

    def __init__(self, recipe: Recipe) -> None:
        o = recipe.optim
        self.schedule, self.warmup_steps, self.min_lr_ratio = o.schedule, o.warmup_steps, o.min_lr_ratio
        self.decay_steps = max(1, o.decay_steps if o.decay_steps is not None else recipe.train.max_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
        self.lock: RunLock | None = None
        self._created_run_dir = False
        self.last_checkpoint: Path | None = None  # the newest intact checkpoint of this run
        self.nonfinite = {"in_a_row": 0, "skipped": 0}  # optimizer steps skipped as non-finite
        self.last_keys: list[str] = []  # sample keys of the latest batch (named in errors)
        try:
            self._resume_from = self._claim_run_folder()
            self._build()
            self._check_resume_policy()
            if self.strategy.is_main:  # only once everything was built: a failed start changes nothing
                self._write_start_recipe()
        except BaseException:
            self._abandon()
            raise

    def _build(self) -> None:
        recipe = self.recipe
        self.method = make_method(recipe)
        plain = build_model(recipe)
        self.model_config = plain.cfg
        plain = self.method.prepare_model(plain, self)
        s = self.strategy  # SP -> activation checkpointing -> compile -> the strategy's data parallel
        self.model, self.optimizer = parallelize(
            plain, s.mesh, recipe, s.data_parallel, lambda params: self.method.make_optimizer(self, params)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRSchedule(recipe))
        ema_decay = recipe.train.ema_decay
        self.ema = EMA(self.strategy.full_params(self.model), ema_decay) if ema_decay else None
        self.loader = self.make_loader()
        self._batches = None
        self.step = 0
        self.logger = MetricsLogger(self.run_dir, recipe, enabled=self.strategy.is_main)
        # logging callbacks: per-rank balance figures on a launcher's world
        self.callbacks: list[StepCallback] = [BalanceLog(recipe, s.mesh)] if s.mesh.distributed else []

    # ---- the run folder ------------------------------------------------------------------------
    def _claim_run_folder(self) -> Path | None:
        """Rank 0 takes the run lock, cleans killed writes, picks the checkpoint to resume from
        and checks the recipe against it; every rank learns the outcome (or the error)."""
        s, error, choice, notes = self.strategy, None, None, []
        if s.is_main:
            try:
                choice, notes = self._claim_on_main()
            except (ValueError, OSError) as e:
                error = e
        msg, choice, notes = s.all_gather_object(
            (None if error is None else str(error), None if choice is None else str(choice), notes)
        )[0]
        if msg is not None:
            if error is not None:
                raise error
            raise CheckpointError(msg)
        if s.is_main:
            for line in notes:
                print(f"[vidtrain] {line}")
        return None if choice is None else Path(choice)

    def _claim_on_main(self) -> tuple[Path | None, list[str]]:
        t = self.recipe.train
        if not self.run_dir.exists():
            try:
                self.run_dir.mkdir(parents=True)
            except OSError as e:
                raise RunLockError(f"cannot create run folder {self.run_dir}: {e.strerror or e}") from None
            self._created_run_dir = True
        self.lock = RunLock(self.run_dir).acquire()
        notes = [self.lock.took_over] if self.lock.took_over else []
        notes += [f"removed {n} (a checkpoint write that was killed)" for n in clean_stale(self.run_dir)]
        if not self.recipe.run.resume:
            return None, notes
        needs_engine = self.strategy.checkpoint.resume_needs_engine and t.resume == "exact"
        choice, skipped = find_resumable(self.run_dir, t.verify_checkpoints, needs_engine)
        notes += skipped
        if choice is None:
            if step_folders(self.run_dir):
                raise CheckpointError(
                    f"no intact checkpoint to resume in {self.run_dir / 'checkpoints'} ({'; '.join(skipped)}); "
                    "nothing was changed: move the damaged folders away, or set run.resume=false to start over"
                )
            return None, notes
        return choice, notes

    def _check_resume_policy(self) -> None:
        """The recipe against the one that wrote the checkpoint to resume (after the model was
        built, so a checkpoint that does not fit is reported as such first)."""
        s, error, notes = self.strategy, None, []
        stored = None if self._resume_from is None else self._resume_from / "recipe.yaml"
        if s.is_main and stored is not None and stored.exists():
            try:
                old = yaml.safe_load(stored.read_text())
                notes = check_resume(old, self.recipe.to_dict(), str(self._resume_from))
            except (ValueError, OSError, yaml.YAMLError) as e:
                error = e
        msg, notes = s.all_gather_object((None if error is None else str(error), notes))[0]
        if msg is not None:
            if error is not None:
                raise error
            raise ConfigError(msg)
        if s.is_main:
            for line in notes:
                print(f"[vidtrain] {line}")

    def _write_start_recipe(self) -> None:
        """`recipe.yaml` is the recipe of the run's first start (the one that began at step 0);
        every start is kept as `recipes/start_N.yaml`, nothing is overwritten silently."""
        text = dump_recipe(self.recipe)
        starts = self.run_dir / "recipes"
        n = 1 + sum(1 for _ in starts.glob("start_*.yaml")) if starts.is_dir() else 1
        atomic_write_text(starts / f"start_{n}.yaml", text)
        if self._resume_from is None or not (self.run_dir / "recipe.yaml").exists():
            atomic_write_text(self.run_dir / "recipe.yaml", text)

    def _abandon(self) -> None:
        """A failed start leaves the run folder as it was: lock released, a folder made by it removed."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self._created_run_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if empty: never removes what another process wrote

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- construction --------------------------------------------------------------------------
    def default_optimizer(self, params: list) -> torch.optim.Optimizer:
        """AdamW from `optim` over `params`; methods may build their own (Method.make_optimizer)."""
        o = self.recipe.optim
        return torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )

    def make_loader(self):

        d, s = self.recipe.data, self.strategy
        if d.source == "videos":  # latents VAE-encoded per rank on demand (vidtrain/data/videos.py)
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
                verify=d.verify_shards,
                on_bad_sample=d.on_bad_sample,
            )
        # captions padded as model.text_padding says (wan: text_len tokens, no mask)
        return LatentLoader(ds, d.batch_size, d.num_workers, collate_fn=latent_collate(self.recipe.model))

    # ---- helpers used by methods ---------------------------------------------------------------
    def next_batch(self) -> dict:
        if self._batches is None:
            self._batches = iter(self.loader)
        batch = next(self._batches)
        self.last_keys = list(batch.get("keys", []))
        x = batch["latents"]
        if x.ndim != 5 or x.shape[1] != self.model_config.in_channels:
            raise ValueError(
                f"latent batch {list(x.shape)} does not fit the model: expected [B, {self.model_config.in_channels}, F, H, W]"
            )
        for cb in self.callbacks:
            cb.on_batch(batch)
        return batch

    def step_generator(self, micro: int = 0, salt: int = 0) -> torch.Generator:
        """Noise RNG of this step: a function of (seed, step, micro-batch, data-parallel rank).

        The same on every rank of a sequence-parallel group (lockstep) and across a resume.
        """
        return rng.step_generator(self.recipe.seed, self.step, micro, self.strategy.dp_rank, salt)

    def optimizer_step(self, finite: bool = True, role: str | None = None) -> float:
        """Clip and step through the strategy (a step that is not finite on every rank is skipped
        on all); `role` steps only that role's parameter group (a RoleOptimizer's). Gradient norm."""
        opt = self.optimizer
        if role is not None and not isinstance(opt, RoleOptimizer):
            raise TypeError(f"optimizer {type(opt).__name__} has no roles (active_role); asked for {role!r}")
        if role is not None:
            opt.active_role = role
        try:
            return self.strategy.clip_and_step(self.model, opt, self.recipe.optim.grad_clip, finite=finite)
        finally:
            if role is not None:
                opt.active_role = None

    def scheduler_step(self) -> None:
        self.scheduler.step()

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
        ckpt = self._resume_from
        if ckpt is None:
            return
        weights_only = self.recipe.train.resume == "weights_only"
        self.step = load_checkpoint(self, ckpt, weights_only=weights_only)
        self.last_checkpoint = ckpt
        self._resume_from = None
        self.logger.truncate_after(self.step)
        if self.strategy.is_main:
            how = " (weights only: fresh optimizer state, train.resume=weights_only)" if weights_only else ""
            print(f"[vidtrain] resumed from {ckpt} at step {self.step}{how}")

    def check_finite(self, logs: dict) -> bool:
        """After a step: a step the strategy skipped as non-finite stops the run (train.on_nonfinite
        stop) or is counted (skip) until max_nonfinite_skips in a row."""
        t, nf = self.recipe.train, self.nonfinite
        if not self.strategy.pop_skipped():
            nf["in_a_row"] = 0
            return False
        nf["in_a_row"] += 1
        nf["skipped"] += 1
        figures = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if "loss" in k or "grad_norm" in k)
        what = (
            f"non-finite loss or gradient at step {self.step + 1} ({figures}; batch {', '.join(self.last_keys) or '?'}): "
            "the optimizer step was not applied"
        )
        intact = (
            f"newest intact checkpoint: {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint yet"
        )
        if t.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}; stopping (train.on_nonfinite=stop); {intact}")
        if nf["in_a_row"] >= t.max_nonfinite_skips:
            raise NonFiniteError(
                f"{what}; {nf['in_a_row']} steps in a row were non-finite (train.max_nonfinite_skips="
                f"{t.max_nonfinite_skips}): stopping; {intact}"
            )
        if self.strategy.is_main:
            print(f"[vidtrain] warning: {what}; skipped ({nf['in_a_row']} in a row, {nf['skipped']} in all)")
        return True

    def fit(self) -> dict:
        self.resume()
        t = self.recipe.train
        progress = StepProgress(
            t.max_steps, self.step, f"train[{self.recipe.method.name}]", self.strategy.is_main and t.progress
        )
        last: dict = {}
        while self.step < t.max_steps:
            start = time.perf_counter()
            self.model.train()
            logs = self.method.train_step(self, self.step)
            skipped = self.check_finite(logs)
            logs["nonfinite_skips"] = float(self.nonfinite["skipped"])
            if self.ema and not skipped:
                self.ema.update(self.strategy.full_params(self.model))
            self.step += 1
            logs.update(self.step_figures(time.perf_counter() - start))
            for cb in self.callbacks:  # every rank (a callback may gather over ranks)
                logs.update(cb.on_step(logs))
            last = logs
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.logger.log({"step": self.step, **logs})
            progress.update(logs)
            if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                self.method.on_checkpoint(self, self.step)
                save_checkpoint(self, self.step)
        progress.close()
        self.finish()
        return last

    def step_figures(self, seconds: float) -> dict[str, float]:
        d = self.recipe.data
        samples = d.batch_size * self.recipe.train.grad_accum * self.strategy.dp_size
        return {
            "lr": self.scheduler.get_last_lr()[0],
            "step_time_s": seconds,
            "samples_per_s": samples / seconds,
            "data_skipped": float(self.loader.skipped),  # bad samples skipped (data.on_bad_sample=skip)
        }

    def finish(self) -> None:
        if self.strategy.is_main and self.recipe.log.plots:
            plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        for cb in self.callbacks:
            cb.on_finish()
        self.logger.close()
        self.strategy.barrier()


def train(recipe: Recipe) -> Trainer:
    trainer = Trainer(recipe)
    try:
        trainer.fit()
    finally:
        trainer.close()
        trainer.strategy.teardown()
    return trainer
