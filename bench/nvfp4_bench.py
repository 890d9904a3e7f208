"""NVFP4 throughput: quantize, dequantize, fused KV dequant (torch on CPU, Triton on CUDA).

    python bench/nvfp4_bench.py --out runs/nvfp4_bench.json [--numel 4194304] [--iters 5]

Bytes moved per element: quantize reads 2 B (bf16) and writes 0.5625 B; dequantize to bf16
reads 0.5625 B and writes 2 B. On CUDA the bandwidth is also given as a fraction of HBM peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vidtrain.kernels import nvfp4 as K
from vidtrain.quant.nvfp4 import BYTES_PER_ELEMENT

HBM_PEAK_TBS = {"H100": 3.35, "H200": 4.8}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, iters: int) -> float:
    fn()  # warm-up (and JIT compile on CUDA)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in HBM_PEAK_TBS.items() if k in name), None)


def run(numel: int, iters: int, device: torch.device, backend: str) -> dict:
    d = 128  # head_dim-like last dim
    x = torch.randn(numel // d, d, device=device, dtype=torch.bfloat16)
    q = K.quantize(x, backend=backend)
    # KV: n_blocks chunk blocks [B=1, H=8, Lc, D=128] from all layers, one launch
    n_blocks = 16
    lc = max(1, numel // (n_blocks * 8 * d))
    kv = [K.quantize_blocks(torch.randn(1, 8, lc, d, device=device), (0,), backend) for _ in range(n_blocks)]
    stacked = K.stack_blocks(kv)
    kv_numel = n_blocks * 8 * lc * d
    cases = {
        "quantize (bf16 -> nvfp4)": (lambda: K.quantize(x, backend=backend), numel, 2 + BYTES_PER_ELEMENT),
        "dequantize (nvfp4 -> bf16)": (
            lambda: K.dequantize(q, torch.bfloat16, backend),
            numel,
            BYTES_PER_ELEMENT + 2,
        ),
        f"fused KV dequant ({n_blocks} blocks, 1 launch)": (
            lambda: K.dequantize_kv_blocks(stacked, torch.bfloat16, backend),
            kv_numel,
            BYTES_PER_ELEMENT + 2,
        ),
    }
    peak = _peak(device)
    rows = []
    for name, (fn, n, bpe) in cases.items():
        s = _time(fn, device, iters)
        gbs = n * bpe / s / 1e9
        rows.append(
            {
                "op": name,
                "numel": n,
                "seconds": s,
                "elements_per_s": n / s,
                "GB_per_s": gbs,
                "fraction_of_hbm_peak": (gbs * 1e9 / peak) if peak else None,
            }
        )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": dev_name, "backend": backend, "threads": torch.get_num_threads(), "rows": rows}


def markdown(res: dict) -> str:
    lines = [
        f"NVFP4 on {res['device']} (backend {res['backend']}, {res['threads']} threads)",
        "",
        "| op | elements | Gelem/s | GB/s | of HBM peak |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        frac = f"{r['fraction_of_hbm_peak']:.1%}" if r["fraction_of_hbm_peak"] is not None else "-"
        lines.append(
            f"| {r['op']} | {r['numel']:,} | {r['elements_per_s'] / 1e9:.3f} | {r['GB_per_s']:.2f} | {frac} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=1 << 22)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=K.BACKENDS)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    res = run(a.numel, a.iters, torch.device(a.device), a.backend)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
