"""Does DMD bring the few-step generator closer to the teacher's many-step samples? (debug DiT, CPU)

    python bench/dmd_evidence.py [--out runs/dmd_evidence] [--teacher-steps 1500 --dmd-steps 300 --seeds 64]

Data (structured, multimodal): --prompts prompts; each is a drifting plane wave (its own
frequencies, velocity, gain and channel mix) and a fixed random text embedding. A training video
[16, 6, 4, 4] draws the wave's phase at random: the caption does NOT say it, so a prompt has a
ring of valid videos. The conditional mean (all zeros) is what a one-shot x0 prediction tends
to; a good sampler commits to a phase and keeps it consistent across chunks.

1. teacher: the debug DiT trained with teacher forcing on --train-samples such videos;
2. reference set A: the teacher's --ref-steps Euler samples (chunk by chunk, causal), --seeds
   seeds per prompt; set B (and C): the same with other seeds;
3. for 2 and 4 steps: the teacher's own Euler sampler (sanity), the undistilled base through the
   streaming sampler, and the DMD LoRA through the same sampler (all on seeds B).

Metrics per row, lower is better (the FD was fixed before any result was looked at):
  fd_teacher    per-prompt Frechet distance to reference set A (see `Frechet`: 4 fixed random
                orthonormal projections of the flattened latent to 8 dims, Gaussian fit per
                prompt, FD / 8, mean over projections and prompts). What DMD optimises: the
                teacher's distribution, not its noise -> sample map. Floor: sets B and C
                against A (the teacher against itself; B vs C spread = the estimate's noise);
  fd_data       the same against training videos (random phases): "better", not "closer";
  mse_to_ref    latent MSE to the teacher's --ref-steps sample of the same seed (set B);
  manifold_err  MSE to the nearest valid video of the prompt (phase on a 48-point grid);
  energy        mean square of the samples over that of the valid videos (1 = full contrast).
Guidance 1 (no CFG): the teacher is trained without caption dropout.

Found on the shared 2-core CPU (2026-11-26, defaults, 96 s, load average 1.5-1.8 with another
job beside it; the run is deterministic, a repeat gave the same table):
                               FD to teacher   FD to data   energy
  teacher 32-step, seeds B/C   0.053 / 0.048   0.50         1.00
  2 steps undistilled -> DMD   0.095 -> 0.067  0.44 -> 0.48 0.61 -> 0.89
  4 steps undistilled -> DMD   0.068 -> 0.065  0.43 -> 0.48 0.71 -> 0.98
At 2 steps DMD closes most of the gap to the teacher's own floor (0.095 -> 0.067 vs 0.05) and
beats the teacher's own 2-step Euler (0.073); at 4 steps the change (0.068 -> 0.065) is inside
the floor's seed spread (0.048 vs 0.053), so no evidence there. With --teacher-steps 4000 (same
DMD settings) 2 steps again improved (0.090 -> 0.076) while 4 steps got worse (0.060 -> 0.089):
the 4-step result is not robust. The teacher itself samples off the data (FD to data 0.50,
manifold_err 0.76, worse than the all-zeros mean at 0.55; 4000 teacher steps: 0.49 / 0.74), and
DMD moves samples toward it and away from the data (fd_data up): "closer to the teacher" is not
"better" on this debug model. Same-seed MSE cannot show anything (two teacher seeds: 1.13).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

C, F, HW, FPC, TEXT_LEN, TEXT_DIM, WAVES = 16, 6, 4, 3, 4, 32, 1
STEPS = {2: [1000.0, 500.0], 4: [1000.0, 750.0, 500.0, 250.0]}
OVR = [
    "train.progress=false",
    "log.plots=false",
    "log.wandb=disabled",
    "run.resume=false",
    "train.log_every=20",
]


def waves(params: np.ndarray, mix: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Videos [..., C, F, H, W] for wave params [W, 5], channel mix [W, C] and phases [..., W]."""
    f, h, w = np.meshgrid(np.arange(F), np.arange(HW), np.arange(HW), indexing="ij")
    out = 0.0
    for k, (fh, fw, vh, vw, gain) in enumerate(params):
        arg = 2 * np.pi * (fh * (h + 2 * vh * f) + fw * (w + 2 * vw * f)) / 4  # [F, H, W]
        wave = np.sin(arg + phases[..., k, None, None, None])  # [..., F, H, W]
        out = out + mix[k][:, None, None, None] * (1 + 0.5 * gain) * wave[..., None, :, :, :]
    return out


def make_prompt(j: int):
    """Prompt j: wave params [W, 5] (freq_h, freq_w, vel_h, vel_w, gain), mix [W, C], text [S, D]."""
    rng = np.random.default_rng(1234 + j)
    params = rng.uniform(-1, 1, size=(WAVES, 5))
    mix = rng.standard_normal((WAVES, C)) / math.sqrt(WAVES)
    text = rng.standard_normal((TEXT_LEN, TEXT_DIM))
    return params, mix, text.astype(np.float32)


def write_shard(folder: Path, n: int, seed: int, prompts: list) -> Path:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for i in range(n):
            params, mix, text = prompts[i % len(prompts)]
            x = waves(params, mix, rng.uniform(0, 2 * np.pi, size=WAVES)).astype(np.float32)
            enc = {}
            for key, arr in (("latents.npy", x), ("text.npy", text)):
                buf = io.BytesIO()
                np.save(buf, arr)
                enc[key] = buf.getvalue()
            sink.write({"__key__": f"s{i:06d}", **enc, "json": json.dumps({"i": i}).encode()})
    return folder


def common(shards: Path, run: Path, steps: int) -> list[str]:
    return [
        f"run.dir={run}", "data.source=shards", f"data.shards={shards}", "data.batch_size=8",
        "data.shuffle_buffer=64", f"model.text_dim={TEXT_DIM}", f"model.frames_per_chunk={FPC}",
        f"train.max_steps={steps}", f"train.ckpt_every={steps}", "train.ema_decay=null", *OVR,
    ]  # fmt: skip


def train_teacher(out: Path, shards: Path, steps: int) -> Path:
    from vidtrain.config import load_recipe
    from vidtrain.train.trainer import train

    over = ["optim.lr=2e-3", "optim.warmup_steps=10", "optim.weight_decay=0.0", "optim.min_lr_ratio=0.05"]
    train(load_recipe(None, [*common(shards, out / "teacher", steps), *over]))
    return out / "teacher" / "checkpoints" / f"step_{steps:06d}" / "model"


def distill(out: Path, shards: Path, teacher: Path, steps: list[float], n: int) -> Path:
    from vidtrain.config import load_recipe
    from vidtrain.train.trainer import train

    run = out / f"dmd_{len(steps)}step"
    over = [
        f"method.dmd.teacher={teacher}", f"method.dmd.denoising_steps={steps}", "method.dmd.guidance_scale=1.0",
        "method.dmd.generator_update_every=3", "method.dmd.ema_decay=0.9", "method.dmd.generator_lr=1e-3",
        "method.dmd.critic_lr=1e-3", "data.frames=6", "data.height=4", "data.width=4",
    ]  # fmt: skip
    train(load_recipe("recipes/dmd_lora_debug.yaml", [*common(shards, run, n), *over]))
    return run / "lora"


def euler(model, text: torch.Tensor, seeds: list[int], n: int, batch: int = 256) -> torch.Tensor:
    """The teacher's own sampler: flow-ODE Euler over n shifted steps, chunk by chunk (causal)."""
    from vidtrain.distill.rollout import chunk_velocity_fn, sample_chunks
    from vidtrain.forcing.flow import shift_sigma
    from vidtrain.tokens import MaskRule

    sig = [float(s) for s in shift_sigma(torch.linspace(1.0, 0.0, n + 1)[:-1].double(), 5.0)]
    noise = torch.cat(
        [torch.randn(1, C, F, HW, HW, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    outs = []
    for i in range(0, len(seeds), batch):
        v = chunk_velocity_fn(model, text[i : i + batch], MaskRule("causal", FPC))
        with torch.no_grad():
            outs.append(sample_chunks(v, noise[i : i + batch], sig, FPC, mode="euler"))
    return torch.cat(outs)


def few_step(
    model, text: torch.Tensor, seeds: list[int], steps: list[float], batch: int = 256
) -> torch.Tensor:
    """The streaming sampler (x0 update, re-noise), as the distilled generator is deployed."""
    from vidtrain.sample import Conditioning, SamplerConfig, StreamingSampler

    cfg = SamplerConfig(timesteps=tuple(steps), frames_per_chunk=FPC, kv_cache="fp32")
    outs = []
    with torch.no_grad():
        for i in range(0, len(seeds), batch):
            s = StreamingSampler(model, cfg)
            res = s.generate_latents(
                Conditioning(text[i : i + batch]), F // FPC, (HW, HW), seeds[i : i + batch]
            )
            outs.append(res.latents_BCFHW)
    return torch.cat(outs)


def data_samples(prompts, prompt_of: list[int], seed: int) -> torch.Tensor:
    """Training-distribution videos: each prompt's wave at a uniformly random phase."""
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 2 * np.pi, size=(len(prompt_of), WAVES))
    x = [waves(prompts[j][0], prompts[j][1], ph[i]) for i, j in enumerate(prompt_of)]
    return torch.from_numpy(np.stack(x)).float()


class Frechet:
    """Conditional Frechet distance in latent space (defined before any result was looked at).

    Features: the flattened latent x [D = C*F*H*W] through PROJ fixed random projections, each
    with DIM orthonormal rows (seeded, never trained): f = Q x in R^DIM. Per prompt j, fit a
    Gaussian (mean, covariance) to the features of one set and of the other, and take
        FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
    Reported value: FD / DIM (squared latent units per dimension, the scale of an MSE), averaged
    over projections and prompts. Per prompt, so a sample must match its own prompt's spread of
    videos, not the mixture over prompts. The estimator is biased upward at finite sample counts:
    the floor is the teacher's own many-step samples with other seeds against the reference set.
    """

    PROJ, DIM = 4, 8

    def __init__(self, prompt_of: list[int]) -> None:
        g = torch.Generator().manual_seed(7)
        d = C * F * HW * HW
        self.q = [
            torch.linalg.qr(torch.randn(d, self.DIM, generator=g, dtype=torch.float64))[0].T
            for _ in range(self.PROJ)
        ]
        self.idx = {j: [i for i, p in enumerate(prompt_of) if p == j] for j in sorted(set(prompt_of))}

    @staticmethod
    def fd(a: torch.Tensor, b: torch.Tensor) -> float:
        mu = (a.mean(0) - b.mean(0)).pow(2).sum()
        sa, sb = torch.cov(a.T), torch.cov(b.T)
        ev, evec = torch.linalg.eigh(sa)
        ra = evec @ torch.diag(ev.clamp_min(0).sqrt()) @ evec.T
        cross = torch.linalg.eigvalsh(ra @ sb @ ra).clamp_min(0).sqrt().sum()
        return float(mu + sa.trace() + sb.trace() - 2 * cross)

    def __call__(self, x: torch.Tensor, ref: torch.Tensor) -> float:
        xs, rs = x.flatten(1).double(), ref.flatten(1).double()
        vals = [self.fd(xs[i] @ q.T, rs[i] @ q.T) / self.DIM for q in self.q for i in self.idx.values()]
        return sum(vals) / len(vals)


class Manifold:
    """Valid videos of each prompt (phase grid) and the distance of a sample to them."""

    def __init__(self, prompts, grid: int = 48) -> None:
        ph = np.stack(np.meshgrid(*[np.linspace(0, 2 * np.pi, grid, endpoint=False)] * WAVES), -1)
        ph = ph.reshape(-1, WAVES)
        self.valid = [torch.from_numpy(waves(p, m, ph)).float().flatten(1) for p, m, _ in prompts]
        self.energy = float(torch.stack([v.pow(2).mean() for v in self.valid]).mean())

    def error(self, x: torch.Tensor, prompt_of: list[int]) -> float:
        d = [(self.valid[j] - x[i].flatten()).pow(2).mean(1).min() for i, j in enumerate(prompt_of)]
        return float(torch.stack(d).mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/dmd_evidence")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--dmd-steps", type=int, default=300)
    p.add_argument("--ref-steps", type=int, default=32)
    p.add_argument("--train-samples", type=int, default=512)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seeds", type=int, default=64, help="samples per prompt in every set")
    a = p.parse_args(argv)
    from vidtrain.lora.files import load_lora
    from vidtrain.models.wan import CausalWanDiT

    torch.set_num_threads(2)
    t0, out = time.perf_counter(), Path(a.out)
    prompts = [make_prompt(j) for j in range(a.prompts)]
    shards = write_shard(out / "latents", a.train_samples, 0, prompts)
    teacher = train_teacher(out, shards, a.teacher_steps)
    t_teacher = time.perf_counter() - t0
    prompt_of = [j for j in range(a.prompts) for _ in range(a.seeds)]
    text = torch.from_numpy(np.stack([prompts[j][2] for j in prompt_of]))
    seeds_a = [1000 + i for i in range(len(prompt_of))]  # the FD reference set
    seeds_b = [500_000 + i for i in range(len(prompt_of))]  # every other row
    seeds_c = [900_000 + i for i in range(len(prompt_of))]  # a second floor: the FD's sampling noise
    manifold, frechet = Manifold(prompts), Frechet(prompt_of)
    base = CausalWanDiT.from_pretrained(str(teacher)).eval()
    ref_a = euler(base, text, seeds_a, a.ref_steps)
    ref_b = euler(base, text, seeds_b, a.ref_steps)
    data = data_samples(prompts, prompt_of, seed=99)

    def row(name: str, steps: int | str, x: torch.Tensor) -> dict:
        return {
            "model": name, "steps": steps, "fd_teacher": max(0.0, frechet(x, ref_a)), "fd_data": max(0.0, frechet(x, data)),
            "mse_to_ref": float((x - ref_b).pow(2).mean()),
            "manifold_err": manifold.error(x, prompt_of), "energy": float(x.pow(2).mean()) / manifold.energy,
        }  # fmt: skip

    rows = [
        row("teacher Euler, reference set A", a.ref_steps, ref_a),
        row("teacher Euler, other seeds B (floor)", a.ref_steps, ref_b),
        row(
            "teacher Euler, other seeds C (floor again)", a.ref_steps, euler(base, text, seeds_c, a.ref_steps)
        ),
        row("training data (random phases)", "-", data),
        row("conditional mean (all zeros)", "-", 0 * ref_a),
    ]
    t_dmd = 0.0
    for n, steps in STEPS.items():
        t1 = time.perf_counter()
        lora_dir = distill(out, shards, teacher, steps, a.dmd_steps)
        t_dmd += time.perf_counter() - t1
        gen = load_lora(CausalWanDiT.from_pretrained(str(teacher)), lora_dir).eval()
        rows.append(row("teacher Euler (sanity)", n, euler(base, text, seeds_b, n)))
        rows.append(row("undistilled, streaming sampler", n, few_step(base, text, seeds_b, steps)))
        rows.append(row("DMD LoRA, streaming sampler", n, few_step(gen, text, seeds_b, steps)))
    print(
        f"\n| model | steps | FD to teacher {a.ref_steps}-step | FD to data | MSE to teacher (same seed) "
        "| manifold error | energy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['steps']} | {r['fd_teacher']:.4f} | {r['fd_data']:.4f} | {r['mse_to_ref']:.4f} "
            f"| {r['manifold_err']:.4f} | {r['energy']:.3f} |"
        )
    total = time.perf_counter() - t0
    load = os.getloadavg()
    print(
        f"\nteacher {a.teacher_steps} steps {t_teacher:.0f} s; DMD 2x{a.dmd_steps} steps {t_dmd:.0f} s; "
        f"total {total:.0f} s; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    result = {"rows": rows, "args": vars(a), "seconds": {"teacher": t_teacher, "dmd": t_dmd, "total": total},
              "loadavg": load, "device": "cpu", "torch": torch.__version__}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
