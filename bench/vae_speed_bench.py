"""Causal VAE speed against diffusers' AutoencoderKLWan (same weights, same schedule), and the
chunk-wise schedule against Wan's one-latent-frame-at-a-time one.

    python bench/vae_speed_bench.py --out runs/vae_speed_bench.json [--quick] [--reps 3]

For each configuration a random diffusers VAE is saved and loaded into ours (`from_pretrained`),
so both hold the same weights. Timed, encode and decode of one clip (B = 1, fp32, CPU threads as
torch sets them):

- `diffusers`: `AutoencoderKLWan.encode(x).latent_dist.mean` / `.decode(mu)`, its own Wan
  schedule (encode: the first frame, then 4 pixel frames per pass; decode: one latent frame per
  pass);
- `ours, Wan schedule`: `encode(x, latents_per_pass=1)` / `decode(z, latents_per_pass=1)`, the
  same schedule;
- `ours, chunk-wise`: a stream fed sampler-sized calls of `--chunk` latent frames (the first call
  1 + 4 (chunk - 1) pixel frames), each call one pass, caches carried (`stream_encoder(None)`,
  `stream_decoder(None)`);
- `ours, one pass`: the whole clip in one pass.

Time is the median of `--reps` runs after a warm-up run, the configurations interleaved per
repetition so that a change of machine load hits them alike. Errors: max abs difference of the
raw latent mean / pixels to diffusers, and of the chunk-wise and one-pass outputs to our Wan
schedule. The script uses only APIs that older checkouts have, so `PYTHONPATH=<old checkout>`
measures a baseline with the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vidtrain.models.vae import CausalVideoVAE
from vidtrain.models.vae.model import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

# name: (diffusers AutoencoderKLWan kwargs, pixel frames, height, width)
WAN22_KW = {
    "z_dim": 48, "is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12,
    "temperal_downsample": [False, True, True],
    "latents_mean": list(WAN22_LATENTS_MEAN), "latents_std": list(WAN22_LATENTS_STD),
}  # fmt: skip
CONFIGS = {
    "debug (Wan2.1 arch)": ({"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}, 33, 128, 128),
    "wan2.1": ({}, 17, 64, 64),
    "wan2.2-debug (Wan2.2 arch)": (
        {"base_dim": 8, "decoder_base_dim": 12, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1, **WAN22_KW}, 33, 128, 128,
    ),
}  # fmt: skip
QUICK = ["debug (Wan2.1 arch)"]


def _chunk_calls(latents: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, latents)) for a in range(0, latents, chunk)]


def _pixels(a: int, b: int) -> tuple[int, int]:
    """Pixel frames of latent frames [a, b): latent 0 is pixel 0, latent j >= 1 pixels 4j-3 .. 4j."""
    return (0 if a == 0 else 4 * a - 3), 4 * (b - 1) + 1


def _stream_encode(vae: CausalVideoVAE, x: torch.Tensor, chunk: int) -> torch.Tensor:
    enc = vae.stream_encoder(None)
    z = [
        enc.feed(x[:, :, slice(*_pixels(a, b))])
        for a, b in _chunk_calls(vae.num_latent_frames(x.shape[2]), chunk)
    ]
    enc.flush()
    return torch.cat(z, dim=2)


def _stream_decode(vae: CausalVideoVAE, z: torch.Tensor, chunk: int) -> torch.Tensor:
    dec = vae.stream_decoder(None)
    return torch.cat([dec.feed(z[:, :, a:b]) for a, b in _chunk_calls(z.shape[2], chunk)], dim=2)


@torch.no_grad()
def run_config(name: str, reps: int, chunk: int) -> dict:
    import diffusers

    kw, frames, h, w = CONFIGS[name]
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**kw).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = CausalVideoVAE.from_pretrained(tmp).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1
    mu = ref.encode(x).latent_dist.mean
    z = ours.normalize_latents(mu)
    encoders = {
        "diffusers": lambda: ref.encode(x).latent_dist.mean,
        "ours, Wan schedule": lambda: ours.denormalize_latents(ours.encode(x, latents_per_pass=1)),
        "ours, chunk-wise": lambda: ours.denormalize_latents(_stream_encode(ours, x, chunk)),
        "ours, one pass": lambda: ours.denormalize_latents(ours.encode(x, latents_per_pass=None)),
    }
    decoders = {
        "diffusers": lambda: ref.decode(mu).sample,
        "ours, Wan schedule": lambda: ours.decode(z, latents_per_pass=1),
        "ours, chunk-wise": lambda: _stream_decode(ours, z, chunk),
        "ours, one pass": lambda: ours.decode(z, latents_per_pass=None),
    }
    rows = []
    for op, fns in (("encode", encoders), ("decode", decoders)):
        outs = {k: f() for k, f in fns.items()}  # warm-up, and the outputs compared
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        sec = {k: statistics.median(v) for k, v in times.items()}
        for k in fns:
            rows.append({
                "config": name, "op": op, "impl": k, "clip": [frames, h, w], "seconds": sec[k],
                "pixel_frames_per_s": frames / sec[k], "time_vs_diffusers": sec[k] / sec["diffusers"],
                "speedup_vs_our_wan_schedule": sec["ours, Wan schedule"] / sec[k],
                "max_abs_err_vs_diffusers": float((outs[k] - outs["diffusers"]).abs().max()),
                "max_abs_err_vs_our_wan_schedule": float((outs[k] - outs["ours, Wan schedule"]).abs().max()),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| config | clip T×H×W | op | implementation | s per clip | time vs diffusers | vs our Wan schedule | max abs err vs diffusers | vs our Wan schedule |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        clip = "×".join(map(str, r["clip"]))
        lines.append(
            f"| {r['config']} | {clip} | {r['op']} | {r['impl']} | {r['seconds']:.3f} | {r['time_vs_diffusers']:.2f}x "
            f"| {r['speedup_vs_our_wan_schedule']:.2f}x faster | {r['max_abs_err_vs_diffusers']:.1e} "
            f"| {r['max_abs_err_vs_our_wan_schedule']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vae_speed_bench.json"))
    ap.add_argument("--quick", action="store_true", help="the debug configuration only")
    ap.add_argument("--configs", nargs="*", default=None, help=f"of: {', '.join(CONFIGS)}")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--chunk", type=int, default=3, help="latent frames per chunk-wise call (the sampler's chunk)"
    )
    args = ap.parse_args()
    names = args.configs or (QUICK if args.quick else list(CONFIGS))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in names:
        rows += run_config(name, args.reps, args.chunk)["rows"]
    load = os.getloadavg()
    hardware = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "loadavg_after": load, "vidtrain": sys.modules["vidtrain"].__file__,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=2))
    print(markdown(rows))
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
