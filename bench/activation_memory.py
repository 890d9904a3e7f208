"""Activation memory a DiT block keeps for backward: AdaLN modulation per frame vs per token.

  python bench/activation_memory.py [--flavor 1.3B --frames 3 --height 240 --width 416]

One block of the flavor's width (weights random), a teacher-forcing sequence (clean + noisy
copies, per-frame timesteps, chunk-causal mask), forward in fp32 (or autocast bf16, `--bf16`) with autograd recording. Bytes
are counted exactly with `torch.autograd.graph.saved_tensors_hooks` (distinct storages the graph
keeps for backward), not timed, so the figure is the same on any machine. "per token" forces the
old path (one modulation row gathered per token, [B, L, 6, D] fp32); "per frame" is what the
model does (one row per run of tokens sharing a timestep, broadcast).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import vidtrain.models.wan.model as wan_model
from vidtrain.forcing.teacher import build_tf_sequence
from vidtrain.models.wan import CausalWanDiT
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.tokens import MaskRule


def saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="1.3B")
    p.add_argument("--frames", type=int, default=3, help="latent frames (one chunk of 3)")
    p.add_argument("--height", type=int, default=240, help="pixels")
    p.add_argument("--width", type=int, default=416, help="pixels")
    p.add_argument("--bf16", action="store_true", help="autocast bf16 (the trainer's mixed precision)")
    p.add_argument("--json", default="runs/activation_memory.json")
    a = p.parse_args()
    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor(a.flavor, "sdpa", num_layers=1)
    cfg = model.cfg
    h, w = a.height // 8, a.width // 8
    x0 = torch.randn(1, cfg.in_channels, a.frames, h, w)
    sigma = torch.rand(1, a.frames)
    seq = build_tf_sequence(x0, torch.randn_like(x0), sigma, 3)
    text = torch.randn(1, 64, cfg.text_dim)
    attn = AttentionContext(rule=MaskRule("teacher_forcing", 3), meta=seq.meta)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=a.bf16):
            model(seq.x_BLP, seq.t_BL, text, meta=seq.meta, attn=attn)

    rows = []
    runs = wan_model.timestep_runs
    for name, fn in (("per token (old)", lambda inv: 1), ("per frame", runs)):
        wan_model.timestep_runs = fn
        try:
            rows.append({"modulation": name, "saved_bytes": saved_bytes(step)})
        finally:
            wan_model.timestep_runs = runs
    n_tok = seq.x_BLP.shape[1]
    print(f"{a.flavor} block (dim {cfg.dim}, ffn {cfg.ffn_dim}), {n_tok} tokens ({a.frames} frames x 2 copies "
          f"at {a.height}x{a.width}), {'autocast bf16' if a.bf16 else 'fp32'}\n")  # fmt: skip
    print("| modulation | saved for backward per block (MiB) | per token (KiB) |")
    print("|---|---|---|")
    for r in rows:
        print(
            f"| {r['modulation']} | {r['saved_bytes'] / 2**20:.1f} | {r['saved_bytes'] / n_tok / 1024:.1f} |"
        )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"tokens": n_tok, "bf16": a.bf16, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
