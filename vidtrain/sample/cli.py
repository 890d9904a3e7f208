"""`vidtrain sample`: stream a multi-shot video from a checkpoint into an mp4 + metrics + timeline.

    vidtrain sample --checkpoint runs/debug --shots recipes/shots_example.yaml --out video.mp4 \\
        --kv-cache nvfp4 --decode async --window-frames 6 --sink-frames 3 --height 64 --width 64

Writes video.mp4 (libx264, yuv420p), video.metrics.json and video.timeline.png. Every input is
checked (checkpoint, shots file, output path, sizes, VAE / text encoder against the model)
before any generation starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from vidtrain.sample.decode import DECODE_MODES, VideoWriter, plot_timeline, stream_video, write_metrics
from vidtrain.sample.sampler import Conditioning, SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.sample.shots import Shot, load_shots


def load_model(checkpoint: str | Path, lora_dir: str | None):
    """The model a checkpoint was trained as: NVFP4 fake-quant linears when it carries a
    quant.json (QAT), and the DMD LoRA on top when given (checked against its recorded base)."""
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.models.wan.state_dict import resolve_model_folder
    from vidtrain.quant.qat import apply_quant_record

    folder = resolve_model_folder(checkpoint)
    model = CausalWanDiT.from_pretrained(folder)
    quantized = apply_quant_record(model, folder)
    if lora_dir:
        from vidtrain.distill.export import load_lora

        model = load_lora(model, lora_dir)
        # merging would fold the LoRA into weights that are then re-quantized: keep it apart
        model = model if quantized else model.merge_and_unload()
    return model


def load_vae(spec: str, z_dim: int, device, dtype):
    """'debug' / 'wan2.1': random-initialised VAE of that size (seeded; for tests and timing);
    anything else: a path to Wan2.1 VAE weights."""
    from vidtrain.models.vae import VAE_FLAVORS, CausalVideoVAE

    if spec in VAE_FLAVORS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            vae = CausalVideoVAE.from_flavor(spec)
    else:
        if not Path(spec).exists():
            raise FileNotFoundError(f"VAE weights not found: {spec} (or use one of {sorted(VAE_FLAVORS)})")
        vae = CausalVideoVAE.from_pretrained(spec)
    if vae.z_dim != z_dim:
        raise ValueError(f"VAE latent channels {vae.z_dim} != model in_channels {z_dim}")
    return vae.to(device, dtype).eval()


def shot_conditionings(prompts: list[list[str]], text_encoder, text_dim: int) -> list[Conditioning]:
    """prompts[shot][sample] -> one Conditioning per shot."""
    if text_encoder is None:
        return [debug_text_context(p, text_dim) for p in prompts]
    out = []
    for p in prompts:
        emb, mask = text_encoder.encode(p)
        out.append(Conditioning(emb, mask))
    return out


def load_text_encoder(path: str | None, text_dim: int, device):
    if path is None:
        print("[vidtrain] no --text-encoder: using fixed random contexts per prompt (debug stand-in)")
        return None
    from vidtrain.models.text import TextEncoder

    enc = TextEncoder.from_pretrained(path, device=device)
    if enc.dim != text_dim:
        raise ValueError(f"text encoder width {enc.dim} != model text_dim {text_dim}")
    return enc


def parse_steps(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"--steps must be comma-separated numbers, got {s!r}") from e


def check_output(out: Path) -> None:
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must end in .mp4, got {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"cannot write {out}")


_DEFAULTS = SamplerConfig()
# sampler settings a training run decides: recipe `model` section key -> SamplerConfig field
RECIPE_KEYS = ("frames_per_chunk", "window_frames", "sink_frames", "shot_sink")
# LoRA vidtrain_base.json key (written by the dmd method) -> SamplerConfig field
LORA_KEYS = {
    "denoising_steps": "timesteps",
    "timestep_shift": "shift",
    "frames_per_chunk": "frames_per_chunk",
}
# CLI dest -> SamplerConfig field, for the settings whose default comes from the training
TRAINED_ARGS = {"steps": "timesteps", "shift": "shift", "frames_per_chunk": "frames_per_chunk",
                "window_frames": "window_frames", "sink_frames": "sink_frames", "shot_sink": "shot_sink"}  # fmt: skip
NO_WINDOW = "none"


def _window(s: str):
    if s.strip().lower() in (NO_WINDOW, "all"):
        return NO_WINDOW
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window-frames takes an integer or 'none', got {s!r}") from None


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """Sampler flags. Those the training decides (steps, shift, chunking, window, sinks) default to
    None: filled from the LoRA record, then the checkpoint recipe, then SamplerConfig."""
    d = _DEFAULTS
    steps = ",".join(f"{t:g}" for t in d.timesteps)
    p.add_argument("--kv-cache", default=d.kv_cache, choices=["bf16", "fp16", "fp32", "nvfp4"])
    p.add_argument(
        "--steps",
        default=None,
        help=f"denoising timesteps before the shift (default: as trained, else {steps})",
    )
    p.add_argument(
        "--shift", type=float, default=None, help=f"timestep shift (default: as trained, else {d.shift:g})"
    )
    p.add_argument("--update", default=d.update, choices=["x0", "euler"])
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
        "--shot-rope-offset", type=int, default=d.shot_rope_offset, help="temporal RoPE offset per shot"
    )
    p.add_argument(
        "--recache-on-cut",
        action="store_true",
        default=d.recache_on_cut,
        help="LongLive: re-cache K/V at each cut",
    )
    p.add_argument("--height", type=int, default=480, help="pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=832, help="pixels (multiple of 16)")
    p.add_argument("--seed", type=int, default=0)  # fmt: skip


def recipe_for(checkpoint: str | Path) -> Path | None:
    """The recipe.yaml of the training that wrote `checkpoint`: its step folder's, else its run
    folder's; None for a bare model folder."""
    from vidtrain.models.wan.state_dict import resolve_model_folder

    folder = resolve_model_folder(checkpoint)
    step = folder.parent if folder.name == "model" else folder
    cands = [step / "recipe.yaml"]
    if step.parent.name == "checkpoints":
        cands.append(step.parent.parent / "recipe.yaml")
    return next((c for c in cands if c.is_file()), None)


def trained_settings(checkpoint: str | Path | None, lora: str | None = None) -> dict[str, tuple]:
    """SamplerConfig field -> (value, source) for what the training recorded: LoRA record over
    checkpoint recipe."""
    out: dict[str, tuple] = {}
    recipe_path = recipe_for(checkpoint) if checkpoint is not None else None
    if recipe_path is not None:
        from vidtrain.config import load_recipe

        m = load_recipe(recipe_path).model
        out.update({k: (getattr(m, k), f"recipe {recipe_path}") for k in RECIPE_KEYS})
    if lora:
        from vidtrain.distill.export import read_base_info

        info = read_base_info(lora)
        for key, field in LORA_KEYS.items():
            if info.get(key) is not None:
                value = tuple(float(t) for t in info[key]) if field == "timesteps" else info[key]
                out[field] = (value, f"LoRA {lora}")
    return out


def fill_sampler_args(args, checkpoint: str | Path | None, lora: str | None = None, log: bool = True):
    """A copy of `args` with the unset trained settings filled in: CLI flag > LoRA record >
    checkpoint recipe > SamplerConfig default. Prints where each came from."""
    trained = trained_settings(checkpoint, lora)
    vals, sources = dict(vars(args)), {}
    for dest, field in TRAINED_ARGS.items():
        if vals.get(dest) is not None:
            sources[field] = "flag"
        elif field in trained:
            value, sources[field] = trained[field]
            vals[dest] = ",".join(f"{t:g}" for t in value) if dest == "steps" else value
    if log:
        by_source: dict[str, list[str]] = {}
        for field in TRAINED_ARGS.values():
            by_source.setdefault(sources.get(field, "SamplerConfig default"), []).append(field)
        print(
            "[vidtrain] sampler settings: "
            + "; ".join(f"{', '.join(v)} from {k}" for k, v in by_source.items())
        )
    return argparse.Namespace(**vals)


def sampler_config(args) -> SamplerConfig:
    """SamplerConfig from parsed flags (run `fill_sampler_args` first to use the trained settings);
    unset ones take SamplerConfig's defaults."""
    d = _DEFAULTS
    window = None if args.window_frames == NO_WINDOW else args.window_frames
    shot_sink = (window is not None) if args.shot_sink is None else args.shot_sink
    return SamplerConfig(
        timesteps=d.timesteps if args.steps is None else parse_steps(args.steps),
        shift=d.shift if args.shift is None else args.shift, update=args.update,
        frames_per_chunk=d.frames_per_chunk if args.frames_per_chunk is None else args.frames_per_chunk,
        window_frames=window, sink_frames=d.sink_frames if args.sink_frames is None else args.sink_frames,
        shot_sink=shot_sink and window is not None, kv_cache=args.kv_cache,
        shot_rope_offset=args.shot_rope_offset, recache_on_cut=args.recache_on_cut,
    )  # fmt: skip


def latent_size(height: int, width: int, spatial: int = 8) -> tuple[int, int]:
    if height % (2 * spatial) or width % (2 * spatial) or height <= 0 or width <= 0:
        raise ValueError(
            f"--height/--width must be positive multiples of {2 * spatial}, got {height}x{width}"
        )
    return height // spatial, width // spatial


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidtrain sample", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="model folder, checkpoint step folder, or run folder")
    p.add_argument("--shots", required=True, help="shots YAML (see recipes/shots_example.yaml)")
    p.add_argument("--out", required=True, help="output .mp4 (metrics and timeline written beside it)")
    p.add_argument("--decode", default="async", choices=list(DECODE_MODES))
    p.add_argument("--lora", default=None, help="peft LoRA folder from the DMD stage")
    p.add_argument("--vae", default="debug", help="debug | wan2.1 (random init, for timing) | PATH")
    p.add_argument("--text-encoder", default=None, help="local umT5/T5 encoder folder")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_sampler_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # 1. everything that can be wrong, before compute
    out = Path(args.out)
    check_output(out)
    if not 0 < args.fps < float("inf"):
        raise ValueError(f"--fps must be a finite number > 0, got {args.fps}")
    cfg = sampler_config(fill_sampler_args(args, args.checkpoint, args.lora))
    shots: list[Shot] = load_shots(args.shots, fps=args.fps, frames_per_chunk=cfg.frames_per_chunk)
    latent_hw = latent_size(args.height, args.width)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(args.checkpoint, args.lora)
    model = model.to(device, dtype).eval().requires_grad_(False)
    vae = load_vae(args.vae, model.cfg.in_channels, device, dtype)
    text_encoder = load_text_encoder(args.text_encoder, model.cfg.text_dim, device)
    # 2. generate + decode
    conds = shot_conditionings([[s.prompt] for s in shots], text_encoder, model.cfg.text_dim)
    writer = VideoWriter(out, args.fps)
    try:
        metrics = stream_video(
            StreamingSampler(model, cfg), conds, [s.chunks for s in shots], latent_hw, [args.seed], vae,
            args.decode, writer,
        )  # fmt: skip
    finally:
        writer.close()
    # 3. metrics and timeline beside the video
    metrics.update(fps=args.fps, shots=[{"prompt": s.prompt, "chunks": s.chunks} for s in shots],
                   frames_written=writer.frames, height=args.height, width=args.width)  # fmt: skip
    write_metrics(metrics, out.with_suffix(".metrics.json"))
    plot_timeline(metrics["timeline"], out.with_suffix(".timeline.png"), f"{out.name}: {args.decode} decode")
    print(
        f"[vidtrain] wrote {out} ({writer.frames} frames at {args.fps:g} fps), "
        f"{metrics['fps_end_to_end']:.2f} frames/s end to end, first chunk {metrics['first_chunk_latency_s']:.2f} s, "
        f"KV cache {metrics['kv_cache_bytes'] / 2**20:.2f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
