"""Cost of sha256 verification: latent shards (what the reader checks the first time it opens a
shard, `data.verify_shards`) and one checkpoint-sized file (what resume checks,
`train.verify_checkpoints`).

    python bench/verify_bench.py --out runs/verify_bench.json [--shard-gib 1] [--ckpt-gib 4]

Method. Shards: `--shard-gib` of latent shards written with the data tools' own writer
(samples of 16x21x60x104 float32 latents, 1.3B at 480x832, ~8 MiB each; random values, so the
tar holds incompressible bytes), then the reader's per-shard check (`check_shard`: size, then
sha256 streamed in `HASH_BLOCK` reads) timed over every shard, twice: "warm" with the files in
the page cache (hashing alone: the CPU cost) and "cold" after `posix_fadvise(DONTNEED)` evicted
each file's pages (hashing plus the disk read). The first epoch of a `LatentShardDataset`
(verify on vs off, warm) gives what verification adds to reading. Checkpoint: one `--ckpt-gib`
file of random bytes hashed warm and cold with the checkpoint code's `sha256_file`
(`vidtrain.utils.io`, falling back to the shard one), and the block sizes compared warm. Each
figure is the median of `--reps` runs; seconds per GiB = time / size. Files go to `--dir`
(default: a temp folder) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vidtrain.data import LatentShardDataset
from vidtrain.data_tools import _shards
from vidtrain.data_tools._shards import RollingShardWriter, check_shard, write_manifest

GIB = 2**30
LATENT = (16, 21, 60, 104)  # C, F, H, W of 81 frames at 480x832


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def evict(path: Path) -> None:
    """Drop one file's pages from the page cache (no root, no effect on other files)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn, reps: int, before=None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def make_shards(folder: Path, gib: float, rng: np.random.Generator) -> tuple[list[Path], int]:
    folder.mkdir(parents=True)
    sample = int(np.prod(LATENT)) * 4
    n = max(2, round(gib * GIB / sample))
    w = RollingShardWriter(folder, 0, None, 256 << 20)  # 256 MiB shards, vidtrain-shard's default size
    text = npy(rng.standard_normal((40, 4096)).astype(np.float16))
    for i in range(n):
        lat = rng.standard_normal(LATENT, dtype=np.float32)
        w.write(f"s{i:06d}", {"latents.npy": npy(lat), "text.npy": text, "json": b"{}"})
    w.close()
    write_manifest(folder, "vidtrain-latent-shards", {}, [])
    return sorted(folder.glob("shard-*.tar")), n


def bench_shards(folder: Path, gib: float, reps: int, rng: np.random.Generator) -> dict:
    shards, n = make_shards(folder, gib, rng)
    entries = json.loads((folder / "manifest.json").read_text())["shards"]
    size = sum(p.stat().st_size for p in shards)

    def verify_all() -> None:
        for p, e in zip(shards, entries):
            assert check_shard(p, e) is None

    def evict_all() -> None:
        for p in shards:
            evict(p)

    verify_all()  # page the files in
    warm = timed(verify_all, reps)
    cold = timed(verify_all, reps, before=evict_all)

    from vidtrain.data import latents as latents_mod

    def epoch(verify: bool) -> None:
        latents_mod._VERIFIED.clear()  # a fresh process: every shard hashed again
        ds = LatentShardDataset(folder, shuffle=False, shuffle_buffer=0, verify=verify)
        for i, _ in enumerate(ds):
            if i + 1 == n:
                break

    epoch(True)
    read_plain = timed(lambda: epoch(False), reps)
    read_verified = timed(lambda: epoch(True), reps)
    return {
        "shards": len(shards),
        "samples": n,
        "bytes": size,
        "verify_warm_s": warm,
        "verify_cold_s": cold,
        "verify_warm_s_per_gib": warm / (size / GIB),
        "verify_cold_s_per_gib": cold / (size / GIB),
        "epoch_read_s": read_plain,
        "epoch_read_verified_s": read_verified,
        "verify_overhead_of_epoch": read_verified / read_plain - 1.0,
    }


def bench_checkpoint(folder: Path, gib: float, reps: int, rng: np.random.Generator) -> dict:
    try:
        from vidtrain.utils.io import sha256_file as ckpt_hash

        where = "vidtrain.utils.io.sha256_file"
    except ImportError:
        ckpt_hash, where = _shards.sha256_file, "vidtrain.data_tools._shards.sha256_file"
    path = folder / "model.safetensors"
    block = rng.bytes(64 << 20)
    with open(path, "wb") as f:
        for _ in range(round(gib * GIB / len(block))):
            f.write(block)
    size = path.stat().st_size
    ckpt_hash(path)  # page in
    warm = timed(lambda: ckpt_hash(path), reps)
    cold = timed(lambda: ckpt_hash(path), reps, before=lambda: evict(path))
    blocks = {
        f"{b >> 20}MiB": timed(lambda b=b: _shards.sha256_file(path, b), reps) / (size / GIB)
        for b in (1 << 20, 4 << 20, 8 << 20)
    }
    return {
        "function": where,
        "bytes": size,
        "hash_warm_s": warm,
        "hash_cold_s": cold,
        "hash_warm_s_per_gib": warm / (size / GIB),
        "hash_cold_s_per_gib": cold / (size / GIB),
        "warm_s_per_gib_by_block": blocks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/verify_bench.json")
    p.add_argument("--shard-gib", type=float, default=1.0)
    p.add_argument("--ckpt-gib", type=float, default=4.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the test files go (default: a temp folder)")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="verify-bench-", dir=a.dir))
    rng = np.random.default_rng(0)
    try:
        shards = bench_shards(root / "shards", a.shard_gib, a.reps, rng)
        shutil.rmtree(root / "shards")
        ckpt = bench_checkpoint(root, a.ckpt_gib, a.reps, rng)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "openssl": getattr(hashlib, "openssl_version", None) or __import__("ssl").OPENSSL_VERSION,
        "hash_block": _shards.HASH_BLOCK,
        "shards": shards,
        "checkpoint": ckpt,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    s, c = shards, ckpt
    print(f"{result['cpu']}, {result['cores']} cores, {result['openssl']}")
    print(
        f"shards: {s['bytes'] / GIB:.2f} GiB in {s['shards']} shard(s): verify {s['verify_warm_s_per_gib']:.2f} s/GiB "
        f"warm, {s['verify_cold_s_per_gib']:.2f} s/GiB cold; first epoch {s['epoch_read_s']:.2f} s -> "
        f"{s['epoch_read_verified_s']:.2f} s verified (+{100 * s['verify_overhead_of_epoch']:.0f} %)"
    )
    print(
        f"checkpoint file: {c['bytes'] / GIB:.2f} GiB: sha256 {c['hash_warm_s_per_gib']:.2f} s/GiB warm, "
        f"{c['hash_cold_s_per_gib']:.2f} s/GiB cold ({c['function']}); by block (warm, s/GiB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in c["warm_s_per_gib_by_block"].items())
    )


if __name__ == "__main__":
    main()
