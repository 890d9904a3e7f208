"""The recipe schema: typed dataclasses, strict YAML loading, `key=value` overrides.

Defaults live here and nowhere else: the constants below are the values several sections and
the sampler (`vidtrain.sample.SamplerConfig`) share, the dataclasses the rest. Unknown keys fail
with the close valid names; wrong types fail with the dotted path of the field; every check
across fields is in `validate` (run by `load_recipe`).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vidtrain.utils.io import read_yaml


class ConfigError(ValueError):
    """A recipe that cannot be used; the message says what to fix."""


# ---- values that several sections and the sampler share (each one lives here only) -----------
NUM_TRAIN_TIMESTEPS = 1000  # timesteps live on 0..1000, sigma = t / 1000 (the model embeds t)
FRAMES_PER_CHUNK = 3  # latent frames per chunk: training's chunking and the sampler's
TIMESTEP_SHIFT = 5.0  # Wan/SD3 shift: of training's timestep draws and of the few-step schedule
DENOISING_STEPS = (1000.0, 750.0, 500.0, 250.0)  # few-step schedule before the shift (DMD, sampler)
# linears kept in high precision by NVFP4 QAT (fnmatch on module names): embeddings, the time
# embedding and projection, the output head
QAT_EXCLUDE = ("patch_embedding", "text_embedding.*", "time_embedding.*", "time_projection.*", "head.*")
# `vidtrain sample` / `vidtrain eval` of a run that trained without a window still sample with
# one (constant memory in video length; `--window-frames none` asks for all history): the last
# 12 latent frames (4 chunks) plus a 3-frame global sink and the shot sink
SAMPLE_WINDOW_FRAMES = 12
SAMPLE_SINK_FRAMES = 3
# how caption embeddings enter cross-attention (training, encode, sampler and DMD alike):
#   wan     Wan2.1's convention (its own code and diffusers' pipeline): zero-padded (or truncated)
#           to exactly TEXT_LEN tokens, no mask, so the pads attend as text_embedding(0)
#   masked  padded to the batch's longest caption (at most TEXT_LEN) with a mask hiding the pads
TEXT_PADDINGS = ("wan", "masked")
TEXT_PADDING = "wan"
TEXT_LEN = 512  # umT5 tokens per caption: Wan2.1's fixed context (and the longest caption kept)


@dataclass
class RunConfig:
    dir: str = "runs/debug"  # the run folder: checkpoints, metrics.jsonl, plots
    name: str = "debug"
    resume: bool = True  # continue from the newest checkpoint in run.dir if there is one


@dataclass
class ModelConfig:
    flavor: str = "debug"  # debug | 1.3B | 14B (Wan2.1) | wan2.2-debug | 5B (Wan2.2-TI2V-5B)
    checkpoint: str | None = None  # Wan2.1 / diffusers / vidtrain folder to start from
    in_channels: int | None = None  # override the flavor's latent channels (must match the VAE)
    text_dim: int | None = None  # override the flavor's text embedding size
    frames_per_chunk: int = FRAMES_PER_CHUNK
    attn_backend: Literal["auto", "sdpa", "flash", "flex"] = "auto"
    activation_checkpointing: bool = False
    # attention restriction mirroring the sampler's KV cache (None = all history); `vidtrain
    # sample` of the run's checkpoints takes these (vidtrain/sample/settings.py)
    window_frames: int | None = None
    sink_frames: int = 0
    shot_sink: bool = False
    # caption context: wan (fixed text_len tokens, zero pad, no mask; right for Wan bases) or
    # masked (pad to the longest caption, pads masked); see TEXT_PADDINGS. `vidtrain sample` of
    # the run's checkpoints takes both
    text_padding: Literal["wan", "masked"] = TEXT_PADDING
    text_len: int = TEXT_LEN  # tokens of the text context (longer captions are truncated)


@dataclass
class DataConfig:
    source: Literal["synthetic", "shards", "videos"] = "synthetic"
    # shards: folder of latent shards (source=shards) or video shards (source=videos, encoded
    # on the fly: each sequence-parallel rank encodes only its own frames, with a halo)
    shards: str | None = None
    vae: str = "debug"  # source=videos: VAE flavor or weights path
    vae_halo: int | None = None  # source=videos: latent frames of left context (None: exact receptive field)
    text_encoder: str | None = (
        None  # source=videos: local umT5 folder (None: tiny random encoder, tests only)
    )
    batch_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 64
    # integrity: each shard's sha256 is checked against manifest.json the first time it is opened
    verify_shards: bool = True
    # a corrupt shard, a truncated tar or non-finite latents: stop with an error naming the shard
    # (error) or skip it, counted and logged (skip)
    on_bad_sample: Literal["error", "skip"] = "error"
    # synthetic latents (quickstart and tests)
    synthetic_samples: int = 16
    frames: int = 6  # latent frames
    height: int = 8  # latent height
    width: int = 8  # latent width
    text_len: int = 8  # real tokens of each synthetic caption (padded as model.text_padding says)
    # t2v; i2v: every sample's first latent frame (the encoded first pixel frame) held clean as
    # the image (`flow.condition_first_frame`); mixed: a keyed draw per sample, i2v_fraction of them
    task: Literal["t2v", "i2v", "mixed"] = "t2v"
    i2v_fraction: float = 0.5  # task=mixed: share of samples conditioned on their first frame


@dataclass
class ForcingConfig:
    timestep_shift: float = TIMESTEP_SHIFT
    min_timestep: float = 0.0
    max_timestep: float = float(NUM_TRAIN_TIMESTEPS)


@dataclass
class DMDConfig:
    teacher: str | None = None  # teacher checkpoint (defaults to model.checkpoint)
    guidance_scale: float = 3.0
    generator_update_every: int = 5  # generator step every k-th critic step
    denoising_steps: list[float] = field(default_factory=lambda: list(DENOISING_STEPS))
    min_timestep: float = 20.0
    max_timestep: float = 980.0
    timestep_shift: float = TIMESTEP_SHIFT
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "ffn.0", "ffn.2"])
    generator_lr: float = 2e-6
    critic_lr: float = 4e-7
    generator_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    critic_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    ema_decay: float = 0.99  # the generator LoRA's EMA (exported); 0 disables
    rollout: Literal["self_forcing", "teacher_forcing"] = "self_forcing"
    negative_prompt_zero: bool = True  # unconditional branch uses a zero text context
    # long self-rollout tuning (LongLive 1, Self-Forcing++; vidtrain/distill/rollout.py): the
    # generator rolls out `rollout_frames` latent frames through the sampler's chunk loop and
    # rolling KV cache, and DMD (scores, generator and critic losses) sees `windows` windows of
    # `window_frames` frames drawn from it; graph only inside the windows, nothing generated after
    # the last one. None: the clip length (rollout_frames = window_frames = clip: today's rollouts).
    rollout_frames: int | None = None
    window_frames: int | None = None
    windows: int = 1  # non-overlapping windows per rollout (each inside one shot)
    # Self-Forcing++'s backward noise initialisation: each window's first chunk restarts from the
    # rollout's own latents of that chunk re-noised to its exit step's sigma (rollout.py)
    backward_noise_init: bool = False
    # prompt switches inside a rollout: equal shots with the sampler's shot sink re-pinned at each
    # cut; shot s of sample b is captioned by the batch's sample b ("same") or (b + s) mod B ("batch")
    rollout_shots: int = 1
    shot_captions: Literal["same", "batch"] = "same"


@dataclass
class ErrorRecyclingConfig:
    """Error recycling in teacher forcing (Stable-Video-Infinity, LongLive 2.0): a bank of the
    model's own per-frame prediction errors, bucketed by timestep and refreshed from every step,
    of which a sampled error is added to the clean history (and optionally the noisy input) so
    that training sees the imperfect history inference produces (vidtrain/forcing/error_bank.py)."""

    enabled: bool = False
    # timestep buckets over [0, NUM_TRAIN_TIMESTEPS) and entries per bucket (ring replacement);
    # one entry is one latent frame's error [C, H, W] in `dtype`, kept on the CPU of every rank:
    # at most buckets x bank_size x C x H x W elements (LongLive 2.0: 50 x 500)
    buckets: int = 50
    bank_size: int = 500
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    # per sample: the chance that its clean history gets an error (one bucket drawn for the sample
    # among the filled ones, one entry per frame), and the factor on the error
    probability: float = 0.5
    scale: float = 1.0
    # per sample: the chance that its noisy input gets an error too (per frame, from the bucket
    # of the frame's own timestep); targets stay those of the clean latents
    noisy_probability: float = 0.0
    # what a frame's error is: x0 (x0_pred - x0 = -sigma * (v_pred - v_target)) or velocity
    # (v_pred - v_target)
    error: Literal["x0", "velocity"] = "x0"
    # no injection before this many optimizer steps (the bank fills from step 0 on)
    warmup_steps: int = 0


@dataclass
class MethodConfig:
    name: str = "teacher_forcing"  # teacher_forcing | qat | dmd
    forcing: ForcingConfig = field(default_factory=ForcingConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    error_recycling: ErrorRecyclingConfig = field(default_factory=ErrorRecyclingConfig)


@dataclass
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    zero_stage: int = 2  # deepspeed
    sp_size: int = 1  # > 1 turns on sequence parallelism
    sp_impl: Literal["ulysses", "ring"] = "ulysses"
    layout: Literal["naive", "balanced"] = "balanced"
    timeout_s: float = 300.0  # collective timeout


@dataclass
class QuantConfig:
    """NVFP4 or FP8: what the run's model trains as (read through `Recipe.quantized`)."""

    # the model trains as NVFP4 fake-quant (W4A4 linears, see `exclude`): implied by
    # method.name=qat (QAT is training that model); with dmd, a high-precision teacher's base is
    # converted (a QAT teacher's base is NVFP4 anyway); refused with teacher_forcing
    enabled: bool = False
    # nvfp4 (W4A4, Blackwell's FP4 tensor cores; memory only on Hopper) | fp8 (torchao's float8
    # training recipes: Hopper / Ada FP8 tensor cores; vidtrain/quant/fp8.py)
    format: Literal["nvfp4", "fp8"] = "nvfp4"
    # fp8 only, torchao's Float8LinearRecipeName: tensorwise (one scale per tensor, dY in e5m2) |
    # rowwise (per-row scales along each GEMM's reduction dim, powers of two, all e4m3)
    fp8_recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    # where the arithmetic runs: emulate (torch, any device) | triton (NVFP4, CUDA) | te (NVFP4,
    # Transformer Engine, Blackwell) | torchao (FP8: torchao's Float8Linear, torch._scaled_mm);
    # vidtrain/quant/convert.py maps it to the implementations
    backend: Literal["emulate", "triton", "te", "torchao"] = "emulate"
    # linears kept in high precision (fnmatch on qualified names); null: the model family's
    # declared `_quant_exclude` (Wan's is this default)
    exclude: list[str] | None = field(default_factory=lambda: list(QAT_EXCLUDE))
    # history K/V as the KV cache of the format stores them (nvfp4; fp8: e4m3, a per-head scale
    # per chunk block): fake-quantized in QAT's teacher forcing, that cache in DMD's rollouts and
    # the sampler's default for the run's checkpoints
    kv_fake_quant: bool = True
    # the KV cache format the history is fake-quantized as (and the run's checkpoints sample
    # with): null = the weights' format (nvfp4 / fp8); kv2 = the 2-bit cache (vidtrain/formats/kv2.py)
    kv_format: Literal["nvfp4", "fp8", "kv2"] | None = None
    # NVFP4 history K/V block scales, as the sampler's cache will write them (`vidtrain sample
    # --kv-scale-rule`, resolved from the run): amax (the E4M3 scale from the block's amax) | mse
    # (per 16 elements the E4M3 scale of least squared error among 8 candidates; same bytes)
    kv_scale_rule: Literal["amax", "mse"] = "amax"
    stochastic_rounding: bool = False
    hadamard: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    # the cosine decay horizon in optimizer steps; None: train.max_steps of the run's first start,
    # kept in the checkpoint, so extending max_steps on resume never re-stretches the schedule
    # (past the horizon the rate stays at min_lr_ratio)
    decay_steps: int | None = None
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 100
    grad_accum: int = 1
    log_every: int = 1
    ckpt_every: int = 50  # and at max_steps; methods export with it (Method.on_checkpoint)
    keep_checkpoints: int = 2
    ema_decay: float | None = 0.999  # None (or 0) disables EMA
    mixed_precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU only
    progress: bool = True
    # deterministic kernels (bit-exact resume); None: on for CPU runs, off on GPU (speed)
    deterministic: bool | None = None
    # a non-finite loss or gradient norm: stop (exit non-zero, naming step and batch) or skip
    # that optimizer step (as DeepSpeed does on overflow), stopping after max_nonfinite_skips in a row
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 3
    # resume checks each checkpoint's manifest: sizes always, sha256 too when true
    verify_checkpoints: bool = True
    # exact: model + optimizer + schedule + RNG + data; weights_only: the model alone (asked for
    # explicitly, never a silent fallback)
    resume: Literal["exact", "weights_only"] = "exact"
    # a resumed run whose recipe changed in what cannot be honoured exactly: refuse, or allow
    resume_changes: Literal["refuse", "allow"] = "refuse"


@dataclass
class LogConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "vidtrain"
    plots: bool = True


@dataclass
class Recipe:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def quantized(self) -> bool:
        """The recipe trains an NVFP4 fake-quant model: `quant.enabled`, implied by method qat
        (a DMD teacher whose checkpoint carries quant.json is distilled on its NVFP4 base too)."""
        return self.method.name == "qat" or self.quant.enabled


# ---- strict conversion ----------------------------------------------------------------------


def _close(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section), got {type(value).__name__}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, options))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ConfigError(
                f"unknown key {full!r}: {_close(str(key), names)}valid keys here: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value ({e})") from None
    return key.strip().split("."), value


def _set_path(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k!r} is not a section")
    d[keys[-1]] = value


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (or defaults if `path` is None), apply `key=value` overrides, check it."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = read_yaml(p, "recipe")
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides or []:
        keys, value = _parse_override(item)
        _set_path(data, keys, value)
    recipe = _build(Recipe, data)
    validate(recipe)
    return recipe


# flavors of the Wan2.2 TI2V family (48 latent channels), the ones trained for image-to-video
I2V_FLAVORS = ("wan2.2-debug", "5B")
I2V_CHANNELS = 48


def _validate_task(r: Recipe) -> None:
    d = r.data
    if not 0.0 <= d.i2v_fraction <= 1.0:
        raise ConfigError(f"data.i2v_fraction must be in [0, 1], got {d.i2v_fraction}")
    if d.task == "t2v":
        return
    if r.model.flavor not in I2V_FLAVORS or (r.model.in_channels or I2V_CHANNELS) != I2V_CHANNELS:
        raise ConfigError(
            f"data.task={d.task} needs an image-to-video flavor (the Wan2.2 TI2V family, "
            f"{I2V_CHANNELS} latent channels: {', '.join(I2V_FLAVORS)}); model.flavor={r.model.flavor} is text-to-video only"
        )
    if not r.method.forcing.min_timestep > 0:
        raise ConfigError(
            f"data.task={d.task} needs method.forcing.min_timestep > 0 (a noisy token at t=0 is a "
            f"conditioning frame), got {r.method.forcing.min_timestep}"
        )


def validate(r: Recipe) -> None:
    """Cross-field checks that types alone cannot express."""
    _validate_task(r)
    if r.train.max_steps < 0:
        raise ConfigError(f"train.max_steps must be >= 0, got {r.train.max_steps}")
    if r.train.grad_accum < 1:
        raise ConfigError(f"train.grad_accum must be >= 1, got {r.train.grad_accum}")
    for key in ("log_every", "ckpt_every", "max_nonfinite_skips"):
        if getattr(r.train, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(r.train, key)}")
    if r.train.keep_checkpoints < 0:
        raise ConfigError(
            f"train.keep_checkpoints must be >= 0 (0 keeps all), got {r.train.keep_checkpoints}"
        )
    if r.optim.decay_steps is not None and r.optim.decay_steps < 1:
        raise ConfigError(f"optim.decay_steps must be >= 1 (or null), got {r.optim.decay_steps}")
    if r.model.frames_per_chunk < 1:
        raise ConfigError(f"model.frames_per_chunk must be >= 1, got {r.model.frames_per_chunk}")
    check_text_padding(r.model.text_padding, r.model.text_len, "model.")
    if r.data.source == "synthetic" and r.data.frames % r.model.frames_per_chunk:
        raise ConfigError(
            f"data.frames ({r.data.frames}) must be a multiple of model.frames_per_chunk ({r.model.frames_per_chunk})"
        )
    piece = r.parallel.sp_size * r.model.frames_per_chunk
    if r.data.source == "synthetic" and r.data.frames % piece:
        raise ConfigError(
            f"data.frames ({r.data.frames}) must be a multiple of parallel.sp_size x model.frames_per_chunk "
            f"({r.parallel.sp_size} x {r.model.frames_per_chunk} = {piece}) for the sequence-parallel layouts"
        )
    if r.quant.enabled and r.method.name == "teacher_forcing":
        raise ConfigError("quant.enabled=true needs method.name=qat (NVFP4 QAT is the qat method)")
    if r.quant.kv_scale_rule != "amax" and (r.quant.kv_format or r.quant.format) != "nvfp4":
        raise ConfigError(
            f"quant.kv_scale_rule={r.quant.kv_scale_rule} is an NVFP4 KV block-scale rule; the "
            f"KV format {r.quant.kv_format or r.quant.format} has no block scales (use amax)"
        )
    if r.data.source in ("shards", "videos") and not r.data.shards:
        raise ConfigError(
            f"data.source={r.data.source} needs data.shards (a folder of {r.data.source[:-1] if r.data.source == 'videos' else 'latent'} shards)"
        )
    if r.parallel.sp_size < 1:
        raise ConfigError(f"parallel.sp_size must be >= 1, got {r.parallel.sp_size}")
    if r.method.dmd.generator_update_every < 1:
        raise ConfigError(
            f"method.dmd.generator_update_every must be >= 1, got {r.method.dmd.generator_update_every}"
        )
    if len(r.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have 2 numbers, got {r.optim.betas}")
    _validate_schedules(r)
    if r.train.ema_decay is not None and not 0 <= r.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 or null: off), got {r.train.ema_decay}")
    if not 0 <= r.method.dmd.ema_decay < 1:
        raise ConfigError(f"method.dmd.ema_decay must be in [0, 1) (0: off), got {r.method.dmd.ema_decay}")
    if r.method.name == "dmd":
        _validate_dmd(r)
    _validate_error_recycling(r)


def check_timesteps(timesteps: Sequence[float], name: str = "timesteps") -> None:
    """A few-step schedule: strictly decreasing timesteps in (0, NUM_TRAIN_TIMESTEPS]."""
    ts = list(timesteps)
    if not ts or any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in ts):
        raise ConfigError(f"{name} must be in (0, {NUM_TRAIN_TIMESTEPS}], got {ts}")
    if any(a <= b for a, b in itertools.pairwise(ts)):
        raise ConfigError(f"{name} must be strictly decreasing, got {ts}")


def check_text_padding(padding: str, length: int, prefix: str = "") -> None:
    """A known text padding (TEXT_PADDINGS) and a text length >= 1."""
    if padding not in TEXT_PADDINGS:
        raise ConfigError(
            f"{prefix}text_padding {padding!r} is not one of {', '.join(map(repr, TEXT_PADDINGS))} "
            "(wan: fixed length, zero pad, no mask, as Wan2.1; masked: pads masked)"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"{prefix}text_len must be an integer >= 1, got {length!r}")


def check_shift(shift: float, name: str = "shift") -> None:
    if not 0 < shift < math.inf:  # NaN passes `shift > 0` and samples a black video
        raise ConfigError(f"{name} must be a finite number > 0, got {shift:g}")


def _validate_schedules(r: Recipe) -> None:
    """Timestep ranges, shifts and DMD's few-step schedule."""
    for name, sec in (("method.forcing", r.method.forcing), ("method.dmd", r.method.dmd)):
        if not 0 <= sec.min_timestep < sec.max_timestep <= NUM_TRAIN_TIMESTEPS:
            raise ConfigError(
                f"{name} needs 0 <= min_timestep < max_timestep <= {NUM_TRAIN_TIMESTEPS}, "
                f"got {sec.min_timestep}, {sec.max_timestep}"
            )
        check_shift(sec.timestep_shift, f"{name}.timestep_shift")
    check_timesteps(r.method.dmd.denoising_steps, "method.dmd.denoising_steps")


def _validate_error_recycling(r: Recipe) -> None:
    """method.error_recycling: sizes, probabilities, and a method that teacher-forces."""
    e, name = r.method.error_recycling, "method.error_recycling"
    for key in ("buckets", "bank_size"):
        if getattr(e, key) < 1:
            raise ConfigError(f"{name}.{key} must be >= 1, got {getattr(e, key)}")
    if e.buckets > NUM_TRAIN_TIMESTEPS:
        raise ConfigError(
            f"{name}.buckets must be <= {NUM_TRAIN_TIMESTEPS} (one timestep per bucket at most), got {e.buckets}"
        )
    for key in ("probability", "noisy_probability"):
        if not 0.0 <= getattr(e, key) <= 1.0:
            raise ConfigError(f"{name}.{key} must be in [0, 1], got {getattr(e, key)}")
    if not (math.isfinite(e.scale) and e.scale >= 0):
        raise ConfigError(f"{name}.scale must be a finite number >= 0, got {e.scale}")
    if e.warmup_steps < 0:
        raise ConfigError(f"{name}.warmup_steps must be >= 0, got {e.warmup_steps}")
    if e.enabled and r.method.name not in ("teacher_forcing", "qat"):
        raise ConfigError(
            f"{name}.enabled=true needs a teacher-forcing method (teacher_forcing or qat), got method.name={r.method.name}"
        )


def _validate_dmd(r: Recipe) -> None:
    """What the dmd method supports (the teacher's files are checked when the method starts)."""
    d, m, p = r.method.dmd, r.model, r.parallel
    if r.train.grad_accum != 1:
        raise ConfigError("method dmd runs one rollout per step: set train.grad_accum=1")
    if p.strategy not in ("none", "ddp", "deepspeed") or p.sp_size != 1:
        raise ConfigError(
            f"method dmd supports parallel.strategy none, ddp or deepspeed without sequence "
            f"parallelism, got {p.strategy} with sp_size={p.sp_size}"
        )
    if p.strategy == "deepspeed" and p.zero_stage == 3:
        raise ConfigError(
            "method dmd runs its roles on the unwrapped module, which ZeRO-3 leaves partitioned: "
            "use parallel.zero_stage 0, 1 or 2 (the trainable LoRA weights are small)"
        )
    if not d.negative_prompt_zero:
        raise ConfigError(
            "method.dmd.negative_prompt_zero=false needs negative prompt embeddings, not supported yet"
        )
    if d.teacher and m.checkpoint and Path(d.teacher) != Path(m.checkpoint):
        raise ConfigError(
            f"one base serves all DMD roles: method.dmd.teacher={d.teacher} and model.checkpoint="
            f"{m.checkpoint} differ; set only one"
        )
    _validate_dmd_long(r)


def _validate_dmd_long(r: Recipe) -> None:
    """method.dmd's long self-rollout keys: whole chunks, window(s) inside the rollout and its shots.
    The clip length is checked here for synthetic data (data.frames) and by the method otherwise."""
    d, fpc, name = r.method.dmd, r.model.frames_per_chunk, "method.dmd"
    clip = r.data.frames if r.data.source == "synthetic" else None
    for key in ("rollout_frames", "window_frames"):
        v = getattr(d, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < fpc or v % fpc):
            raise ConfigError(
                f"{name}.{key} must be null (the clip length) or a positive multiple of "
                f"model.frames_per_chunk ({fpc}), got {v!r}"
            )
    for key in ("windows", "rollout_shots"):
        v = getattr(d, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name}.{key} must be an integer >= 1, got {v!r}")
    long = (d.rollout_frames, d.window_frames) != (None, None) or d.windows > 1 or d.rollout_shots > 1
    if (long or d.backward_noise_init) and d.rollout != "self_forcing":
        raise ConfigError(
            f"{name}.rollout_frames / window_frames / windows / rollout_shots / backward_noise_init "
            f"need {name}.rollout=self_forcing (a long rollout is the sampler's chunk loop), got {d.rollout}"
        )
    if d.rollout_frames is not None and r.model.window_frames is None:
        raise ConfigError(
            f"{name}.rollout_frames={d.rollout_frames} needs model.window_frames (and usually "
            "model.sink_frames): a long self-rollout runs the sampler's rolling KV cache, which "
            "without a window keeps all history and grows with the rollout; e.g. model.window_frames=12"
        )
    if clip is not None:
        check_dmd_long_lengths(d, fpc, clip)


def check_dmd_long_lengths(d: DMDConfig, fpc: int, clip: int) -> tuple[int, int]:
    """(rollout frames, window frames) for a clip of `clip` latent frames, or a ConfigError:
    rollout >= windows x window, and each shot (rollout / rollout_shots, whole chunks) holds a window."""
    name = "method.dmd"
    rollout = clip if d.rollout_frames is None else d.rollout_frames
    window = clip if d.window_frames is None else d.window_frames
    if rollout < d.windows * window:
        raise ConfigError(
            f"{name}.rollout_frames ({rollout}{' = the clip' if d.rollout_frames is None else ''}) must be "
            f">= {name}.windows x window_frames ({d.windows} x {window}"
            f"{' = the clip' if d.window_frames is None else ''})"
        )
    chunks = rollout // fpc
    if chunks % d.rollout_shots:
        raise ConfigError(
            f"{name}.rollout_shots ({d.rollout_shots}) must divide the rollout's {chunks} chunks "
            f"(rollout_frames {rollout} / model.frames_per_chunk {fpc})"
        )
    per_shot, wk = chunks // d.rollout_shots, window // fpc
    if per_shot < wk or d.rollout_shots * (per_shot // wk) < d.windows:
        raise ConfigError(
            f"{name}: {d.windows} window(s) of {wk} chunk(s) must each lie inside one shot of "
            f"{per_shot} chunk(s) ({d.rollout_shots} shot(s) over {chunks} chunks)"
        )
    return rollout, window


def dump_recipe(r: Recipe) -> str:
    return yaml.safe_dump(r.to_dict(), sort_keys=False)
