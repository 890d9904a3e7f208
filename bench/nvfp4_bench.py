"""NVFP4 throughput: quantize, dequantize, KV quantize, fused KV dequant; the kv2 (2-bit) KV cache's
quantize and dequant beside them (torch on CPU, Triton on CUDA).

    python bench/nvfp4_bench.py --out runs/nvfp4_bench.json [--numel 4194304] [--iters 5]

GB/s counts every byte an op moves through memory, per element of a bf16 input:
  quantize (per-tensor amax)   2 (the amax pass reads x once, `kernels.abs_amax`) + 2 (the
                               kernel reads x) + 0.5625 (writes codes + e4m3 scales) = 4.5625 B
  quantize kernel (amax given) 2 + 0.5625 = 2.5625 B (the kernel alone, for comparison)
  KV quantize_blocks           as quantize, with one amax per (block, head) (the sampler's write)
  dequantize / fused KV        0.5625 (reads) + 2 (writes bf16) = 2.5625 B (the amax: 4 B a block)
  kv2 dequant                  the kv2 block's stored bytes per element (codes, RMS scales, group
                               index, bf16 centroids: 0.28 at head dim 128) + 2 (writes bf16)
  kv2 quantize                 2 (reads x once) + the stored bytes: nominal, its k-means reads the
                               block several times (torch reference: the cache's write path)
On CUDA each rate is also a fraction of the datasheet HBM peak (bench_common.DATASHEET); the
GPU suite adds the fraction of a measured device-to-device copy (bench/peaks.py). Each op is
timed over --iters calls after one warm-up (the JIT compile on CUDA), bracketed by a device
synchronize. The JSON (--out) is rewritten after every op; an op that raises is recorded with
its error and the others still run.
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_common import datasheet, time_call, write_json

from vidtrain.formats import kv2 as kv2_ref
from vidtrain.formats.nvfp4 import BYTES_PER_ELEMENT
from vidtrain.kernels import kv2 as KV2
from vidtrain.kernels import nvfp4 as K


def _hbm_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return datasheet(torch.cuda.get_device_name(device))["hbm_bytes_per_s"]


def cases(numel: int, device: torch.device, backend: str) -> dict:
    """op name -> (callable, elements, bytes moved per element)."""
    d = 128  # head_dim-like last dim
    x = torch.randn(numel // d, d, device=device, dtype=torch.bfloat16)
    amax = K.abs_amax(x)
    q = K.quantize(x, backend=backend)
    # KV: n_blocks chunk blocks [B=1, H=8, Lc, D=128] of all layers, bf16 as the sampler's
    n_blocks = 16
    lc = max(1, numel // (n_blocks * 8 * d))
    kv_x = torch.randn(n_blocks, 8, lc, d, device=device, dtype=torch.bfloat16)
    stacked = K.quantize_blocks(kv_x, (0, 1), backend)  # one amax per (block, head)
    kv_numel = kv_x.numel()
    inb = x.element_size()
    write_q = BYTES_PER_ELEMENT
    try:  # the kv2 cache's stored chunk blocks, per (block, head); a failure costs its rows only
        q2, kv2_err = kv2_ref.quantize(kv_x), None
        kv2_bpe = q2.nbytes() / kv_numel
    except Exception as e:
        q2, kv2_err, kv2_bpe = None, e, 0.0  # its rows record the error

    def kv2_dequant():
        if kv2_err is not None:
            raise kv2_err
        return KV2.dequantize(q2, torch.bfloat16, backend)

    return {
        "quantize (bf16 -> nvfp4, amax pass incl.)": (
            lambda: K.quantize(x, backend=backend), numel, inb + inb + write_q),
        "quantize kernel (bf16 -> nvfp4, amax given)": (
            lambda: K.quantize_with_amax(x, amax, backend=backend), numel, inb + write_q),
        "dequantize (nvfp4 -> bf16)": (
            lambda: K.dequantize(q, torch.bfloat16, backend), numel, BYTES_PER_ELEMENT + 2),
        f"KV quantize_blocks ({n_blocks} blocks x 8 heads, amax pass incl.)": (
            lambda: K.quantize_blocks(kv_x, (0, 1), backend), kv_numel, inb + inb + write_q),
        f"fused KV dequant ({n_blocks} blocks, 1 launch)": (
            lambda: K.dequantize_kv_blocks(stacked, torch.bfloat16, backend), kv_numel,
            BYTES_PER_ELEMENT + 2),
        f"kv2 quantize ({n_blocks} blocks x 8 heads, torch k-means)": (
            lambda: kv2_ref.quantize(kv_x), kv_numel, inb + kv2_bpe),
        f"kv2 dequant (kv2 -> bf16, {n_blocks} blocks)": (
            kv2_dequant, kv_numel, kv2_bpe + 2),
    }  # fmt: skip


def run(numel: int, iters: int, device: torch.device, backend: str, out: str | None = None) -> dict:
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"device": dev_name, "backend": K.resolve_backend(backend, device), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "hbm_peak_datasheet_bytes_per_s": _hbm_peak(device), "rows": []}  # fmt: skip
    peak = res["hbm_peak_datasheet_bytes_per_s"]
    try:
        ops = cases(numel, device, backend)
    except Exception as e:  # the inputs' quantize failed: nothing to time, but say why
        res["error"] = f"setting up the inputs: {type(e).__name__}: {e}"[:300]
        if out:
            write_json(out, res)
        return res
    for name, (fn, n, bpe) in ops.items():
        try:
            s = time_call(fn, device, iters)
        except Exception as e:  # recorded: the other ops still run
            res["rows"].append(
                {"op": name, "numel": n, "bytes_per_element": bpe, "error": f"{type(e).__name__}: {e}"[:300]}
            )
        else:
            gbs = n * bpe / s / 1e9
            res["rows"].append({"op": name, "numel": n, "bytes_per_element": bpe, "seconds": s,
                                "elements_per_s": n / s, "GB_per_s": gbs,
                                "fraction_of_hbm_peak": (gbs * 1e9 / peak) if peak else None, "error": None})  # fmt: skip
        if out:
            write_json(out, res)
    return res


def markdown(res: dict) -> str:
    lines = [
        f"NVFP4 on {res['device']} (backend {res['backend']}, {res['threads']} threads)",
        "",
        "| op | elements | Gelem/s | GB/s | of HBM peak |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['op']} | {r['numel']:,} | - | {r['error'][:60]} | - |")
            continue
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
    res = run(a.numel, a.iters, torch.device(a.device), a.backend, a.out)
    print(markdown(res))
    return res


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res.get("error") or any(r["error"] for r in res["rows"]) else 0)
