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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vidtrain.models.wan.state_dict import resolve_model_folder
from vidtrain.sample.cli import (
    add_sampler_args,
    check_memory,
    check_positions,
    check_sampler_numbers,
    latent_size,
    load_model,
    load_text_encoder,
    memory_estimate,
    model_config,
    sampler_overrides,
    shot_conditionings,
)
from vidtrain.sample.decode import peak_memory_bytes
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler
from vidtrain.sample.shots import Shot


def temporal_consistency(z_BCFHW: torch.Tensor, frames_per_chunk: int) -> tuple[float, float]:
    """(mean cosine similarity of consecutive frames, across-boundary / within-chunk ratio)."""
    a, b = z_BCFHW[:, :, :-1].flatten(3), z_BCFHW[:, :, 1:].flatten(3)  # [B, C, F-1, HW]
    cos_F = F.cosine_similarity(a.transpose(1, 2).flatten(2), b.transpose(1, 2).flatten(2), dim=-1).mean(0)
    boundary = torch.tensor([(i + 1) % frames_per_chunk == 0 for i in range(cos_F.numel())])
    within = cos_F[~boundary].mean() if (~boundary).any() else cos_F.mean()
    across = cos_F[boundary].mean() if boundary.any() else within
    return float(cos_F.mean()), float(across / within) if float(within) != 0 else float("nan")


def evaluate_one(model, cfg, conds, chunks: int, latent_hw, seeds) -> dict:
    sampler = StreamingSampler(model, cfg)
    t0 = time.perf_counter()
    chunk_outs = list(sampler.stream(conds, [chunks], latent_hw, seeds))
    total = time.perf_counter() - t0
    z = torch.cat([c.x0_BCFHW for c in chunk_outs], dim=2)
    tc, ratio = temporal_consistency(z.float(), cfg.frames_per_chunk)
    return {
        "latent_fps": z.shape[2] * z.shape[0] / total,
        "first_chunk_latency_s": chunk_outs[0].gen_end - t0,
        "kv_cache_bytes": max(c.kv_bytes for c in chunk_outs),
        "peak_memory_bytes": peak_memory_bytes(sampler.device),
        "temporal_consistency": tc,
        "boundary_ratio": ratio,
    }


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="refuse requests whose memory estimate exceeds this (default: the device's memory)",
    )
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
    latent_hw = latent_size(args.height, args.width, rope_positions=rope_positions)
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
    device = torch.device(args.device)
    # every checkpoint must exist, and every request be valid and fit, before any compute
    cfgs = {c: checkpoint_configs(args, c, len(prompts), device) for c in args.checkpoints}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in args.checkpoints:
        model = load_model(name, None).to(device, dtype).eval().requires_grad_(False)
        first = next(iter(cfgs[name].values()))  # the KV format apart, one run's settings
        enc = load_text_encoder(args.text_encoder, model.cfg.text_dim, device, first.text_len)
        conds = shot_conditionings([prompts], enc, model.cfg.text_dim, first)
        seeds = [args.seed + i for i in range(len(prompts))]
        latent_hw = latent_size(args.height, args.width, rope_positions=model_config(name)[1])
        for kv, cfg in cfgs[name].items():
            rows.append(
                {
                    "checkpoint": name,
                    "kv_cache": kv,
                    **evaluate_one(model, cfg, conds, args.chunks, latent_hw, seeds),
                }
            )
    write_table(rows, out)
    print(f"[vidtrain] wrote {out} and {out.with_suffix('.csv')} ({len(rows)} rows)")
    return 0


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
