"""Achievable peaks of this device, measured: a bf16 GEMM (TFLOP/s) and a device-to-device copy (GB/s).

    python bench/peaks.py --out runs/peaks.json                      # CUDA: 8192^3 GEMM, 2 GiB copy
    python bench/peaks.py --gemm-n 256 --copy-mib 16 --out peaks.json   # CPU dry run (fp32 GEMM)

MFU and HBM fractions quoted against datasheet peaks alone flatter nothing and explain little:
the bf16 matrix rate reached on random data is lower than the datasheet's (on an H200 here about
790 TFLOP/s against 989), and so is a copy's bandwidth (about 4.3 of 4.8 TB/s). The suite runs
this first and quotes every fraction against both.

Method. GEMM: C = A @ B with A, B [n, n] drawn from a normal distribution (zeros run faster), bf16
on CUDA (fp32 on CPU, where bf16 is no reference), 2 n^3 FLOPs each. Copy: dst.copy_(src) of
--copy-mib MiB, counting bytes read + written (2x the size). Each is run for --warmup-s seconds
first (the clocks rise from idle), then --reps timed batches of --iters calls (CUDA events on
CUDA, perf_counter on CPU); reported: the best batch (the achievable peak) and the median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from bench_common import datasheet, write_json


def _timer(device: torch.device):
    if device.type == "cuda":

        def run(fn, iters: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

    else:

        def run(fn, iters: int) -> float:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return time.perf_counter() - t0

    return run


def _measure(fn, work: float, device: torch.device, iters: int, reps: int, warmup_s: float) -> dict:
    """`work` units (FLOPs or bytes) per call -> best and median rate over `reps` batches."""
    run = _timer(device)
    t_end = time.perf_counter() + warmup_s
    run(fn, 1)
    while time.perf_counter() < t_end:
        run(fn, iters)
    rates = [work * iters / run(fn, iters) for _ in range(reps)]
    return {"best": max(rates), "median": statistics.median(rates), "all": rates}


def measure(device: torch.device, gemm_n: int, copy_mib: int, iters: int, reps: int, warmup_s: float) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype, generator=g)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=dtype, generator=g)
    out = torch.empty_like(a)
    gemm = _measure(lambda: torch.matmul(a, b, out=out), 2 * gemm_n**3, device, iters, reps, warmup_s)
    n_bytes = copy_mib * 2**20
    src = torch.randint(0, 255, (n_bytes,), device=device, dtype=torch.uint8, generator=g)
    dst = torch.empty_like(src)
    copy = _measure(lambda: dst.copy_(src), 2 * n_bytes, device, iters, reps, warmup_s)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    sheet = datasheet(name) if cuda else datasheet("")
    return {
        "device": name,
        "torch": torch.__version__,
        "method": {
            "gemm_n": gemm_n,
            "gemm_dtype": str(dtype).removeprefix("torch."),
            "copy_bytes": n_bytes,
            "iters": iters,
            "reps": reps,
            "warmup_s": warmup_s,
        },
        "gemm_flops": gemm["best"],
        "gemm_flops_median": gemm["median"],
        "copy_bytes_per_s": copy["best"],
        "copy_bytes_per_s_median": copy["median"],
        "datasheet": sheet,
        "gemm_over_datasheet": gemm["best"] / sheet["bf16_flops"] if sheet["bf16_flops"] else None,
        "copy_over_datasheet": copy["best"] / sheet["hbm_bytes_per_s"] if sheet["hbm_bytes_per_s"] else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gemm-n", type=int, default=8192)
    p.add_argument("--copy-mib", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    res = measure(torch.device(a.device), a.gemm_n, a.copy_mib, a.iters, a.reps, a.warmup_s)
    if a.out:
        write_json(a.out, res)
    g, c, d = res["gemm_flops"], res["copy_bytes_per_s"], res["datasheet"]
    print(f"{res['device']}: {res['method']['gemm_dtype']} GEMM {a.gemm_n}^3 {g / 1e12:.1f} TFLOP/s "
          f"(median {res['gemm_flops_median'] / 1e12:.1f}); copy {c / 1e9:.0f} GB/s "
          f"(median {res['copy_bytes_per_s_median'] / 1e9:.0f}); datasheet "
          f"{d['bf16_flops'] / 1e12 if d['bf16_flops'] else float('nan'):.0f} TFLOP/s, "
          f"{d['hbm_bytes_per_s'] / 1e9 if d['hbm_bytes_per_s'] else float('nan'):.0f} GB/s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
