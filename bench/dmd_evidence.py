"""Does DMD bring the few-step generator closer to the teacher's many-step samples? (debug model, CPU)

    python bench/dmd_evidence.py [--out runs/dmd_evidence] [--teacher-steps 150 --dmd-steps 60]

1. teacher: the debug DiT trained with teacher forcing on a few synthetic latents;
2. reference: the teacher's 24-step Euler samples with CFG (chunk by chunk, causal);
3. for 2 and 4 steps: the undistilled base and the DMD LoRA generator, both through the
   streaming sampler with the same seeds and prompts.
Metric: latent MSE to the reference, paired by (prompt, seed), averaged (lower is better).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

OVR = [
    "train.progress=false",
    "log.plots=false",
    "log.wandb=disabled",
    "run.resume=false",
    "data.synthetic_samples=4",
]


def train_teacher(out: Path, steps: int) -> Path:
    from vidtrain.config import load_recipe
    from vidtrain.train.trainer import train

    r = load_recipe(None, [f"run.dir={out / 'teacher'}", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
                           "optim.lr=2e-3", "optim.warmup_steps=5", "train.ema_decay=null", *OVR])  # fmt: skip
    train(r)
    return out / "teacher" / "checkpoints" / f"step_{steps:06d}" / "model"


def prompts(n: int = 4):
    from vidtrain.data import SyntheticLatentDataset

    ds = SyntheticLatentDataset(n, 16, 6, 8, 8, 8, 32, seed=0, shuffle=False)
    return torch.stack([ds._decode(i)["text"] for i in range(n)])


def reference(model, text, seeds) -> torch.Tensor:
    from vidtrain.distill.rollout import cfg_velocity, chunk_velocity_fn, sample_chunks
    from vidtrain.forcing.flow import shift_sigma
    from vidtrain.forcing.meta import MaskRule

    rule = MaskRule("causal", 3)
    sig = [float(s) for s in shift_sigma(torch.linspace(1.0, 0.0, 25)[:-1].double(), 5.0)]
    outs = []
    for i, seed in enumerate(seeds):
        noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(seed))
        t = text[i : i + 1]
        v = cfg_velocity(
            chunk_velocity_fn(model, t, rule), chunk_velocity_fn(model, torch.zeros_like(t), rule), 3.0
        )
        with torch.no_grad():
            outs.append(sample_chunks(v, noise, sig, 3, mode="euler"))
    return torch.cat(outs)


def few_step(model, text, seeds, steps) -> torch.Tensor:
    from vidtrain.sample import Conditioning, SamplerConfig, StreamingSampler

    s = StreamingSampler(model, SamplerConfig(timesteps=tuple(steps), kv_cache="fp32"))
    with torch.no_grad():
        return s.generate_latents(Conditioning(text), 2, (8, 8), seeds).latents_BCFHW


def distill(out: Path, teacher: Path, steps: list[float], n: int) -> Path:
    from vidtrain.config import load_recipe
    from vidtrain.train.trainer import train

    run = out / f"dmd_{len(steps)}step"
    r = load_recipe("recipes/dmd_lora_debug.yaml", [f"method.dmd.teacher={teacher}", f"run.dir={run}",
                    f"train.max_steps={n}", f"train.ckpt_every={n}", f"method.dmd.denoising_steps={steps}",
                    "method.dmd.generator_update_every=2", *OVR])  # fmt: skip
    train(r)
    return run / "lora"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/dmd_evidence")
    p.add_argument("--teacher-steps", type=int, default=150)
    p.add_argument("--dmd-steps", type=int, default=60)
    a = p.parse_args()
    from vidtrain.distill.export import load_lora
    from vidtrain.models.wan import CausalWanDiT

    out = Path(a.out)
    teacher = train_teacher(out, a.teacher_steps)
    base = CausalWanDiT.from_pretrained(str(teacher)).eval()
    text, seeds = prompts(), [11, 12, 13, 14]
    ref = reference(base, text, seeds)
    rows = []
    for steps in ([1000.0, 500.0], [1000.0, 750.0, 500.0, 250.0]):
        lora_dir = distill(out, teacher, steps, a.dmd_steps)
        gen = load_lora(CausalWanDiT.from_pretrained(str(teacher)), lora_dir)
        mse_base = float((few_step(base, text, seeds, steps) - ref).pow(2).mean())
        mse_dmd = float((few_step(gen, text, seeds, steps) - ref).pow(2).mean())
        rows.append({"steps": len(steps), "mse_undistilled": mse_base, "mse_dmd_lora": mse_dmd})
    print("| steps | MSE undistilled vs teacher 24-step | MSE DMD LoRA vs teacher 24-step |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['mse_undistilled']:.4f} | {r['mse_dmd_lora']:.4f} |")
    (out / "evidence.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
