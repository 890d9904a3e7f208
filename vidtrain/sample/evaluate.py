"""`vidtrain eval`: a prompt list against several checkpoints (and KV cache formats) -> a table.

    vidtrain eval --checkpoints runs/a runs/b --prompts prompts.txt --out eval.md --chunks 8 \\
        --kv-cache bf16 nvfp4 --window-frames 6 --sink-frames 3

All prompts run as one batch (seed + i for prompt i), latents only (no VAE decode). Each
checkpoint samples with the settings it was trained with (`SamplerConfig.from_run`: flags over
its LoRA-free run record; without --kv-cache, its trained KV format: nvfp4 for an NVFP4 run),
and the request is bounded as `vidtrain sample` bounds it (RoPE positions, a memory estimate
under --max-memory-gib) before any compute. Columns:
latent frames/s, first-chunk latency, peak KV cache bytes, and a quality proxy,
`temporal_consistency`: the mean cosine similarity of consecutive latent frames (1 = frozen
video, ~0 = unrelated frames), with `boundary_ratio` = its value across chunk boundaries divided
by its value inside chunks (well below 1 flags seams between chunks). Writes OUT (Markdown) and
OUT with .csv.

Image-to-video (`--image first.png`, as `vidtrain sample --image`: the same loader and checks,
Wan2.2 TI2V bases only): the image, encoded once by `--vae`, is latent frame 0 of every prompt's
video, held clean, so every checkpoint is evaluated from the same first frame.

Drift (`--drift --reference-shards DIR`; run it with --chunks several times the training length):
the same generations, measured per chunk and per window of --drift-window chunks against a
bounded sample of the training latents (--reference-samples, read in shard order): per-channel
mean and std, the Frechet distance of per-token latent vectors, frame-to-frame change and its
chunk-boundary ratio (flicker), and similarity to the first sink frames (identity retention);
the math and its definitions are `vidtrain/sample/drift.py`. Also writes OUT with .drift.json
(per run, per chunk and per window; the settings; the reference's size) and .drift.png (a
panel per figure over time, the runs side by side), and adds a drift summary (first window
against last) under the table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vidtrain.data.latents import LatentShardDataset
from vidtrain.models.wan.state_dict import resolve_model_folder
from vidtrain.sample import drift
from vidtrain.sample.cli import (
    add_sampler_args,
    check_conditioning_args,
    check_memory,
    check_positions,
    check_sampler_numbers,
    encode_frames,
    latent_size,
    load_model,
    load_text_encoder,
    load_vae,
    memory_estimate,
    model_config,
    read_image,
    sampler_overrides,
    shot_conditionings,
    vae_spatial,
)
from vidtrain.sample.decode import peak_memory_bytes
from vidtrain.sample.sampler import Conditioning, SamplerConfig, StreamingSampler
from vidtrain.sample.shots import Shot
from vidtrain.utils.plots import finite_values, integer_axis, pyplot, set_value_scale


def temporal_consistency(z_BCFHW: torch.Tensor, frames_per_chunk: int) -> tuple[float, float]:
    """(mean cosine similarity of consecutive frames, across-boundary / within-chunk ratio)."""
    a, b = z_BCFHW[:, :, :-1].flatten(3), z_BCFHW[:, :, 1:].flatten(3)  # [B, C, F-1, HW]
    cos_F = F.cosine_similarity(a.transpose(1, 2).flatten(2), b.transpose(1, 2).flatten(2), dim=-1).mean(0)
    boundary = torch.tensor([(i + 1) % frames_per_chunk == 0 for i in range(cos_F.numel())])
    within = cos_F[~boundary].mean() if (~boundary).any() else cos_F.mean()
    across = cos_F[boundary].mean() if boundary.any() else within
    return float(cos_F.mean()), float(across / within) if float(within) != 0 else float("nan")


def evaluate_one(model, cfg, conds, chunks: int, latent_hw, seeds) -> dict:
    return generate(model, cfg, conds, chunks, latent_hw, seeds)[0]


def generate(model, cfg, conds, chunks: int, latent_hw, seeds) -> tuple[dict, torch.Tensor]:
    """(the table row, the generated latents [B, C, F, H, W])."""
    sampler = StreamingSampler(model, cfg)
    t0 = time.perf_counter()
    chunk_outs = list(sampler.stream(conds, [chunks], latent_hw, seeds))
    total = time.perf_counter() - t0
    z = torch.cat([c.x0_BCFHW for c in chunk_outs], dim=2)
    tc, ratio = temporal_consistency(z.float(), cfg.frames_per_chunk)
    row = {
        "latent_fps": z.shape[2] * z.shape[0] / total,
        "first_chunk_latency_s": chunk_outs[0].gen_end - t0,
        "kv_cache_bytes": max(c.kv_bytes for c in chunk_outs),
        "peak_memory_bytes": peak_memory_bytes(sampler.device),
        "temporal_consistency": tc,
        "boundary_ratio": ratio,
    }
    return row, z


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="vidtrain eval",
        description=__doc__.split("\n")[0],
    )
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="Markdown table (a .csv is written beside it)")
    p.add_argument("--chunks", type=int, default=8, help="chunks generated per prompt")
    p.add_argument("--text-encoder", default=None)
    p.add_argument(
        "--image", default=None, help="image-to-video: first frame of every video (Wan2.2 TI2V bases)"
    )
    p.add_argument(
        "--vae",
        default="debug",
        help="--image's encoder: debug | wan2.1 | wan2.2-debug | wan2.2 (random init, for timing) | PATH",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="refuse requests whose memory estimate exceeds this (default: the device's memory)",
    )
    d = p.add_argument_group("drift (long generations against the training data)")
    d.add_argument(
        "--drift",
        action="store_true",
        help="also measure drift per chunk and window (writes OUT .drift.json and .drift.png)",
    )
    d.add_argument(
        "--reference-shards", default=None, help="latent shard folder (or manifest) of the training data"
    )
    d.add_argument(
        "--reference-samples", type=int, default=64, help="reference samples read, in shard order (at most)"
    )
    d.add_argument("--drift-window", type=int, default=4, help="chunks per time window")
    add_sampler_args(p)
    p._option_string_actions["--kv-cache"].nargs = "+"
    p._option_string_actions["--kv-cache"].help = "KV cache formats to compare (default: as trained)"
    return p


def checkpoint_configs(args, name: str, n_samples: int, device: torch.device) -> dict[str, SamplerConfig]:
    """KV format -> SamplerConfig of one checkpoint (sampled as it was trained), each request
    checked against the model's RoPE positions and the memory estimate."""
    resolve_model_folder(name)
    print(f"[vidtrain] {name}:")
    flags = sampler_overrides(argparse.Namespace(**{**vars(args), "kv_cache": None}))
    trained = SamplerConfig.from_run(name, None, flags, log=print, bounded=True)
    wan, rope_positions = model_config(name)
    latent_hw = eval_latent_size(args, name)
    dtype_bytes = 2 if device.type == "cuda" else 4
    cfgs = {}
    for kv in args.kv_cache or [trained.kv_cache]:
        cfg = dataclasses.replace(trained, kv_cache=kv)
        check_positions([Shot("eval", args.chunks)], cfg, rope_positions)
        frames = args.chunks * cfg.frames_per_chunk
        check_memory(
            memory_estimate(wan, cfg, latent_hw, frames, None, dtype_bytes, n_samples),
            args.max_memory_gib,
            device,
        )
        cfgs[kv] = cfg
    return cfgs


def eval_latent_size(args, name: str) -> tuple[int, int]:
    """A checkpoint's latent size; with --image the base must be image-to-video and the size
    follow --vae's spatial compression (`vidtrain sample`'s checks, before compute)."""
    wan, rope_positions = model_config(name)
    if not args.image:
        return latent_size(args.height, args.width, rope_positions=rope_positions)
    check_conditioning_args(argparse.Namespace(image=args.image, video=None, include_prefix=False), wan)
    spatial = vae_spatial(args.vae, wan.in_channels)
    return latent_size(args.height, args.width, spatial, rope_positions=rope_positions)


def image_latent(args, channels: int, device: torch.device, pixels: torch.Tensor) -> torch.Tensor:
    """--image encoded by --vae: latent frame 0 [1, C, h, w] (float32), once for every checkpoint."""
    vae = load_vae(args.vae, channels, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    latent = encode_frames(vae, pixels)[:, :, 0]
    print(f"[vidtrain] --image {args.image}: latent frame 0 {list(latent.shape[1:])} of every video")
    return latent


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    prompts_path, out = Path(args.prompts), Path(args.out)
    if not prompts_path.is_file():
        raise FileNotFoundError(f"prompts file not found: {prompts_path}")
    prompts = [line.strip() for line in prompts_path.read_text().splitlines() if line.strip()]
    if not prompts or args.chunks < 1:
        raise ValueError("need at least one prompt and --chunks >= 1")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {out.parent} does not exist")
    check_sampler_numbers(args)
    if args.seed + len(prompts) > 2**63:
        raise ValueError(
            f"--seed + the number of prompts must stay below 2**63, got {args.seed} + {len(prompts)}"
        )
    check_drift_args(args)
    device = torch.device(args.device)
    # every checkpoint must exist, and every request be valid and fit, before any compute
    cfgs = {c: checkpoint_configs(args, c, len(prompts), device) for c in args.checkpoints}
    pixels = read_image(args.image, args.height, args.width) if args.image else None
    reference = read_reference(args) if args.drift else None
    if reference is not None:
        for name in args.checkpoints:
            channels = model_config(name)[0].out_channels
            if channels != reference["stats"].sum.numel():
                raise ValueError(
                    f"--reference-shards latents have {reference['stats'].sum.numel()} channels, "
                    f"{name} generates {channels}"
                )
    drift_runs = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    first_frame = None
    if pixels is not None:  # every checkpoint an I2V base (checked): one latent channel count
        first_frame = image_latent(args, model_config(args.checkpoints[0])[0].in_channels, device, pixels)
    for name in args.checkpoints:
        model = load_model(name, None).to(device, dtype).eval().requires_grad_(False)
        first = next(iter(cfgs[name].values()))  # the KV format apart, one run's settings
        enc = load_text_encoder(args.text_encoder, model.cfg.text_dim, device, first.text_len)
        conds = shot_conditionings([prompts], enc, model.cfg.text_dim, first)
        seeds = [args.seed + i for i in range(len(prompts))]
        latent_hw = eval_latent_size(args, name)
        if first_frame is not None:  # the same first frame for every prompt and checkpoint
            image = first_frame.to(device).expand(len(prompts), -1, -1, -1)
            conds[0] = Conditioning(conds[0].context_BST, conds[0].mask_BS, image)
        for kv, cfg in cfgs[name].items():
            row, z = generate(model, cfg, conds, args.chunks, latent_hw, seeds)
            rows.append({"checkpoint": name, "kv_cache": kv, **row})
            if reference is not None:
                drift_runs.append(drift_run(name, kv, cfg, z, args.drift_window, reference["stats"]))
    write_table(rows, out)
    print(f"[vidtrain] wrote {out} and {out.with_suffix('.csv')} ({len(rows)} rows)")
    if reference is not None:
        write_drift(args, drift_runs, reference, out, len(prompts))
    return 0


# -- drift (--drift)

DRIFT_FIGURES = {  # key -> (panel title, per window?)
    "frechet": ("Frechet distance to the reference", True),
    "mean_error": ("channel mean error (|mu - mu_ref| / std_ref)", False),
    "std_ratio": ("channel std ratio (std / std_ref)", False),
    "frame_change": ("frame-to-frame change (mean |dz|)", False),
    "boundary_ratio": ("chunk-boundary ratio (boundary / inside change)", False),
    "identity": ("identity: cosine to the first sink frames", False),
}


def check_drift_args(args) -> None:
    """The drift flags, checked before any compute."""
    given = [f for f, v in (("--reference-shards", args.reference_shards),) if v is not None]
    if not args.drift:
        if given:
            raise ValueError(f"{given[0]} needs --drift")
        return
    if args.reference_shards is None:
        raise ValueError("--drift needs --reference-shards DIR (latent shards of the training data)")
    if not Path(args.reference_shards).exists():
        raise FileNotFoundError(f"--reference-shards {args.reference_shards}: no such folder")
    if args.reference_samples < 1 or args.drift_window < 1:
        raise ValueError(
            f"--reference-samples and --drift-window must be >= 1, got {args.reference_samples} and {args.drift_window}"
        )
    if args.chunks < 2 * args.drift_window:
        raise ValueError(
            f"--drift needs at least two windows: --chunks >= 2 x --drift-window = {2 * args.drift_window}, "
            f"got --chunks {args.chunks}"
        )


def read_reference(args) -> dict:
    """Gaussian statistics of the reference latents' per-token vectors: the first
    --reference-samples samples in shard order (each once), and the two halves' own Frechet
    distance (odd vs even samples: the floor a generation can reach with this many samples)."""
    ds = LatentShardDataset(args.reference_shards, shuffle=False)
    n = min(args.reference_samples, sum(ds.counts))
    if n < 1:
        raise ValueError(f"--reference-shards {args.reference_shards} holds no samples")
    stats, halves, frames = None, None, 0
    for i, item in enumerate(itertools.islice(iter(ds), n)):
        lat = item["latents"]
        if lat.dim() != 4:
            raise ValueError(
                f"--reference-shards: sample {item['key']} latents are {tuple(lat.shape)}, not [C, F, H, W]"
            )
        if stats is None:
            stats = drift.GaussianStats(lat.shape[0])
            halves = (drift.GaussianStats(lat.shape[0]), drift.GaussianStats(lat.shape[0]))
        elif lat.shape[0] != stats.sum.numel():
            raise ValueError(
                f"--reference-shards: sample {item['key']} has {lat.shape[0]} channels, not {stats.sum.numel()}"
            )
        vec = drift.token_vectors(lat[None])
        stats.add(vec)
        halves[i % 2].add(vec)
        frames += lat.shape[1]
    if stats.n < 2:
        raise ValueError(
            f"--reference-shards {args.reference_shards}: one latent vector cannot fit a Gaussian"
        )
    floor = (
        drift.frechet_distance(halves[0].mean, halves[0].cov, halves[1].mean, halves[1].cov)
        if halves[1].n >= 2
        else math.nan
    )
    print(f"[vidtrain] drift reference: {n} sample(s), {frames} latent frames, {stats.n} token vectors")
    return {
        "stats": stats,
        "info": {
            "source": str(args.reference_shards),
            "samples": n,
            "samples_available": sum(ds.counts),
            "shards": len(ds.shards),
            "latent_frames": frames,
            "token_vectors": stats.n,
            "channels": stats.sum.numel(),
            "channel_mean": stats.mean.tolist(),
            "channel_std": stats.std.tolist(),
            "self_frechet": floor,
        },
    }


def drift_run(name: str, kv: str, cfg: SamplerConfig, z: torch.Tensor, window: int, ref) -> dict:
    """One generation's drift figures, labelled; the identity reference is the first sink frames
    (the first chunk when the run has no sink)."""
    identity_frames = min(cfg.sink_frames or cfg.frames_per_chunk, z.shape[2])
    figures = drift.drift_figures(z, cfg.frames_per_chunk, window, ref, identity_frames)
    return {
        "checkpoint": name,
        "kv_cache": kv,
        "frames_per_chunk": cfg.frames_per_chunk,
        "latent_frames": z.shape[2],
        "window_frames": cfg.window_frames,
        "sink_frames": cfg.sink_frames,
        "identity_frames": identity_frames,
        **figures,
    }


def _jsonable(x):
    """NaN and infinities as null (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _label(run: dict, runs: list[dict]) -> str:
    several_kv = len({r["kv_cache"] for r in runs if r["checkpoint"] == run["checkpoint"]}) > 1
    name = run["checkpoint"]  # as given on the command line
    return f"{name} [{run['kv_cache']}]" if several_kv else name


def write_drift(args, runs: list[dict], reference: dict, out: Path, n_prompts: int) -> None:
    """OUT.drift.json, OUT.drift.png and the drift summary under the Markdown table."""
    json_path, png_path = out.with_suffix(".drift.json"), out.with_suffix(".drift.png")
    doc = {
        "settings": {
            "chunks": args.chunks,
            "window_chunks": args.drift_window,
            "windows": args.chunks // args.drift_window,
            "prompts": n_prompts,
            "seed": args.seed,
            "height": args.height,
            "width": args.width,
            "reference_samples_asked": args.reference_samples,
            "vectors": "per-token latent vectors (every latent position of every frame, C channels)",
            "frame_change": "mean |z[f+1] - z[f]| over batch, channels and positions",
            "identity": "cosine of each frame (C x H x W) to the mean of the first identity_frames frames",
        },
        "reference": reference["info"],
        "runs": [{"label": _label(r, runs), **r} for r in runs],
    }
    json_path.write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
    plot_drift(doc["runs"], args.drift_window, png_path, reference["info"]["self_frechet"])
    lines = [
        "",
        "## Drift",
        "",
        f"{args.chunks} chunks, windows of {args.drift_window} chunks; reference: "
        f"{reference['info']['samples']} sample(s), {reference['info']['token_vectors']} token vectors of "
        f"`{reference['info']['source']}` (its halves' own Frechet distance: "
        f"{reference['info']['self_frechet']:.4g}). First window -> last window:",
        "",
        "| run | " + " | ".join(DRIFT_FIGURES) + " |",
        "|" + "---|" * (len(DRIFT_FIGURES) + 1),
    ]
    for r in doc["runs"]:
        cells = []
        for key in DRIFT_FIGURES:
            w = r["per_window"][key]
            cells.append(" -> ".join("n/a" if not math.isfinite(v) else f"{v:.4g}" for v in (w[0], w[-1])))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"Figures: `{json_path.name}`; plot:", "", f"![drift]({png_path.name})", ""]
    with out.open("a") as f:
        f.write("\n".join(lines))
    print(f"[vidtrain] wrote {json_path} and {png_path}")


def plot_drift(runs: list[dict], window: int, path: Path, floor: float = math.nan) -> None:
    """One figure, a panel per drift figure over time (chunks; the Frechet distance per window,
    drawn at the window's middle chunk, with the reference's own floor), one line per run."""
    plt = pyplot()
    part = lambda key: "per_window" if DRIFT_FIGURES[key][1] else "per_chunk"  # noqa: E731
    # no empty panels (e.g. no boundary ratio with one frame per chunk)
    keys = [k for k in DRIFT_FIGURES if any(finite_values(r[part(k)][k]) for r in runs)]
    cols = min(3, max(len(keys), 1))
    rows = max(math.ceil(len(keys) / cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        title, windowed = DRIFT_FIGURES[key]
        values = []
        for r in runs:
            ys = r["per_window" if windowed else "per_chunk"][key]
            xs = [(w + 0.5) * window - 0.5 for w in range(len(ys))] if windowed else list(range(len(ys)))
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, marker="o" if windowed else ".", label=r["label"])
            values += finite_values(ys)
        if key in ("std_ratio", "boundary_ratio", "identity"):
            ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        if windowed and math.isfinite(floor):
            ax.axhline(floor, color="gray", linestyle=":", linewidth=1, label="reference halves")
            values.append(floor)
        ax.set_title(f"{title}, windows of {window} chunks" if windowed else title, fontsize=10)
        ax.set_xlabel("chunk")
        set_value_scale(ax, values)
        integer_axis(ax)
        ax.legend(fontsize=8)
    fig.suptitle("drift over a long generation (vidtrain eval --drift)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(rows: list[dict], out: Path) -> None:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
