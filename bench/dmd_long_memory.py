"""Long self-rollout DMD: memory of a generator step against the rollout's length.

    python bench/dmd_long_memory.py [--frames 6,12,24,48,96] [--hw 16] [--out runs/dmd_long_memory.json]

Each rollout length N (latent frames) runs in its own process: recipes/dmd_long_debug.yaml on a
random debug teacher (saved once), one shot, the supervised window (the 6-frame clip) placed at
the END of the rollout (the worst case: every chunk before it is generated), then one DMD
generator step (rollout with the window's graph, teacher/critic scores, backward, AdamW) and one
critic step. Per N: process peak memory growth over the post-setup baseline (ru_maxrss on CPU,
torch.cuda.max_memory_allocated on CUDA), the bytes autograd saved for the backward, the KV
cache's largest size a chunk attended to, chunks generated and seconds per step. N = 6: a
rollout as long as the clip (its one window is the whole rollout). Flat figures mean memory is
constant in N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import child_timeout, write_json


def run_one(frames: int, hw: int, teacher: str) -> dict:
    import torch

    from vidtrain.config import load_recipe
    from vidtrain.distill import method as dmd_method
    from vidtrain.train.trainer import Trainer

    cuda = torch.cuda.is_available()
    repo = Path(__file__).resolve().parent.parent
    run_dir = tempfile.mkdtemp(prefix="dmd_long_mem_")
    recipe = load_recipe(
        str(repo / "recipes/dmd_long_debug.yaml"),
        [f"method.dmd.teacher={teacher}", f"run.dir={run_dir}", f"method.dmd.rollout_frames={frames}",
         "method.dmd.rollout_shots=1", f"data.height={hw}", f"data.width={hw}", "train.progress=false",
         "log.plots=false", "log.wandb=disabled", "method.dmd.generator_update_every=1", "train.max_steps=2"],
    )  # fmt: skip
    # the worst case: the window last, so every chunk of the rollout is generated
    dmd_method.window_starts = lambda n, w, count, cps, gen: [n - w * (count - i) for i in range(count)]
    tr = Trainer(recipe)
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        base_cuda = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logs = tr.method.train_step(tr, 0)  # generator + critic step
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (
            torch.cuda.max_memory_allocated() - base_cuda
            if cuda
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
        )
        stats = dict(tr.method.rollout_stats)
    finally:
        tr.close()
    return {
        "rollout_frames": frames,
        "peak_growth_bytes": peak,
        "autograd_saved_bytes": sum(saved.values()),
        "kv_bytes_peak": stats.get("kv_bytes_peak"),
        "chunks_generated": stats.get("chunks_generated", frames // 3),
        "step_s": round(seconds, 3),
        "generator_loss": logs.get("generator_loss"),
        "device": "cuda" if cuda else "cpu",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", default="6,12,24,48,96", help="rollout lengths (latent frames)")
    p.add_argument("--hw", type=int, default=16, help="latent height = width")
    p.add_argument("--timeout", type=float, default=900, help="seconds per rollout length")
    p.add_argument("--out", default=None, help="write the results as JSON here (after each length)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one length
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.hw, a.teacher)))
        return 0
    import torch

    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.models.wan.state_dict import save_vidtrain

    tmp = tempfile.mkdtemp(prefix="dmd_long_teacher_")
    torch.manual_seed(0)
    save_vidtrain(CausalWanDiT.from_flavor("debug"), Path(tmp) / "teacher")
    rows = []
    for n in [int(x) for x in a.frames.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--hw",
            str(a.hw),
            "--teacher",
            str(Path(tmp) / "teacher"),
        ]
        try:
            timeout = child_timeout(a.timeout)
            if timeout < 5:
                raise RuntimeError("skipped: the stage's time is spent")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
            if r.returncode or not lines:
                raise RuntimeError(f"exit {r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-3:]))
            rows.append(json.loads(lines[-1]))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            rows.append({"rollout_frames": n, "error": str(e)[:300]})
        if a.out:
            write_json(a.out, {"hw": a.hw, "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows})
    print(f"debug DiT, {a.hw}x{a.hw} latents, window 6 frames at the rollout's end")
    print(
        "| rollout frames | chunks generated | peak growth (MiB) | autograd saved (MiB) | KV peak (KiB) | step s |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['rollout_frames']} | {r['error'][:80]} | | | | |")
            continue
        print(
            f"| {r['rollout_frames']} | {r['chunks_generated']} | {r['peak_growth_bytes'] / 2**20:.1f} | "
            f"{r['autograd_saved_bytes'] / 2**20:.2f} | {(r['kv_bytes_peak'] or 0) / 1024:.1f} | {r['step_s']:.2f} |"
        )
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
