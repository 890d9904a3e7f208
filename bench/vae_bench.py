"""Causal video VAE on CPU: encode throughput and peak memory (one pass, Wan's schedule, streaming),
and the error of `encode_range` against the single-pass encode as the halo shrinks.

    python bench/vae_bench.py --out runs/vae_bench.json [--quick]

Memory method: every (flavor, clip, mode) runs in a fresh Python process with glibc's mmap
threshold fixed at 128 KiB (freed tensors go back to the OS, so RSS follows live tensors). After the
model is built and a tiny warm-up encode has paged in the kernels, the kernel's peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`, Linux) and VmHWM is read
after one encode: "peak MiB" is that high-water mark minus the RSS at the reset, i.e. the input
video, activations, caches and output of one encode (torch's CPU allocations are plain malloc, which
tracemalloc does not see). Where clear_refs is refused, ru_maxrss is used and the column may
include earlier peaks. Time: the memory run doubles as warm-up, then the median of --reps runs.
Weights are random (no real checkpoint here): speed and memory do not depend on them, but the halo
errors of a trained VAE will differ (the receptive field does not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vidtrain.models.vae import CausalVideoVAE

MODES = ("one_pass", "wan_schedule", "stream")
CLIPS = [("debug", 33, 128, 3), ("wan2.1", 17, 64, 1)]  # flavor, frames, size, timed reps
QUICK_CLIPS = [("debug", 17, 64, 2)]
HALO_CLIPS = [("debug", 16), ("wan2.1", 16)]  # flavor, size; frames = receptive field + 2 chunks


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _frames(t0: int, n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + t0)
    return torch.rand(1, 3, n, size, size, generator=g) * 2 - 1


def _run_mode(vae: CausalVideoVAE, mode: str, frames: int, size: int) -> torch.Tensor:
    """One encode; the stream mode never holds the whole video (frames are made per feed)."""
    if mode == "stream":
        enc, t, parts = vae.stream_encoder(), 0, []
        while t < frames:
            n = 1 if t == 0 else 4
            parts.append(enc.feed(_frames(t, n, size)))
            t += n
        enc.flush()
        return torch.cat(parts, dim=2)
    video = torch.cat([_frames(0, 1, size)] + [_frames(t, 4, size) for t in range(1, frames, 4)], dim=2)
    return vae.encode(video, latents_per_pass=None if mode == "one_pass" else 1)


@torch.no_grad()
def worker(spec: dict) -> dict:
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor(spec["flavor"]).eval()
    _run_mode(vae, spec["mode"], 5, 16)  # page in kernels and libraries before measuring
    exact = _reset_peak()
    rss0 = _status_kib("VmRSS") if exact else 0
    t0 = time.perf_counter()
    z = _run_mode(vae, spec["mode"], spec["frames"], spec["size"])
    first = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM") - rss0 if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        _run_mode(vae, spec["mode"], spec["frames"], spec["size"])
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times) if times else first
    return {
        **spec,
        "latent_shape": list(z.shape),
        "seconds": sec,
        "frames_per_s": spec["frames"] / sec,
        "peak_mib": peak_kib / 1024,
        "peak_method": "VmHWM-after-clear_refs" if exact else "ru_maxrss",
        "checksum": float(z.double().abs().sum()),
    }


def _spawn(spec: dict) -> dict:
    # a fixed mmap threshold returns freed activations to the OS, so RSS follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@torch.no_grad()
def halo_errors(flavor: str, size: int) -> list[dict]:
    """Max |encode_range - encode| over the last 2 latent frames for halos 0 .. receptive field."""
    torch.manual_seed(0)
    vae = CausalVideoVAE.from_flavor(flavor).eval()
    rf = vae.temporal_receptive_field()
    n_lat = rf + 3
    video = _frames(0, 1 + 4 * (n_lat - 1), size)
    full = vae.encode(video)
    start, end = n_lat - 2, n_lat
    ref = full[:, :, start:end]
    halos = sorted({0, 1, 2, 4, 8, rf // 2, rf - 2, rf - 1, rf, rf + 1} & set(range(rf + 2)))
    rows = []
    for h in halos:
        err = (vae.encode_range(video, start, end, h) - ref).abs().max().item()
        rows.append({"flavor": flavor, "size": size, "frames": video.shape[2], "receptive_field": rf})
        rows[-1] |= {"halo": h, "max_abs_err": err, "rel_err": err / ref.abs().max().item()}
    return rows


def markdown(result: dict) -> str:
    lines = [
        "| flavor | clip T×H×W | mode | pixel frames/s | s per clip | peak MiB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in result["encode"]:
        clip = f"{r['frames']}×{r['size']}×{r['size']}"
        lines.append(
            f"| {r['flavor']} | {clip} | {r['mode']} | {r['frames_per_s']:.2f} | {r['seconds']:.3f} "
            f"| {r['peak_mib']:.1f} |"
        )
    lines += ["", "| flavor | clip T×H×W | receptive field (latents) | halo | max abs err | rel err |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for r in result["halo_error"]:
        clip = f"{r['frames']}×{r['size']}×{r['size']}"
        lines.append(
            f"| {r['flavor']} | {clip} | {r['receptive_field']} | {r['halo']} | {r['max_abs_err']:.2e} "
            f"| {r['rel_err']:.2e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/vae_bench.json"))
    ap.add_argument("--quick", action="store_true", help="debug flavor only, small clips")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    clips = QUICK_CLIPS if args.quick else CLIPS
    rows = [
        _spawn({"flavor": f, "frames": t, "size": s, "reps": reps, "mode": m})
        for f, t, s, reps in clips
        for m in MODES
    ]
    halo = [r for f, s in (HALO_CLIPS[:1] if args.quick else HALO_CLIPS) for r in halo_errors(f, s)]
    hardware = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    result = {"hardware": hardware, "encode": rows, "halo_error": halo}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
