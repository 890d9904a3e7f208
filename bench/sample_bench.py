"""Streaming sampler benchmark: KV cache bf16 vs nvfp4, VAE decode sync vs async.

    python bench/sample_bench.py --out bench_sample.json            # debug flavor (CPU or GPU)
    python bench/sample_bench.py --flavor 1.3B --height 480 --width 832 --vae wan2.1   # GPU

Random-initialised weights (speed and memory do not depend on them). 4 steps, chunk 3, window
+ global sink + shot sink. Each configuration runs in its own process after one warm-up chunk
loop, so the CPU peak (process peak RSS) belongs to it alone; on CUDA the peak is torch's max
allocated. Writes JSON (--out) and prints a Markdown table; also reports the nvfp4/bf16 KV
bytes ratio and the relative L2 difference of the latents (same seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIGS = [("bf16", "sync"), ("bf16", "async"), ("nvfp4", "sync"), ("nvfp4", "async")]


def run_one(args, kv: str, decode: str, latents_path: str) -> dict:
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.sample.cli import load_vae
    from vidtrain.sample.decode import stream_video
    from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanDiT.from_flavor(args.flavor).to(dtype).eval().requires_grad_(False)
    vae = load_vae(args.vae, model.cfg.in_channels, device, dtype)
    cfg = SamplerConfig(
        kv_cache=kv, window_frames=args.window_frames, sink_frames=args.sink_frames, shot_sink=True
    )
    sampler = StreamingSampler(model, cfg)
    conds = [debug_text_context(["a red car on a coastal road"], model.cfg.text_dim)]
    hw = (args.height // 8, args.width // 8)
    stream_video(sampler, conds, [2], hw, [0], vae, decode, lambda x: None)  # warm-up
    m = stream_video(sampler, conds, [args.chunks], hw, [0], vae, decode, lambda x: None, keep_latents=True)
    torch.save(m.pop("_latents").float().cpu(), latents_path)
    gen = sum(r["gen_end"] - r["gen_start"] for r in m["timeline"])
    dec = sum(r["dec_end"] - r["dec_start"] for r in m["timeline"])
    keys = ("fps_end_to_end", "first_chunk_latency_s", "peak_memory_bytes", "peak_memory_kind", "kv_cache_bytes",
            "pixel_frames", "seconds_total")  # fmt: skip
    return {"kv_cache": kv, "decode": decode, **{k: m[k] for k in keys}, "generate_s": gen, "decode_s": dec}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="debug")
    p.add_argument("--vae", default="debug")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--window-frames", type=int, default=6)
    p.add_argument("--sink-frames", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        kv, decode, path = args.one.split(",")
        print(json.dumps(run_one(args, kv, decode, path)))
        return 0
    rows, lat = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = [a for a in (argv if argv is not None else sys.argv[1:])]
        for kv, decode in CONFIGS:
            path = os.path.join(tmp, f"{kv}_{decode}.pt")
            cmd = [sys.executable, __file__, *base, "--one", f"{kv},{decode},{path}"]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                sys.stderr.write(res.stderr)
                return res.returncode
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            lat[(kv, decode)] = torch.load(path)
    by = {(r["kv_cache"], r["decode"]): r for r in rows}
    for r in rows:
        r["async_over_sync_fps"] = r["fps_end_to_end"] / by[(r["kv_cache"], "sync")]["fps_end_to_end"]
    a, b = lat[("bf16", "sync")], lat[("nvfp4", "sync")]
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "flavor": args.flavor, "vae": args.vae, "height": args.height, "width": args.width, "chunks": args.chunks,
        "window_frames": args.window_frames, "sink_frames": args.sink_frames,
        "kv_bytes_ratio_nvfp4_over_bf16": by[("nvfp4", "sync")]["kv_cache_bytes"] / by[("bf16", "sync")]["kv_cache_bytes"],
        "latent_rel_l2_nvfp4_vs_bf16": float((a - b).norm() / a.norm()),
        "async_sync_frames_equal_latents": bool(torch.equal(lat[("bf16", "sync")], lat[("bf16", "async")])),
    }  # fmt: skip
    table = [
        "| kv cache | decode | frames/s (end to end) | first chunk (s) | peak mem (MiB) | KV cache (KiB) | async/sync |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['kv_cache']} | {r['decode']} | {r['fps_end_to_end']:.2f} | {r['first_chunk_latency_s']:.3f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['kv_cache_bytes'] / 2**10:.1f} | {r['async_over_sync_fps']:.2f} |"
        )
    print(json.dumps(summary, indent=2))
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"summary": summary, "rows": rows, "table": table}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
