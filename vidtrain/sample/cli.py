"""`vidtrain sample`: stream a multi-shot video from a checkpoint into an mp4 + metrics + timeline.

    vidtrain sample --checkpoint runs/debug --shots recipes/shots_example.yaml --out video.mp4 \\
        --kv-cache nvfp4 --decode async --window-frames 6 --sink-frames 3 --height 64 --width 64

Writes video.mp4 (libx264, yuv420p), video.metrics.json and video.timeline.png, each into a
temporary file beside it, renamed over the old one only when complete: a failed or killed run
leaves the previous outputs as they were. Every input is checked (checkpoint, shots file, output
path, sizes, VAE / text encoder against the model) before any generation starts, and numbers
are bounded by what the model represents: at most `ROPE_POSITIONS` positions on each RoPE axis
(the length of Wan2.1's RoPE tables; a diffusers config's `rope_max_seq_len` when it gives one),
and a memory estimate (weights + KV cache + one chunk's activations + VAE decode) under
`--max-memory-gib` (default: the device's memory).

Image-to-video (`--image first.png`, a Wan2.2 TI2V base: the image, encoded as one pixel frame,
is latent frame 0, held clean) and continuation (`--video prefix.mp4`: its first 1 + 4k pixel
frames encoded, whole chunks kept as clean history of shot 0; `--include-prefix` writes them
too, as the VAE decodes them).

Multi-GPU (`--nproc N`): the checks above run first, then N ranks start through the launcher
(`vidtrain-launch sample`, torchrun): Ulysses sequence parallelism over the attention heads with
the KV cache sharded by heads (vidtrain/sample/parallel_sample.py); rank 0 decodes (async, on
`--decode-device` when given) and alone writes the outputs. `--decode-device` (e.g. cuda:1, cpu)
puts the VAE on another device than the DiT, one process or many.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from vidtrain.config import NUM_TRAIN_TIMESTEPS, TEXT_LEN, check_shift
from vidtrain.lora.files import load_lora
from vidtrain.models.vae import ALL_VAE_FLAVORS, CausalVideoVAE, VAEConfig
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.config import WanConfig
from vidtrain.models.wan.state_dict import (
    config_from_diffusers,
    config_from_wan,
    detect_layout,
    resolve_model_folder,
)
from vidtrain.parallel.mesh import build_mesh
from vidtrain.quant.qat import apply_quant_record, ptq_fp8
from vidtrain.sample.decode import DECODE_MODES, VideoWriter, plot_timeline, stream_video, write_metrics
from vidtrain.sample.kv_cache import KV_SCALE_RULES
from vidtrain.sample.parallel_sample import UlyssesSampler, check_ranks, generate_only
from vidtrain.sample.sampler import Conditioning, SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.sample.shots import Shot, load_shots


def load_model(checkpoint: str | Path, lora_dir: str | None):
    """The model a checkpoint was trained as: NVFP4 fake-quant linears when it carries a
    quant.json (QAT), and the DMD LoRA on top when given (checked against its recorded base)."""
    folder = resolve_model_folder(checkpoint)
    model = CausalWanDiT.from_pretrained(folder)
    quantized = apply_quant_record(model, folder)
    if lora_dir:
        model = load_lora(model, lora_dir)
        # merging would fold the LoRA into weights that are then re-quantized: keep it apart
        model = model if quantized else model.merge_and_unload()
    return model


def load_vae(spec: str, z_dim: int, device, dtype):
    """'debug' / 'wan2.1' / 'wan2.2-debug' / 'wan2.2': random-initialised VAE of that size
    (seeded; for tests and timing); anything else: a path to Wan2.1 or Wan2.2 VAE weights."""
    if spec in ALL_VAE_FLAVORS:
        print(
            f"[vidtrain] warning: --vae {spec} is a randomly initialised VAE of that size (seeded): "
            "the video shows the pipeline, not content; give --vae PATH (Wan2.1 / Wan2.2 VAE weights)"
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            vae = CausalVideoVAE.from_flavor(spec)
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(
                f"VAE weights not found: {spec} (or use one of {sorted(ALL_VAE_FLAVORS)})"
            )
        vae = CausalVideoVAE.from_pretrained(spec)
    if vae.z_dim != z_dim:
        raise ValueError(f"VAE latent channels {vae.z_dim} != model in_channels {z_dim}")
    return vae.to(device, dtype).eval()


def shot_conditionings(
    prompts: list[list[str]], text_encoder, text_dim: int, cfg: SamplerConfig | None = None
) -> list[Conditioning]:
    """prompts[shot][sample] -> one Conditioning per shot, padded as the run trained
    (`cfg.text_padding` / `text_len`; `SamplerConfig.condition`)."""
    cfg = cfg or SamplerConfig()
    if text_encoder is None:
        return [cfg.condition(debug_text_context(p, text_dim).context_BST) for p in prompts]
    return [cfg.condition(*text_encoder.encode(p)) for p in prompts]


def load_text_encoder(path: str | None, text_dim: int, device, max_length: int = TEXT_LEN):
    """The umT5 encoder of `--text-encoder` (tokens up to `max_length`: the run's text_len)."""
    if path is None:
        print(
            "[vidtrain] warning: no --text-encoder: each prompt gets a fixed random context (a debug "
            "stand-in: the prompts do not steer the video); give --text-encoder PATH (umT5)"
        )
        return None
    # lazy: transformers (umT5) only when a text encoder is given
    from vidtrain.models.text import TextEncoder

    enc = TextEncoder.from_pretrained(path, max_length=max_length, device=device)
    if enc.dim != text_dim:
        raise ValueError(f"text encoder width {enc.dim} != model text_dim {text_dim}")
    return enc


ROPE_POSITIONS = 1024  # per axis: Wan2.1's rope_params(1024, ...), diffusers' rope_max_seq_len
MAX_STEPS = NUM_TRAIN_TIMESTEPS  # denoising steps: at most one per timestep of the schedule
MAX_FPS = 1000.0
PATCH = 2  # spatial patch of the DiT (WanConfig.patch_size (1, 2, 2))
SPATIAL = 8  # the Wan2.1 VAE's spatial compression (a run's own comes from its VAE)
I2V_CHANNELS = 48  # latent channels of the Wan2.2 TI2V family (flavors 5B, wan2.2-debug): I2V bases
ASPECT_TOLERANCE = 0.01  # --image / --video: resized when the aspect ratio matches within 1%


def parse_steps(s: str) -> tuple[float, ...]:
    try:
        steps = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"--steps must be comma-separated numbers, got {s!r}") from e
    if not steps:
        raise ValueError(f"--steps needs at least one timestep, got {s!r}")
    if len(steps) > MAX_STEPS:
        raise ValueError(f"--steps takes at most {MAX_STEPS} timesteps, got {len(steps)}")
    return steps


def check_sampler_numbers(args) -> None:
    """Finite, in-range sampler flags (`add_sampler_args`; one line each), shared by `vidtrain
    sample` and `vidtrain eval`; `sampler_overrides` and SamplerConfig check the rest (steps,
    shift, window)."""
    if args.frames_per_chunk is not None and args.frames_per_chunk < 1:
        raise ValueError(f"--frames-per-chunk must be >= 1, got {args.frames_per_chunk}")
    if args.sink_frames is not None and args.sink_frames < 0:
        raise ValueError(f"--sink-frames must be >= 0, got {args.sink_frames}")
    if args.shot_rope_offset is not None and args.shot_rope_offset < 0:
        raise ValueError(f"--shot-rope-offset must be >= 0, got {args.shot_rope_offset}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.max_memory_gib is not None and not 0 < args.max_memory_gib < math.inf:
        raise ValueError(f"--max-memory-gib must be a finite number > 0, got {args.max_memory_gib:g}")


def check_numbers(args) -> None:
    """`vidtrain sample`'s numeric flags: the sampler's and --fps."""
    if not 0 < args.fps <= MAX_FPS:
        raise ValueError(f"--fps must be a finite number in (0, {MAX_FPS:g}], got {args.fps:g}")
    check_sampler_numbers(args)


def check_output(out: Path) -> None:
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"cannot write {out}")


_DEFAULTS = SamplerConfig()
# CLI dest -> SamplerConfig field; every one defaults to None: unset, so SamplerConfig.from_run
# takes it from the LoRA record, the run or SamplerConfig's default (vidtrain/sample/settings.py)
FLAGS = {"steps": "timesteps", "shift": "shift", "update": "update", "frames_per_chunk": "frames_per_chunk",
         "window_frames": "window_frames", "sink_frames": "sink_frames", "shot_sink": "shot_sink",
         "kv_cache": "kv_cache", "kv_scale_rule": "kv_scale_rule", "shot_rope_offset": "shot_rope_offset",
         "recache_on_cut": "recache_on_cut", "compile": "compile"}  # fmt: skip
NO_WINDOW = "none"


def _window(s: str):
    if s.strip().lower() in (NO_WINDOW, "all"):
        return NO_WINDOW
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window-frames takes an integer or 'none', got {s!r}") from None


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """Sampler flags (`FLAGS`), all None unless given: those the training decides (steps, shift,
    chunking, window, sinks, KV format) come from the LoRA record, then the run, then
    SamplerConfig (`SamplerConfig.from_run`)."""
    d = _DEFAULTS
    steps = ",".join(f"{t:g}" for t in d.timesteps)
    p.add_argument(
        "--kv-cache",
        default=None,
        choices=["bf16", "fp16", "fp32", "nvfp4", "fp8", "kv2"],
        help="KV cache format; fp8: e4m3 with a per-head scale per chunk block; kv2: 2-bit "
        "(k-means centroids + a Lloyd-Max residual, 0.14x bf16 at Wan's shapes) (default: as trained: "
        f"nvfp4 / fp8 for an NVFP4 / FP8 (QAT) run, else {d.kv_cache})",
    )
    p.add_argument(
        "--kv-scale-rule",
        default=None,
        choices=list(KV_SCALE_RULES),
        help="NVFP4 KV cache block scales: amax (E4M3 scale from the block's amax) or mse (per 16 "
        "elements the E4M3 scale of least squared error among 8 candidates; same bytes, slower "
        f"write; as LongLive 2.0's mse option) (default: as trained, else {d.kv_scale_rule})",
    )
    p.add_argument(
        "--steps",
        default=None,
        help=f"denoising timesteps before the shift (default: as trained, else {steps})",
    )
    p.add_argument(
        "--shift", type=float, default=None, help=f"timestep shift (default: as trained, else {d.shift:g})"
    )
    p.add_argument("--update", default=None, choices=["x0", "euler"], help=f"(default: {d.update})")
    p.add_argument(
        "--frames-per-chunk", type=int, default=None, help=f"(default: as trained, else {d.frames_per_chunk})"
    )
    p.add_argument(
        "--window-frames",
        type=_window,
        default=None,
        help="rolling window W in latent frames, or 'none' for all history (default: as trained)",
    )
    p.add_argument(
        "--sink-frames",
        type=int,
        default=None,
        help="global sink G: first latent frames (default: as trained)",
    )
    p.add_argument(
        "--shot-sink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pin each shot's first chunk (default: as trained, else on when windowed)",
    )
    p.add_argument(
        "--shot-rope-offset",
        type=int,
        default=None,
        help=f"temporal RoPE offset per shot (default: {d.shot_rope_offset})",
    )
    p.add_argument(
        "--recache-on-cut", action="store_true", default=None, help="LongLive: re-cache K/V at each cut"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the model's forward (CUDA graphs on CUDA; on CPU it needs a C++ compiler); "
        "with a window the KV history is padded to one length per chunk shape",
    )
    p.add_argument("--height", type=int, default=480, help="pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=832, help="pixels (multiple of 16)")
    p.add_argument("--seed", type=int, default=0)  # fmt: skip


def sampler_overrides(args) -> dict:
    """The sampler flags given on the command line, as SamplerConfig fields (None: not given;
    `--window-frames none` is given: no window)."""
    out = {}
    for dest, name in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "steps":
            value = parse_steps(value)
        elif dest == "shift":
            value = float(value)
            check_shift(value, "--shift")
        elif dest == "window_frames" and value == NO_WINDOW:
            value = None
        out[name] = value
    return out


def fill_sampler_args(args, checkpoint: str | Path | None, lora: str | None = None, log: bool = True):
    """A copy of `args` that carries the resolved SamplerConfig (`sampler_config` returns it):
    flag > LoRA record > the checkpoint's run > SamplerConfig default (`SamplerConfig.from_run`).
    Prints each setting and where it came from."""
    cfg = SamplerConfig.from_run(
        checkpoint, lora, sampler_overrides(args), log=print if log else None, bounded=True
    )
    return argparse.Namespace(**{**vars(args), "resolved_sampler_config": cfg})


def sampler_config(args) -> SamplerConfig:
    """SamplerConfig of parsed flags: the one `fill_sampler_args` resolved, else the flags over
    SamplerConfig's defaults."""
    cfg = getattr(args, "resolved_sampler_config", None)
    return cfg if cfg is not None else SamplerConfig.from_run(None, None, sampler_overrides(args))


def latent_size(height: int, width: int, spatial: int = SPATIAL, rope_positions: int = ROPE_POSITIONS):
    """(h, w) latent size of a pixel size: positive multiples of 16 whose patch rows and columns
    fit the RoPE positions."""
    if height % (PATCH * spatial) or width % (PATCH * spatial) or height <= 0 or width <= 0:
        raise ValueError(
            f"--height/--width must be positive multiples of {PATCH * spatial}, got {height}x{width}"
        )
    for name, px in (("--height", height), ("--width", width)):
        patches = px // (PATCH * spatial)
        if patches > rope_positions:
            raise ValueError(
                f"{name} {px} is {patches} patches: more than the {rope_positions} RoPE positions the "
                f"model represents per axis (at most {rope_positions * PATCH * spatial} px)"
            )
    return height // spatial, width // spatial


def model_config(checkpoint: str | Path):
    """(WanConfig, RoPE positions per axis) of a checkpoint, read without its weights."""
    layout, raw = detect_layout(resolve_model_folder(checkpoint))
    if layout == "vidtrain":
        return WanConfig.from_dict(raw), ROPE_POSITIONS
    if layout == "diffusers":
        return config_from_diffusers(raw), int(raw.get("rope_max_seq_len") or ROPE_POSITIONS)
    return config_from_wan(raw), ROPE_POSITIONS


def check_positions(shots: list[Shot], cfg: SamplerConfig, rope_positions: int) -> int:
    """The last temporal RoPE position the video reaches; refused past the model's positions."""
    chunks = sum(s.chunks for s in shots)
    last = chunks * cfg.frames_per_chunk - 1 + (len(shots) - 1) * cfg.shot_rope_offset
    if last >= rope_positions:
        raise ValueError(
            f"{chunks} chunk(s) of {cfg.frames_per_chunk} latent frames over {len(shots)} shot(s) "
            f"(--shot-rope-offset {cfg.shot_rope_offset}): temporal RoPE positions reach {last}, the model "
            f"represents {rope_positions} (0..{rope_positions - 1}); shorten the shots"
        )
    return last


# per element (NVFP4 with scales; FP8: the codes, plus 4 bytes per (batch, head) of a block)
KV_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "nvfp4": 0.5625, "fp8": 1.0}


def memory_estimate(
    wan,
    cfg: SamplerConfig,
    latent_hw,
    total_frames: int,
    vae_spec: str | None,
    dtype_bytes: int,
    batch: int = 1,
    spatial: int = SPATIAL,
):
    """Bytes by part: weights, KV cache, one chunk's activations (both for `batch` samples), VAE
    decode (of one sample; none without `vae_spec`). An estimate (attention score buffers,
    allocator slack and the CUDA context are not counted)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in CausalWanDiT(wan).parameters())
    c = cfg.frames_per_chunk
    tokens_per_frame = (latent_hw[0] // PATCH) * (latent_hw[1] // PATCH)
    if cfg.window_frames is None:
        kept = total_frames
    else:
        blocks = math.ceil(cfg.window_frames / c) + 1 + math.ceil(cfg.sink_frames / c) + int(cfg.shot_sink)
        kept = min(total_frames, c * blocks)
    per_token = 2 * wan.dim * wan.num_layers  # K and V of every layer
    # + the shot's cross-attention K/V (text_len tokens: the most a context holds)
    kv = per_token * (kept * tokens_per_frame * KV_BYTES[cfg.kv_cache] + cfg.text_len * dtype_bytes)
    lq = c * tokens_per_frame
    lk = lq + kept * tokens_per_frame
    # fp32 residual stream + q, k, v, out, FFN hidden in the compute dtype + the K/V handed to attention
    act = lq * (4 * wan.dim + (4 * wan.dim + wan.ffn_dim) * dtype_bytes) + 2 * lk * wan.dim * dtype_bytes
    parts = {"weights": params * dtype_bytes, "KV cache": batch * kv, "one chunk's activations": batch * act}
    if vae_spec is not None:
        vae = ALL_VAE_FLAVORS.get(vae_spec, VAEConfig())
        h, w = latent_hw[0] * spatial, latent_hw[1] * spatial
        # one latent frame (4 pixel frames) per decode pass at ~6 x base_dim values per pixel, plus
        # the chunk's decoded frames in fp32
        parts["VAE decode"] = 4 * h * w * (6 * vae.base_dim * dtype_bytes + 3 * 4 * c)
    return parts


def memory_limit(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), f"{device} memory"
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's memory"


def check_memory(parts: dict[str, float], limit_gib: float | None, device: torch.device) -> float:
    total = sum(parts.values())
    limit, what = (limit_gib * 2**30, "--max-memory-gib") if limit_gib else memory_limit(device)
    if total > limit:
        detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
        raise ValueError(
            f"this request needs an estimated {total / 2**30:.2f} GiB ({detail} GiB) but the limit is "
            f"{limit / 2**30:.2f} GiB ({what}; --max-memory-gib sets it): lower --height/--width, "
            "set --window-frames or use --kv-cache nvfp4"
        )
    return total


def fit_frames(frames_THWC, height: int, width: int, flag: str) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> pixels [1, 3, T, height, width] in [-1, 1], resized when the
    aspect ratio matches the sampling size's within 1%; refused in one line otherwise."""
    x = torch.as_tensor(frames_THWC)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"{flag}: expected RGB frames, got shape {list(x.shape)}")
    h, w = int(x.shape[1]), int(x.shape[2])
    if abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise ValueError(
            f"{flag} is {w}x{h} (aspect {w / h:.3f}), the sampling size --width/--height is {width}x{height} "
            f"(aspect {width / height:.3f}): aspect ratios differ by more than 1%; crop it or change the size"
        )
    x = x.permute(3, 0, 1, 2).float()  # [3, T, H, W]
    if (h, w) != (height, width):
        x = torch.nn.functional.interpolate(
            x.permute(1, 0, 2, 3), size=(height, width), mode="bilinear", antialias=True, align_corners=False
        ).permute(1, 0, 2, 3)
        x = x.round().clamp(0, 255)
    return (x / 127.5 - 1.0)[None]


def read_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """`--image`: one pixel frame [1, 3, 1, height, width] in [-1, 1] (PIL)."""
    # lazy: PIL only for --image
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as e:  # PIL raises its own types for a non-image
        raise ValueError(f"--image {path}: cannot read it as an image ({type(e).__name__})") from None
    return fit_frames(torch.from_numpy(np.asarray(rgb).copy())[None], height, width, "--image")


def video_frames(path: str | Path) -> int:
    """Frames of `--video` (decord), read before any compute."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--video not found: {path}")
    return len(_reader(path))


def _reader(path):
    import decord  # lazy: decord only for --video

    try:
        return decord.VideoReader(str(path), num_threads=1)
    except Exception as e:  # decord raises its own error types for a non-video
        raise ValueError(f"--video {path}: cannot decode it ({type(e).__name__})") from None


def prefix_chunks(frames: int, frames_per_chunk: int, temporal: int = 4) -> int:
    """Whole chunks of latent frames a `frames`-frame video encodes to (1 + temporal*(F-1) pixel
    frames per F latent frames); a video shorter than one chunk is refused in one line."""
    latent = 1 + (frames - 1) // temporal if frames > 0 else 0
    k = latent // frames_per_chunk
    if k < 1:
        need = 1 + temporal * (frames_per_chunk - 1)
        raise ValueError(
            f"--video has {frames} frame(s): shorter than one chunk ({frames_per_chunk} latent frames = "
            f"{need} pixel frames)"
        )
    return k


def read_prefix(path, chunks: int, frames_per_chunk: int, height: int, width: int, temporal: int = 4):
    """`--video`: its first 1 + temporal*(k*C - 1) pixel frames [1, 3, T, height, width] in [-1, 1]."""
    n = 1 + temporal * (chunks * frames_per_chunk - 1)
    frames = _reader(path).get_batch(list(range(n))).asnumpy()
    return fit_frames(frames, height, width, "--video")


def encode_frames(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [1, 3, T, H, W] -> the causal VAE's latents [1, C, F, h, w] (float32)."""
    p = next(vae.parameters())
    with torch.no_grad():
        return vae.encode(pixels.to(p.device, p.dtype)).float()


class PrefixSampler(StreamingSampler):
    """A StreamingSampler whose every stream continues `prefix_latents` (what `stream_video` calls)."""

    def __init__(self, model, config, prefix_latents: torch.Tensor | None) -> None:
        super().__init__(model, config)
        self.prefix_latents = prefix_latents

    def stream(self, *args, **kw):
        return super().stream(*args, prefix_latents=self.prefix_latents, **kw)


class SkipFrames:
    """A sink that drops the first `skip` pixel frames (the prefix's, without --include-prefix)."""

    def __init__(self, sink, skip: int) -> None:
        self.sink, self.skip = sink, skip

    def __call__(self, x_BCTHW: torch.Tensor) -> None:
        drop = min(self.skip, x_BCTHW.shape[2])
        self.skip -= drop
        if drop < x_BCTHW.shape[2]:
            self.sink(x_BCTHW[:, :, drop:])


def check_conditioning_args(args, wan) -> None:
    """--image / --video / --include-prefix against each other and the base (one line each)."""
    if args.image and args.video:
        raise ValueError("--image and --video exclude each other (a prefix video has its own first frame)")
    if args.include_prefix and not args.video:
        raise ValueError("--include-prefix needs --video")
    if args.image and wan.in_channels != I2V_CHANNELS:
        raise ValueError(
            f"--image needs an image-to-video base (the Wan2.2 TI2V family, {I2V_CHANNELS} latent channels: "
            f"5B, wan2.2-debug); this checkpoint is a text-to-video-only base ({wan.in_channels} latent channels)"
        )


def vae_spatial(spec: str, z_dim: int) -> int:
    """The VAE's spatial compression, checked against the DiT's latent channels, before compute."""
    if spec in ALL_VAE_FLAVORS:
        cfg = ALL_VAE_FLAVORS[spec]
        if cfg.z_dim != z_dim:
            raise ValueError(
                f"VAE {spec} has {cfg.z_dim} latent channels, the model's in_channels is {z_dim}"
            )
        return 2 ** (len(cfg.dim_mult) - 1) * cfg.patch_size
    return load_vae(spec, z_dim, "cpu", torch.float32).spatial_compression


def _tmp_beside(path: Path) -> Path:
    """A temp name in the same folder (same file system: the rename is atomic), same suffix (the
    writers pick the format from it), naming this host and process."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}{path.suffix}")


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temp files of earlier runs on this host whose process is gone (a killed run)."""
    pat = re.compile(rf"^\.{re.escape(out.stem)}\..*\.tmp-{re.escape(socket.gethostname())}-(\d+)\.[^.]+$")
    removed = []
    for p in out.parent.glob(f".{out.stem}.*.tmp-*"):
        m = pat.match(p.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="vidtrain sample",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--checkpoint", required=True, help="model folder, checkpoint step folder, or run folder")
    p.add_argument("--shots", required=True, help="shots YAML (see recipes/shots_example.yaml)")
    p.add_argument("--out", required=True, help="output .mp4 (metrics and timeline written beside it)")
    p.add_argument(
        "--decode", default="async", choices=list(DECODE_MODES),
        help="async: the VAE decodes chunk k while the DiT generates chunk k+1; sync: one after the other",
    )  # fmt: skip
    p.add_argument("--lora", default=None, help="peft LoRA folder from the DMD stage")
    p.add_argument(
        "--vae",
        default="debug",
        help="debug | wan2.1 | wan2.2-debug | wan2.2 (random init, for timing) | PATH",
    )
    p.add_argument("--image", default=None, help="image-to-video: first frame (a Wan2.2 TI2V base)")
    p.add_argument("--video", default=None, help="continuation: prefix video (whole chunks kept)")
    p.add_argument(
        "--include-prefix", action="store_true", help="--video: the mp4 starts with the prefix frames"
    )
    p.add_argument("--text-encoder", default=None, help="local umT5/T5 encoder folder")
    p.add_argument("--fps", type=float, default=16.0, help="frames per second of the mp4 (and of shot times)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--decode-device",
        default=None,
        help="device of the VAE decode, e.g. cuda:1 or cpu (default: the generation device; with "
        "--nproc: rank 0 decodes there while the ranks generate)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks (GPUs) generating together: Ulysses over the attention heads, the KV cache "
        "sharded by heads; started through vidtrain-launch (torchrun). Default: 1, or the "
        "launcher's WORLD_SIZE inside a launched rank",
    )
    p.add_argument("--master-port", type=int, default=None, help="--nproc: the ranks' rendezvous port")
    p.add_argument("--no-progress", action="store_true", help="no per-chunk progress lines")
    p.add_argument(
        "--quant",
        default=None,
        choices=["fp8"],
        help="post-training quantization of the linears for generation: fp8 stores the weights as "
        "float8_e4m3fn with scales (an FP8-trained checkpoint: its recorded linears and recipe)",
    )
    p.add_argument(
        "--fp8-recipe",
        default=None,
        choices=["tensorwise", "rowwise"],
        help="--quant fp8: scales per tensor or per row (default: the checkpoint's record, else tensorwise)",
    )
    p.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="refuse requests whose memory estimate exceeds this (default: the device's memory)",
    )
    add_sampler_args(p)
    return p


CHECKED_ENV = "VIDTRAIN_SAMPLE_CHECKED"  # set for ranks started by `vidtrain sample --nproc`
RANK_TIMEOUT_S = 600.0  # --nproc: a collective that waits longer fails the run instead of hanging it


def launched_rank() -> bool:
    """Inside a rank that a launcher started (torchrun / vidtrain-launch set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_nproc(args) -> int:
    """--nproc, else the launcher's WORLD_SIZE inside a launched rank, else 1."""
    if args.nproc is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if launched_rank() and int(os.environ["WORLD_SIZE"]) not in (1, args.nproc):
            raise ValueError(
                f"--nproc {args.nproc} but the launcher started {os.environ['WORLD_SIZE']} ranks"
            )
        return args.nproc
    return int(os.environ["WORLD_SIZE"]) if launched_rank() else 1


def parse_device(spec: str, flag: str) -> torch.device:
    """A torch device of a flag, checked to exist here (one line otherwise)."""
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"{flag}: not a torch device: {spec!r} (e.g. cuda, cuda:1, cpu)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if (dev.index is not None and dev.index >= n) or n == 0:
            raise ValueError(f"{flag} {spec}: this machine has {n} CUDA device(s)")
    return dev


def launch_ranks(nproc: int, argv: list[str], master_port: int | None) -> int:
    """Start `nproc` ranks of this same command through the launcher (`vidtrain-launch sample`:
    torchrun, the ranks' output passed through). A subprocess, not an import: the launcher sits
    above vidtrain.sample in the rooms' layers."""
    cmd = [sys.executable, "-m", "vidtrain.launch.launcher", "sample", "--nproc", str(nproc)]
    if master_port:
        cmd += ["--master-port", str(master_port)]
    # the ranks check again (cheap) but need not print what this process already said
    return subprocess.call([*cmd, "--", *argv], env={**os.environ, CHECKED_ENV: "1"})


def _from_main(mesh, *objs):
    """Rank 0's objects (CPU tensors, numbers) on every rank of the group."""
    import torch.distributed as dist  # lazy: only a multi-rank run broadcasts

    box = [None if o is None else (o.cpu() if isinstance(o, torch.Tensor) else o) for o in objs]
    dist.broadcast_object_list(box, src=0)
    return box


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    nproc = resolve_nproc(args)
    ranks = nproc > 1 and launched_rank()  # this process is one of the ranks
    if ranks and os.environ["RANK"] != "0":  # the ranks other than 0 say nothing and write nothing
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return _main(args, argv, nproc, ranks)
    return _main(args, argv, nproc, ranks)


def _main(args, argv: list[str], nproc: int, ranks: bool) -> int:
    # 1. everything that can be wrong, before compute (and before any rank starts)
    quiet_checks = ranks and os.environ.get(CHECKED_ENV) == "1"
    with (
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stdout(devnull if quiet_checks else sys.stdout),
    ):
        checked = _check(args, argv, nproc)
    if nproc > 1 and not ranks:
        print(
            f"[vidtrain] starting {nproc} ranks through vidtrain-launch (torchrun); rank 0 decodes and writes"
        )
        return launch_ranks(nproc, argv, args.master_port)
    mesh = build_mesh(nproc, RANK_TIMEOUT_S) if ranks else None
    try:
        return _generate(args, *checked, mesh)
    finally:
        if mesh is not None and mesh.owns_process_group:
            import torch.distributed as dist  # lazy: only a multi-rank run made a process group

            dist.destroy_process_group()


def _check(args, argv: list[str], nproc: int) -> tuple:
    """Every check before compute; (cfg, shots, latent_hw, image, prefix chunks, device,
    decode device, out)."""
    out = Path(args.out)
    check_output(out)
    check_numbers(args)
    cfg = SamplerConfig.from_run(args.checkpoint, args.lora, sampler_overrides(args), log=print, bounded=True)
    shots: list[Shot] = load_shots(args.shots, fps=args.fps, frames_per_chunk=cfg.frames_per_chunk)
    wan, rope_positions = model_config(args.checkpoint)
    check_conditioning_args(args, wan)
    spatial = vae_spatial(args.vae, wan.in_channels)
    latent_hw = latent_size(args.height, args.width, spatial, rope_positions=rope_positions)
    check_ranks(
        wan.num_heads, cfg.frames_per_chunk * (latent_hw[0] // PATCH) * (latent_hw[1] // PATCH), nproc
    )
    given = {a.split("=")[0] for a in argv}
    size_from = "flags" if {"--height", "--width"} & given else "default (--height/--width)"
    where = args.device if nproc == 1 else f"{nproc} ranks (Ulysses over {wan.num_heads} heads)"
    print(
        f"[vidtrain] size {args.height}x{args.width} px from {size_from}: {latent_hw[0]}x{latent_hw[1]} latents, "
        f"{sum(s.chunks for s in shots)} chunks of {cfg.frames_per_chunk} latent frames on {where}"
    )
    image = read_image(args.image, args.height, args.width) if args.image else None
    k = prefix_chunks(video_frames(args.video), cfg.frames_per_chunk) if args.video else 0
    if k:  # the prefix is shot 0's first chunks: its prompt continues it
        shots = [Shot(shots[0].prompt, shots[0].chunks + k), *shots[1:]]
    check_positions(shots, cfg, rope_positions)
    device = parse_device(args.device, "--device")
    decode_device = parse_device(args.decode_device, "--decode-device") if args.decode_device else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frames = sum(s.chunks for s in shots) * cfg.frames_per_chunk
    parts = memory_estimate(
        wan, cfg, latent_hw, frames, args.vae, torch.finfo(dtype).bits // 8, spatial=spatial
    )
    if nproc > 1:  # each rank holds H/N heads of the cache
        parts["KV cache"] /= nproc
    if decode_device is not None and decode_device != device:
        parts.pop("VAE decode", None)  # on its own device
    need = check_memory(parts, args.max_memory_gib, device)
    print(f"[vidtrain] memory estimate {need / 2**30:.2f} GiB" + (" per rank" if nproc > 1 else "") + " (" + ", ".join(
        f"{k} {v / 2**30:.2f}" for k, v in parts.items()) + ")")  # fmt: skip
    return cfg, shots, latent_hw, image, k, device, decode_device, out


def _generate(args, cfg, shots, latent_hw, image, k, device, decode_device, out, mesh) -> int:
    """Load, generate, decode and write (rank 0; the other ranks of a multi-rank run generate only)."""
    if mesh is not None:  # each rank on its own GPU (cuda:LOCAL_RANK), or the CPU
        device = mesh.device if device.type == "cuda" else torch.device("cpu")
    decode_device = decode_device or device
    main_rank = mesh is None or mesh.is_main
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.checkpoint, args.lora)
    model = model.to(device, dtype).eval().requires_grad_(False)
    if getattr(args, "quant", None) == "fp8":  # after .to(dtype): the e4m3 weights stay e4m3
        if not isinstance(model, CausalWanDiT):  # a LoRA kept beside a quantized base
            raise ValueError("--quant fp8 with --lora on a quantized checkpoint: it samples as recorded")
        recipe, n, nbytes = ptq_fp8(
            model, resolve_model_folder(args.checkpoint), args.fp8_recipe,
            "scaled_mm" if device.type == "cuda" else "emulate",
        )  # fmt: skip
        print(
            f"[vidtrain] --quant fp8: {n} linears stored as float8_e4m3fn ({recipe}), {nbytes / 2**20:.2f} MiB"
        )
    vae = None
    if main_rank:  # checked by vae_spatial
        vae_dtype = torch.bfloat16 if decode_device.type == "cuda" else torch.float32
        vae = load_vae(args.vae, model.cfg.in_channels, decode_device, vae_dtype)
    text_encoder = load_text_encoder(args.text_encoder, model.cfg.text_dim, device, cfg.text_len)
    conds = shot_conditionings([[s.prompt] for s in shots], text_encoder, model.cfg.text_dim, cfg)
    image_latent = prefix = skip = None
    if main_rank and image is not None:
        image_latent = encode_frames(vae, image)[:, :, 0]
    if main_rank and k:
        pixels = read_prefix(
            args.video, k, cfg.frames_per_chunk, args.height, args.width, vae.temporal_compression
        )
        prefix = encode_frames(vae, pixels)
        skip = 0 if args.include_prefix else pixels.shape[2]
    if mesh is not None:  # rank 0 encoded them: every rank conditions on the same latents
        image_latent, prefix, skip = _from_main(mesh, image_latent, prefix, skip)
    if image_latent is not None:
        conds[0] = Conditioning(conds[0].context_BST, conds[0].mask_BS, image_latent)
    chunks = [s.chunks for s in shots]
    if mesh is None:
        sampler = PrefixSampler(model, cfg, prefix)
    else:
        sampler = UlyssesSampler(model, cfg, mesh, prefix)
        if not mesh.is_main:
            generate_only(sampler, conds, chunks, latent_hw, [args.seed])
            return 0
    # 2. generate + decode into temp files beside the outputs; renamed over them once all are complete
    for stale in remove_stale_temps(out):
        print(f"[vidtrain] removed {stale.name}, left by a killed run")
    finals = [out, out.with_suffix(".metrics.json"), out.with_suffix(".timeline.png")]
    temps = [_tmp_beside(p) for p in finals]
    try:
        writer = VideoWriter(temps[0], args.fps)
        try:
            metrics = stream_video(
                sampler, conds, chunks, latent_hw, [args.seed], vae, args.decode,
                writer if not skip else SkipFrames(writer, skip), progress=not args.no_progress,
            )  # fmt: skip
        finally:
            writer.close()
        # 3. metrics and timeline beside the video
        nproc = 1 if mesh is None else mesh.sp_size
        if nproc > 1:  # the cache is sharded by heads, H/N per rank (equal shards)
            metrics["kv_cache_bytes_per_rank"] = metrics["kv_cache_bytes"]
            metrics["kv_cache_bytes"] = metrics["kv_cache_bytes"] * nproc
        metrics.update(fps=args.fps, shots=[{"prompt": s.prompt, "chunks": s.chunks} for s in shots],
                       frames_written=writer.frames, height=args.height, width=args.width,
                       image=args.image, prefix_video=args.video, prefix_chunks=k,
                       include_prefix=bool(args.include_prefix), nproc=nproc)  # fmt: skip
        write_metrics(metrics, temps[1])
        plot_timeline(metrics["timeline"], temps[2], f"{out.name}: {args.decode} decode")
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    print(
        f"[vidtrain] wrote {out} ({writer.frames} frames at {args.fps:g} fps), "
        f"{metrics['fps_end_to_end']:.2f} frames/s end to end, first chunk {metrics['first_chunk_latency_s']:.2f} s, "
        f"KV cache {metrics['kv_cache_bytes'] / 2**20:.2f} MiB"
        + (f" ({nproc} ranks, decode on {metrics['decode_device']})" if nproc > 1 else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
