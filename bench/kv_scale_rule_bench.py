"""NVFP4 KV block-scale rules, amax against mse (`--kv-scale-rule`): error and quantize time.

    python bench/kv_scale_rule_bench.py [--out runs/kv_scale_rule_bench.json] [--tokens 1560]

Blocks [1, H, L, D], quantized as the KV cache writes one chunk block (`quantize_blocks(block,
group_dims=(0, 1))`: one amax per head, 16-element scale blocks along D): (a) synthetic at
Wan2.1-1.3B's head layout (12 heads, head dim 128, `--tokens` per block, one latent frame by
default): unit Gaussian and Student-t with 3 degrees of freedom (heavy tails); (b) the K and V
the shipped demo DiT (vidtrain/assets/demo/dit, trained on the demo clips; head dim 16) writes
into its cache while streaming 8 chunks of 8x8 latents (each block quantized alone, as the
cache does), or the random-weight debug DiT's where the demo weights are absent. Per rule: the
relative L2 error of K and of V, of the attention output softmax(q k^T / sqrt(D)) v over the
block with the block's own queries, the fraction of 16-element blocks whose scale the mse rule
moved, and the seconds of one quantize of K (torch reference, this machine, the fastest of
--reps) with the ratio mse / amax. Rows "full sweep" (every E4M3 code as the block scale, ModelOpt's exhaustive search; on a
2-head x 390-token subset, next to amax and mse on the same subset) show how much of the
reachable gain the 8 candidates take.
Bytes are the same for both rules (the layout does not change).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_json

from vidtrain.formats import nvfp4


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _full_sweep(x: torch.Tensor) -> torch.Tensor:
    """fake-quant with every E4M3 code (0..448) as a block's scale candidate, ties to amax."""
    x32 = x.float()
    amax = nvfp4.group_amax(x32, (0, 1))
    s_dec = 1.0 / nvfp4.encode_scale(amax)
    xb = x32.unflatten(-1, (-1, nvfp4.BLOCK))
    s_b = nvfp4.block_scale_e4m3(xb.abs().amax(-1), nvfp4.encode_scale(amax))
    offs = (0, *range(-nvfp4.E4M3_MAX_CODE, nvfp4.E4M3_MAX_CODE + 1))
    best = nvfp4.mse_block_scales(xb, s_b, s_dec, offsets=offs)
    enc = torch.clamp(1.0 / (best.float() * s_dec), max=nvfp4.FLT_MAX)
    code = nvfp4.e2m1_encode(torch.clamp(xb * enc.unsqueeze(-1), -6, 6)).flatten(-2)
    q = nvfp4.NVFP4Tensor(nvfp4.pack_codes(code), best, amax, x.shape, x.dtype)
    return nvfp4.dequantize(q, x.dtype)


def _time(fn, reps: int) -> float:
    """The fastest of `reps` calls (after a warm-up): the machine's CPUs are shared, the minimum
    is the least disturbed figure."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(name: str, q, k, v, reps: int = 3, sweep: bool = False) -> list[dict]:
    ref = F.scaled_dot_product_attention(q, k, v)
    rows, secs = [], {}
    for rule in nvfp4.SCALE_RULES:
        qk = nvfp4.quantize_blocks(k, (0, 1), scale_rule=rule)
        qv = nvfp4.quantize_blocks(v, (0, 1), scale_rule=rule)
        kh, vh = nvfp4.dequantize(qk, k.dtype), nvfp4.dequantize(qv, v.dtype)
        secs[rule] = _time(lambda rule=rule: nvfp4.quantize_blocks(k, (0, 1), scale_rule=rule), reps)
        moved = None
        if rule == "mse":
            qa = nvfp4.quantize_blocks(k, (0, 1))
            moved = float((qk.scales.view(torch.uint8) != qa.scales.view(torch.uint8)).float().mean())
        out = F.scaled_dot_product_attention(q, kh, vh)
        rows.append({"blocks": name, "rule": rule, "k_rel_l2": _rel(kh, k), "v_rel_l2": _rel(vh, v),
                     "attn_rel_l2": _rel(out, ref), "k_scales_moved": moved, "bytes": qk.nbytes() + qv.nbytes(),
                     "quantize_seconds": secs[rule]})  # fmt: skip
    rows[-1]["time_ratio_vs_amax"] = secs["mse"] / secs["amax"]
    if sweep:  # on the first 2 heads x 390 tokens (the exhaustive search is ~250 quantizes)
        qs, ks, vs = (t[:, :2, :390] for t in (q, k, v))
        ref_s = F.scaled_dot_product_attention(qs, ks, vs)
        for rule, fq in (
            ("amax", nvfp4.fake_quantize_kv),
            ("mse", nvfp4.fake_quantize_kv),
            ("full sweep", None),
        ):
            kh, vh = (_full_sweep(t) if fq is None else fq(t, (0, 1), rule) for t in (ks, vs))
            out = F.scaled_dot_product_attention(qs, kh, vh)
            rows.append({"blocks": f"{name} [subset: 2 heads x {ks.shape[2]} tokens]", "rule": rule,
                         "k_rel_l2": _rel(kh, ks), "v_rel_l2": _rel(vh, vs),
                         "attn_rel_l2": _rel(out, ref_s)})  # fmt: skip
    return rows


def synthetic(kind: str, heads: int, tokens: int, dim: int = 128):
    g = torch.Generator().manual_seed(0)
    t3 = torch.distributions.StudentT(torch.tensor(3.0))

    def one():
        if kind == "gaussian":
            return torch.randn(1, heads, tokens, dim, generator=g)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        return t3.sample((1, heads, tokens, dim))

    return one() / dim**0.25, one() / dim**0.25, one()


def dit_blocks(chunks: int = 8):
    """(q, k, v) [n, H, L, D]: every cache write of a DiT's first layer over a stream, stacked
    along B (each its own block). The demo DiT if its weights are here, else the debug DiT."""
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.sample import SamplerConfig, StreamingSampler
    from vidtrain.sample.kv_cache import KVCache
    from vidtrain.sample.sampler import debug_text_context

    try:
        from vidtrain.demo import DEMO_ASSETS

        model, which = CausalWanDiT.from_pretrained(str(DEMO_ASSETS / "dit")).eval(), "demo DiT"
    except (ImportError, FileNotFoundError, OSError):
        torch.manual_seed(0)
        model, which = CausalWanDiT.from_flavor("debug").eval(), "debug DiT (random weights)"
    got = []
    hook = KVCache.hook

    def spy(self, layer_idx, q, k, v, ctx):
        if self.write and layer_idx == 0:
            got.append((q.detach().float(), k.detach().float(), v.detach().float()))
        return hook(self, layer_idx, q, k, v, ctx)

    KVCache.hook = spy
    try:
        cfg = SamplerConfig(kv_cache="fp32", window_frames=6, sink_frames=3)
        cond = debug_text_context(["bigbuckbunny"], model.cfg.text_dim, length=8)
        with torch.no_grad():
            StreamingSampler(model, cfg).generate_latents([cond], [chunks], (8, 8), [0])
    finally:
        KVCache.hook = hook
    return which, [torch.cat(t, dim=0) for t in zip(*got)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write the figures here (JSON)")
    p.add_argument("--tokens", type=int, default=1560, help="tokens per synthetic block")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for kind in ("gaussian", "student_t3"):
        name = f"synthetic {kind}, {a.heads} heads x {a.tokens} x 128"
        rows += measure(name, *synthetic(kind, a.heads, a.tokens), reps=a.reps, sweep=True)
    which, (q, k, v) = dit_blocks()
    rows += measure(f"{which} layer 0, {k.shape[0]} blocks of {k.shape[1]} heads x {k.shape[2]} x {k.shape[3]}",
                    q, k, v, reps=a.reps, sweep=True)  # fmt: skip
    print(
        "| blocks | rule | K rel L2 | V rel L2 | attention rel L2 | K scales moved | quantize s | mse/amax time |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        moved = "" if r.get("k_scales_moved") is None else f"{r['k_scales_moved']:.1%}"
        secs = f"{r['quantize_seconds']:.4f}" if "quantize_seconds" in r else ""
        ratio = f"{r['time_ratio_vs_amax']:.1f}x" if "time_ratio_vs_amax" in r else ""
        print(f"| {r['blocks']} | {r['rule']} | {r['k_rel_l2']:.4f} | {r['v_rel_l2']:.4f} | "
              f"{r['attn_rel_l2']:.4f} | {moved} | {secs} | {ratio} |")  # fmt: skip
    if a.out:
        env = {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        }
        write_json(a.out, {"rows": rows, **env})
    return 0


if __name__ == "__main__":
    sys.exit(main())
