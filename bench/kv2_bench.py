"""kv2 (the 2-bit KV format) against naive 2-bit RTN, NVFP4 and FP8: bytes, error, time.

    python bench/kv2_bench.py [--out runs/kv2_bench.json]

Blocks: (a) synthetic at Wan2.1-1.3B's chunk block (3 latent frames x 1560 tokens, head dim 128,
12 heads): unit Gaussian, and K-like clustered tokens (24 centroids, 4 outlier channels x8,
noise 0.3); (b) the K and V the shipped demo DiT (vidtrain/assets/demo/dit, trained on the demo
clips; head dim 16) writes into its cache while streaming 8 chunks of 8x8 latents (7 blocks of
48 tokens, each quantized as the cache would: alone). Per format:
bytes per element relative to bf16 (everything stored), the relative L2 error of the block,
and of the attention output softmax(q k^T) v over the block with the block's own queries;
quantize + dequantize seconds per block (CPU, torch reference).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_json
from kv_scale_rule_bench import dit_blocks


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def formats(tokens: int, dim: int) -> dict:
    """name -> (fake-quantize fn of [B, H, L, D], bytes per element of one block vs bf16)."""
    from vidtrain.formats import kv2, nvfp4
    from vidtrain.sample import kv_cache

    bf16 = 2 * tokens * dim
    out = {
        "kv2 (1 stage)": (lambda x: kv2.fake_quantize(x), kv2.nbytes_per_block(tokens, dim) / bf16),
        "kv2 (2 stages)": (lambda x: kv2.fake_quantize(x, stages=2), kv2.nbytes_per_block(tokens, dim, stages=2) / bf16),
    }  # fmt: skip
    for blk in (128, 64, 32, 16):
        if dim % blk == 0:
            out[f"RTN 2-bit, block {blk}"] = (
                lambda x, blk=blk: kv2.rtn2_fake_quantize(x, blk),
                kv2.rtn2_nbytes_per_block(tokens, dim, blk) / bf16,
            )
    nv_bytes = tokens * dim // 2 + tokens * dim // 16 + 4
    out["NVFP4"] = (lambda x: nvfp4.fake_quantize_kv(x, (0, 1)), nv_bytes / bf16)
    out["FP8 (e4m3)"] = (
        lambda x: kv_cache.fp8_dequantize(kv_cache.fp8_quantize_block(x), x.dtype),
        (tokens * dim + 4) / bf16,
    )
    return out


def measure(name: str, q, k, v) -> list[dict]:
    tokens, dim = k.shape[-2:]
    ref = F.scaled_dot_product_attention(q, k, v)
    rows = []
    for fmt, (fq, nbytes) in formats(tokens, dim).items():
        t0 = time.perf_counter()
        kh, vh = fq(k), fq(v)
        sec = (time.perf_counter() - t0) / 2
        out = F.scaled_dot_product_attention(q, kh, vh)
        rows.append({"blocks": name, "format": fmt, "bytes_vs_bf16": round(nbytes, 4),
                     "k_rel_l2": _rel(kh, k), "v_rel_l2": _rel(vh, v), "attn_rel_l2": _rel(out, ref),
                     "seconds_per_block": sec})  # fmt: skip
    return rows


def synthetic(kind: str, heads: int = 12, tokens: int = 3 * 1560, dim: int = 128):
    g = torch.Generator().manual_seed(0)

    def one():
        if kind == "gaussian":
            return torch.randn(1, heads, tokens, dim, generator=g)
        cent = torch.randn(1, heads, 24, dim, generator=g) * 2
        cent[..., :4] *= 8
        idx = torch.randint(0, 24, (tokens,), generator=g)
        return cent[:, :, idx] + 0.3 * torch.randn(1, heads, tokens, dim, generator=g)

    return one() / dim**0.25, one() / dim**0.25, one()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the figures here (JSON)")
    a = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for kind in ("gaussian", "clustered"):
        rows += measure(f"synthetic {kind}, 4680 x 128", *synthetic(kind))
    which, (q, k, v) = dit_blocks()  # the demo DiT's cache writes (else the random debug DiT's)
    rows += measure(f"{which} layer 0, {k.shape[0]} blocks of {k.shape[2]} tokens x {k.shape[3]}", q, k, v)
    print("| blocks | format | bytes vs bf16 | K rel L2 | V rel L2 | attention rel L2 | s / block |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['blocks']} | {r['format']} | {r['bytes_vs_bf16']:.4f} | {r['k_rel_l2']:.4f} | "
              f"{r['v_rel_l2']:.4f} | {r['attn_rel_l2']:.4f} | {r['seconds_per_block']:.4f} |")  # fmt: skip
    if a.out:
        write_json(a.out, {"rows": rows, "cpus": os.cpu_count(), "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    sys.exit(main())
