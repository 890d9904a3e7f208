"""What the benchmarks share: datasheet peaks by device name, atomic JSON writes, a stage deadline.

The scripts run as `python bench/NAME.py`, so this file's folder is on sys.path and
`import bench_common` finds it. It imports nothing heavy (the suite's report reads it too).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

# Vendor datasheet figures (dense, no sparsity), matched against the device name in this order:
# (substring, bf16 tensor-core FLOP/s, HBM bytes/s). They are ceilings nobody reaches; the suite
# also measures achievable ones (bench/peaks.py) and quotes both.
DATASHEET = [
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12, 4.8e12),
    ("A100", 312e12, 2.039e12),
]


def datasheet(device_name: str) -> dict:
    """{"match", "bf16_flops", "hbm_bytes_per_s"} for a CUDA device name (all None if unknown)."""
    for key, flops, hbm in DATASHEET:
        if key in device_name:
            return {"match": key, "bf16_flops": flops, "hbm_bytes_per_s": hbm}
    return {"match": None, "bf16_flops": None, "hbm_bytes_per_s": None}


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON through a temporary file and a rename: a reader (or a kill) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seconds_left(default: float = float("inf")) -> float:
    """Seconds until the suite's stage deadline (env BENCH_DEADLINE, epoch seconds), else `default`.

    gpu_suite.sh sets it a few seconds before the stage's own `timeout`, so a bench that spawns
    one process per configuration can cap each child and still write its JSON before the kill.
    """
    deadline = os.environ.get("BENCH_DEADLINE")
    return float(deadline) - time.time() if deadline else default


def child_timeout(per_child: float, reserve: float = 3.0) -> float:
    """The timeout for the next child process: its own limit, capped by the stage deadline."""
    return min(per_child, seconds_left() - reserve)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the figures' hardware line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device) -> None:
    """Wait for a CUDA device's queued work (a no-op elsewhere), before reading a clock."""
    import torch  # lazy: the report tools import this module without needing torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, iters: int) -> float:
    """Seconds per call of `fn` over `iters` calls, after one warm-up call (heuristics, JIT)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters
