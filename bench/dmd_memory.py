"""Peak memory of DMD's one-base/LoRA-roles setup vs three full model copies.

    python bench/dmd_memory.py [--dim 512 --layers 8 --rank 16]

Each variant runs in its own process: build the roles, then one generator step and one critic
step (forward, backward, AdamW step) on a small latent video. Peak = ru_maxrss growth over the
process's post-import baseline (CPU) or torch.cuda.max_memory_allocated (CUDA).
  lora:  one base (teacher = adapters off) + `dmd` and `critic` LoRA adapters, AdamW on adapters
  full:  teacher, generator and critic as three full models, AdamW on generator and critic
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from bench_common import child_timeout, write_json


def run_variant(variant: str, dim: int, layers: int, rank: int) -> dict:
    import torch

    from vidtrain.distill.rollout import tf_velocity
    from vidtrain.lora import roles as lora
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.tokens import MaskRule

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kw = dict(dim=dim, num_heads=dim // 64, num_layers=layers, ffn_dim=dim * 3, text_dim=64, freq_dim=64)
    x = torch.randn(1, 16, 6, 8, 8, device=dev)
    text = torch.randn(1, 8, 64, device=dev)
    sigma = torch.full((1, 6), 0.5, device=dev)
    rule = MaskRule("teacher_forcing", 3)

    def step(model, opt):
        v = tf_velocity(model, x, torch.randn_like(x), sigma, text, rule)
        v.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if variant == "lora":
        model = lora.add_roles(
            CausalWanDiT.from_flavor("debug", **kw), rank, rank, ["q", "k", "v", "o", "ffn.0", "ffn.2"]
        )
        model.to(dev)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        with torch.no_grad(), lora.use_role(model, None):
            tf_velocity(model, x, torch.randn_like(x), sigma, text, rule)
        for role in ("dmd", "critic"):
            with lora.use_role(model, role):
                step(model, opt)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        teacher, gen, critic = (CausalWanDiT.from_flavor("debug", **kw).to(dev) for _ in range(3))
        teacher.requires_grad_(False)
        with torch.no_grad():
            tf_velocity(teacher, x, torch.randn_like(x), sigma, text, rule)
        for m in (gen, critic):
            step(m, torch.optim.AdamW(m.parameters(), lr=1e-4))
        trainable = sum(p.numel() for m in (gen, critic) for p in m.parameters())
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    )
    base_params = sum(p.numel() for p in CausalWanDiT.from_flavor("debug", **kw).parameters())
    return {"variant": variant, "peak_bytes": peak, "trainable_params": trainable, "base_params": base_params,
            "device": "cuda" if cuda else "cpu"}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--variant", choices=["lora", "full"])
    p.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    p.add_argument("--out", default=None, help="write the results as JSON here (after each variant)")
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.dim, a.layers, a.rank)))
        return 0
    cfg = {"dim": a.dim, "layers": a.layers, "rank": a.rank}
    res: dict = {}
    for v in ("lora", "full"):
        cmd = [sys.executable, __file__, "--variant", v, "--dim", str(a.dim), "--layers", str(a.layers),
               "--rank", str(a.rank)]  # fmt: skip
        timeout = child_timeout(a.timeout)
        try:
            if timeout < 5:
                raise RuntimeError("skipped: the stage's time is spent")
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
            if r.returncode or not lines:
                raise RuntimeError(f"exit {r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-3:]))
            res[v] = json.loads(lines[-1])
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            res[v] = {"variant": v, "error": str(e)[:300]}
        ok = all("peak_bytes" in res.get(k, {}) for k in ("lora", "full"))
        ratio = res["lora"]["peak_bytes"] / res["full"]["peak_bytes"] if ok else None
        if a.out:
            write_json(a.out, {**cfg, "lora_over_full_peak": ratio, **res})
    base = next((r["base_params"] / 1e6 for r in res.values() if "base_params" in r), float("nan"))
    print(f"model: dim {a.dim}, {a.layers} layers, {base:.1f}M params; LoRA rank {a.rank}")
    print("| setup | peak memory (MiB) | trainable params |")
    print("|---|---|---|")
    for v in ("lora", "full"):
        r = res[v]
        if "error" in r:
            print(f"| {v} | {r['error'][:60]} | - |")
        else:
            print(f"| {v} | {r['peak_bytes'] / 2**20:.1f} | {r['trainable_params'] / 1e6:.2f}M |")
    if ratio is None:
        return 1
    print(
        f"lora / full peak memory: {ratio:.2f}x on {res['lora']['device']} (LongLive reports 0.69x with NVFP4+LoRA)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
