"""Streaming sampler benchmark: KV cache bf16 vs nvfp4 (fp8 on request), VAE decode sync vs async.

    python bench/sample_bench.py --out bench_sample.json            # debug flavor (CPU or GPU)
    python bench/sample_bench.py --flavor 1.3B --height 480 --width 832 --vae wan2.1   # GPU

Random-initialised weights (speed and memory do not depend on them). 4 steps, chunk 3, window
+ global sink + shot sink. Each configuration runs in its own process after one warm-up chunk
loop, so the CPU peak (process peak RSS) belongs to it alone; on CUDA the peak is torch's max
allocated. Writes JSON (--out) after every configuration, so a failure or a kill keeps what
finished (a configuration that fails or runs past --timeout, or past the GPU suite's stage
deadline, is recorded with its error and the next one runs); prints a Markdown table; also
reports the nvfp4/bf16 KV bytes ratio and the relative L2 difference of the latents (same seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from bench_common import child_timeout, write_json

# run order: the plain bf16 cache first (the headline, comparable to published sampler FPS)
# (the FP8 cache, e4m3 with a per-head scale per block, is a row on request: --configs ...,fp8/async;
# the GPU suite's stage budget and tests/test_gpu_suite_smoke.py fix the default rows)
CONFIGS = [("bf16", "sync"), ("nvfp4", "sync"), ("bf16", "async"), ("nvfp4", "async")]


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


def _summary(args, rows: list[dict], lat: dict) -> dict:
    """Figures over the configurations that finished (a missing one leaves its keys None)."""
    by = {(r["kv_cache"], r["decode"]): r for r in rows if not r.get("error")}
    for (kv, _), r in by.items():
        sync = by.get((kv, "sync"))
        r["async_over_sync_fps"] = r["fps_end_to_end"] / sync["fps_end_to_end"] if sync else None
    kv_ratio = rel_l2 = equal = None
    if ("nvfp4", "sync") in by and ("bf16", "sync") in by:
        kv_ratio = by[("nvfp4", "sync")]["kv_cache_bytes"] / by[("bf16", "sync")]["kv_cache_bytes"]
    if ("bf16", "sync") in lat and ("nvfp4", "sync") in lat:
        a, b = lat[("bf16", "sync")], lat[("nvfp4", "sync")]
        rel_l2 = float((a - b).norm() / a.norm())
    fp8_ratio = None
    if ("fp8", "async") in by and ("bf16", "async") in by:
        fp8_ratio = by[("fp8", "async")]["kv_cache_bytes"] / by[("bf16", "async")]["kv_cache_bytes"]
    if ("bf16", "sync") in lat and ("bf16", "async") in lat:
        equal = bool(torch.equal(lat[("bf16", "sync")], lat[("bf16", "async")]))
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "flavor": args.flavor, "vae": args.vae, "height": args.height, "width": args.width, "chunks": args.chunks,
        "window_frames": args.window_frames, "sink_frames": args.sink_frames,
        "kv_bytes_ratio_nvfp4_over_bf16": kv_ratio,
        "latent_rel_l2_nvfp4_vs_bf16": rel_l2,
        "kv_bytes_ratio_fp8_over_bf16": fp8_ratio,
        "async_sync_frames_equal_latents": equal,
        "failed_configs": [f"{r['kv_cache']}/{r['decode']}" for r in rows if r.get("error")],
    }  # fmt: skip


def _table(rows: list[dict]) -> list[str]:
    table = [
        "| kv cache | decode | frames/s (end to end) | first chunk (s) | peak mem (MiB) | KV cache (KiB) | async/sync |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            table.append(f"| {r['kv_cache']} | {r['decode']} | {r['error'][:60]} | - | - | - | - |")
            continue
        ratio = r.get("async_over_sync_fps")
        table.append(
            f"| {r['kv_cache']} | {r['decode']} | {r['fps_end_to_end']:.2f} | {r['first_chunk_latency_s']:.3f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['kv_cache_bytes'] / 2**10:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    return table


def _spawn(base: list[str], kv: str, decode: str, path: str, timeout: float) -> dict:
    """One configuration in its own process: its JSON row, or the error that stopped it."""
    row = {"kv_cache": kv, "decode": decode}
    if timeout < 5:
        return {**row, "error": "skipped: the stage's time is spent"}
    cmd = [sys.executable, __file__, *base, "--one", f"{kv},{decode},{path}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        sys.stderr.write(res.stderr[-4000:])
        return {**row, "error": f"exit {res.returncode}: " + " | ".join(tail)}
    return {**json.loads(lines[-1]), "error": None}


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
    p.add_argument("--configs", default=",".join(f"{k}/{d}" for k, d in CONFIGS),
                   help="kv/decode pairs in run order (default: %(default)s)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        kv, decode, path = args.one.split(",")
        print(json.dumps(run_one(args, kv, decode, path)))
        return 0
    configs = [tuple(c.split("/")) for c in args.configs.split(",") if c]
    rows, lat = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = list(argv if argv is not None else sys.argv[1:])
        for kv, decode in configs:
            path = os.path.join(tmp, f"{kv}_{decode}.pt")
            rows.append(_spawn(base, kv, decode, path, child_timeout(args.timeout)))
            if not rows[-1]["error"]:
                lat[(kv, decode)] = torch.load(path)
            summary, table = _summary(args, rows, lat), _table(rows)
            if args.out:  # after every configuration: a later failure or kill keeps what finished
                write_json(args.out, {"summary": summary, "rows": rows, "table": table})
    print(json.dumps(summary, indent=2))
    print("\n".join(table))
    return 1 if summary["failed_configs"] else 0


if __name__ == "__main__":
    sys.exit(main())
