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

torch.compile (`SamplerConfig.compile`, `vidtrain sample --compile`): `--compile` compiles every
configuration; a third field per configuration picks it per row (`--configs bf16/sync/eager,
bf16/sync/compile`: the GPU suite's compile stage). Each row also reports the warm-up's first
chunk (`cold_first_chunk_latency_s`: a fresh process's first chunk, the compile included) and the
timed run's (lower) median per-chunk generate time past its first chunk (`steady_chunk_s`).
`--tolerate-failures` exits 0 with failed rows recorded (a CPU without a C++ compiler cannot
compile: the row says so and the stage goes on).
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


def run_one(args, kv: str, decode: str, latents_path: str, compile_: bool = False) -> dict:
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.sample.cli import load_vae
    from vidtrain.sample.decode import stream_video
    from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # built on the device: a random 5B DiT / Wan2.2 VAE fills in seconds there
        model = CausalWanDiT.from_flavor(args.flavor).to(dtype).eval().requires_grad_(False)
        vae = load_vae(args.vae, model.cfg.in_channels, device, dtype)
    cfg = SamplerConfig(
        kv_cache=kv,
        window_frames=args.window_frames,
        sink_frames=args.sink_frames,
        shot_sink=True,
        compile=compile_,
    )
    sampler = StreamingSampler(model, cfg)
    conds = [debug_text_context(["a red car on a coastal road"], model.cfg.text_dim)]
    hw = (args.height // vae.spatial_compression, args.width // vae.spatial_compression)  # latents
    # warm-up (and the compile): its first chunk is what a fresh process waits for
    cold = stream_video(sampler, conds, [2], hw, [0], vae, decode, lambda x: None)["first_chunk_latency_s"]
    m = stream_video(sampler, conds, [args.chunks], hw, [0], vae, decode, lambda x: None, keep_latents=True)
    torch.save(m.pop("_latents").float().cpu(), latents_path)
    gen = sum(r["gen_end"] - r["gen_start"] for r in m["timeline"])
    dec = sum(r["dec_end"] - r["dec_start"] for r in m["timeline"])
    keys = ("fps_end_to_end", "first_chunk_latency_s", "peak_memory_bytes", "peak_memory_kind", "kv_cache_bytes",
            "pixel_frames", "seconds_total")  # fmt: skip
    steady = sorted(r["gen_end"] - r["gen_start"] for r in m["timeline"][1:])
    return {"kv_cache": kv, "decode": decode, "compile": compile_, **{k: m[k] for k in keys}, "generate_s": gen,
            "decode_s": dec, "cold_first_chunk_latency_s": cold,
            "steady_chunk_s": steady[(len(steady) - 1) // 2] if steady else None}  # fmt: skip


def _summary(args, rows: list[dict], lat: dict) -> dict:
    """Figures over the configurations that finished (a missing one leaves its keys None)."""
    by = {(r["kv_cache"], r["decode"]): r for r in rows if not r.get("error") and not r.get("compile")}
    comp = {(r["kv_cache"], r["decode"]): r for r in rows if not r.get("error") and r.get("compile")}
    compiled_over_eager = {f"{kv}/{d}": r["fps_end_to_end"] / by[(kv, d)]["fps_end_to_end"]
                           for (kv, d), r in comp.items() if (kv, d) in by}  # fmt: skip
    for (kv, _), r in by.items():
        sync = by.get((kv, "sync"))
        r["async_over_sync_fps"] = r["fps_end_to_end"] / sync["fps_end_to_end"] if sync else None

    def vs_bf16(kv: str, decode: str) -> tuple[float | None, float | None]:
        """(KV bytes over bf16's, latent rel L2 against bf16) at one decode mode, None if missing."""
        if (kv, decode) not in by or ("bf16", decode) not in by:
            return None, None
        ratio = by[(kv, decode)]["kv_cache_bytes"] / by[("bf16", decode)]["kv_cache_bytes"]
        if (kv, decode) not in lat or ("bf16", decode) not in lat:
            return ratio, None
        a, b = lat[("bf16", decode)], lat[(kv, decode)]
        return ratio, float((a - b).norm() / a.norm())

    equal = None
    kv_ratio, rel_l2 = vs_bf16("nvfp4", "sync")
    fp8_ratio = vs_bf16("fp8", "async")[0]
    # every cache format against bf16 at the same decode mode (sync first): KV bytes, latent rel L2
    ratio_over_bf16, rel_l2_vs_bf16 = {}, {}
    for kv in dict.fromkeys(k for k, _ in by if k != "bf16"):
        for d in ("sync", "async"):
            ratio, rel = vs_bf16(kv, d)
            if ratio is not None:
                ratio_over_bf16[kv] = ratio
                if rel is not None:
                    rel_l2_vs_bf16[kv] = rel
                break
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
        "kv_bytes_ratio_over_bf16": ratio_over_bf16,
        "latent_rel_l2_vs_bf16": rel_l2_vs_bf16,
        "async_sync_frames_equal_latents": equal,
        "compiled_over_eager_fps": compiled_over_eager,
        "failed_configs": [_name(r) for r in rows if r.get("error")],
    }  # fmt: skip


def _name(r: dict) -> str:
    return f"{r['kv_cache']}/{r['decode']}" + ("/compile" if r.get("compile") else "")


def _table(rows: list[dict]) -> list[str]:
    table = [
        "| kv cache | decode | frames/s (end to end) | first chunk (s) | peak mem (MiB) | KV cache (KiB) | async/sync |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("error"):
            table.append(
                f"| {r['kv_cache']} | {_name(r)[len(r['kv_cache']) + 1 :]} | {r['error'][:60]} | - | - | - | - |"
            )
            continue
        ratio = r.get("async_over_sync_fps")
        table.append(
            f"| {r['kv_cache']} | {_name(r)[len(r['kv_cache']) + 1 :]} | {r['fps_end_to_end']:.2f} | {r['first_chunk_latency_s']:.3f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['kv_cache_bytes'] / 2**10:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} |"
        )
    return table


def _spawn(base: list[str], kv: str, decode: str, path: str, timeout: float, compile_: bool = False) -> dict:
    """One configuration in its own process: its JSON row, or the error that stopped it."""
    row = {"kv_cache": kv, "decode": decode, "compile": compile_}
    if timeout < 5:
        return {**row, "error": "skipped: the stage's time is spent"}
    cmd = [
        sys.executable,
        __file__,
        *base,
        "--one",
        f"{kv},{decode},{'compile' if compile_ else 'eager'},{path}",
    ]
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
    p.add_argument(
        "--compile", action="store_true", help="SamplerConfig(compile=True) for every configuration"
    )
    p.add_argument("--tolerate-failures", action="store_true", help="exit 0 with failed rows recorded")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        kv, decode, mode, path = args.one.split(",", 3)
        print(json.dumps(run_one(args, kv, decode, path, mode == "compile")))
        return 0
    configs = []
    for c in (c for c in args.configs.split(",") if c):
        kv, decode, *mode = c.split("/")
        if mode and mode[0] not in ("eager", "compile"):
            p.error(f"--configs {c}: the third field is eager or compile")
        configs.append((kv, decode, (mode[0] == "compile") if mode else args.compile))
    rows, lat = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = list(argv if argv is not None else sys.argv[1:])
        for kv, decode, comp in configs:
            path = os.path.join(tmp, f"{kv}_{decode}_{int(comp)}.pt")
            rows.append(_spawn(base, kv, decode, path, child_timeout(args.timeout), comp))
            if not rows[-1]["error"] and not comp:
                lat[(kv, decode)] = torch.load(path)
            summary, table = _summary(args, rows, lat), _table(rows)
            if args.out:  # after every configuration: a later failure or kill keeps what finished
                write_json(args.out, {"summary": summary, "rows": rows, "table": table})
    print(json.dumps(summary, indent=2))
    print("\n".join(table))
    return 1 if summary["failed_configs"] and not args.tolerate_failures else 0


if __name__ == "__main__":
    sys.exit(main())
