"""`make demo`: the whole pipeline on CPU with bundled defaults, on real sample videos.

shard (decord) -> encode (chunk-aware VAE + text encoder) -> teacher forcing on 2 ranks
(DeepSpeed launcher, Ulysses SP, balanced layout) -> NVFP4 QAT -> DMD LoRA -> multi-shot
streaming sample (NVFP4 KV cache, async decode) -> drift of 8x-long generations (vidtrain eval
--drift, teacher forcing vs QAT) -> report.md in the run folder.

Every stage runs through the same console scripts a user types; the commands are printed.
Weights: the debug VAE, the tiny text encoder and the debug DiT that teacher forcing starts from
ship in `vidtrain/assets/demo/` (trained on these same clips by tools/train_demo_weights.py; its
README says what they can and cannot do), so the video shows the clips' content; `--random-init`
starts from fixed random initialisations instead (the pipeline without the pixels). The report
(report.md) puts each stage's samples beside the data, with a fidelity figure against the
random-init baseline (vidtrain/report.py).
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

import torch

from vidtrain.assets_paths import sample_video_dir
from vidtrain.models.text import make_tiny_text_encoder
from vidtrain.models.vae import CausalVideoVAE
from vidtrain.report import first_frames, i2v_figures, machine_load, read_clips, stage_figures, write_report

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
# the shipped weights (tools/train_demo_weights.py) and the demo's shots (the clips' captions)
DEMO_ASSETS = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_I2V_ASSETS = Path(__file__).resolve().parent / "assets" / "demo_i2v"  # the Wan2.2-shaped pair
# the sample stage's sampler flags (the report streams the random-init baseline with them too)
VIDEO_SETTINGS = {"kv_cache": "nvfp4", "window_frames": 6, "sink_frames": 3}
# the drift stage's length: 16 chunks = 8x the 2-chunk (6 latent frames) training clips
DRIFT_CHUNKS = 16


def sh(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run one stage's command, echo it, tee its output to a log; fail loudly."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("W1", "[W", "Failed to load")) and "\r" not in line:
                sys.stdout.write("    " + line)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo stage failed (exit {rc}): {shlex.join(cmd)}\n  log: {log}")
    return time.perf_counter() - start


def bin_(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def prepare_assets(out: Path, random_init: bool = False) -> tuple[Path, Path, Path | None]:
    """(VAE, text encoder, DiT to start from): the shipped trained weights, or with `random_init`
    a fixed-seed debug VAE and tiny umT5 text encoder saved once (and no DiT: the recipe's seed)."""
    if not random_init:
        for name in ("vae.safetensors", "text_encoder", "dit"):
            if not (DEMO_ASSETS / name).exists():
                raise SystemExit(
                    f"demo weights missing: {DEMO_ASSETS / name} (tools/train_demo_weights.py makes them)"
                )
        return DEMO_ASSETS / "vae.safetensors", DEMO_ASSETS / "text_encoder", DEMO_ASSETS / "dit"
    vae_path, te_path = out / "assets" / "vae_debug.pth", out / "assets" / "text_encoder"
    vae_path.parent.mkdir(parents=True, exist_ok=True)
    if not vae_path.exists():
        torch.manual_seed(0)
        torch.save(CausalVideoVAE.from_flavor("debug").state_dict(), vae_path)
    if not te_path.exists():
        make_tiny_text_encoder(te_path, d_model=32)
    return vae_path, te_path, None


def data_steps(videos: Path, latents: Path, vae: Path, te: Path) -> list[tuple[str, list[str]]]:
    """The demo's first two stages: shard the sample clips (7 clips of 21 frames, 64x64, 8 fps)
    and encode them with `vae` and the text encoder `te`."""
    return [
        ("shard", [bin_("vidtrain-shard"), str(sample_video_dir()), str(videos), "--height", "64", "--width", "64",
                   "--frames", "21", "--fps", "8", "--max-clips-per-video", "3", "--samples-per-shard", "4",
                   "--no-progress"]),
        ("encode", [bin_("vidtrain-encode"), str(videos), str(latents), "--vae", str(vae), "--text-encoder", str(te),
                    "--no-progress"]),
    ]  # fmt: skip


def _drift_prompts(out: Path, shots: Path) -> Path:
    """The drift stage's prompts: the demo shots' captions, one per line."""
    import yaml

    path = out / "drift" / "prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s['prompt']}\n" for s in yaml.safe_load(shots.read_text())["shots"]))
    return path


def run_i2v(out: Path, args, env: dict) -> int:
    """`--i2v`: the image-to-video demo on the Wan2.2-shaped pair (vidtrain/assets/demo_i2v/):
    shard -> encode (wan2.2-debug VAE) -> teacher forcing with data.task=mixed -> vidtrain sample
    --image (the first frame of the first shot's clip) -> report.md with per-caption grids of
    image-conditioned samples, the first frame against the image's VAE round trip."""
    from PIL import Image  # lazy: only the image-to-video demo writes an image

    for name in ("vae.safetensors", "text_encoder", "dit"):
        if not (DEMO_I2V_ASSETS / name).exists():
            raise SystemExit(
                f"demo weights missing: {DEMO_I2V_ASSETS / name} "
                "(tools/train_demo_weights.py --family wan2.2 makes them)"
            )
    vae, te, dit = (DEMO_I2V_ASSETS / n for n in ("vae.safetensors", "text_encoder", "dit"))
    logs, shots = out / "logs", DEMO_ASSETS / "shots.yaml"
    videos, latents, image = out / "video_shards", out / "latent_shards", out / "first_frame.png"
    attn = ["model.window_frames=6", "model.sink_frames=3", "model.shot_sink=true"]
    i2v = [
        "model.flavor=wan2.2-debug",
        "data.task=mixed",
        "data.i2v_fraction=0.5",
        "method.forcing.min_timestep=20",
    ]
    times: dict[str, float] = {}
    loads: dict[str, tuple[float, float, float] | None] = {}
    steps = [
        *data_steps(videos, latents, vae, te),
        ("train", [bin_("vidtrain"), "train", str(RECIPES / "tf_debug.yaml"), "data.source=shards",
                   f"data.shards={latents}", f"model.checkpoint={dit}", f"run.dir={out / 'tf'}",
                   f"train.max_steps={args.steps}", "train.progress=false", *i2v, *attn]),
        ("sample", [bin_("vidtrain"), "sample", "--checkpoint", str(out / "tf"), "--image", str(image),
                    "--shots", str(shots), "--out", str(out / "video.mp4"), "--decode", "async", "--vae", str(vae),
                    "--text-encoder", str(te), "--height", "64", "--width", "64", "--window-frames", "6",
                    "--sink-frames", "3"]),
    ]  # fmt: skip
    for name, cmd in steps:
        times[name] = sh(cmd, logs / f"{name}.log", env)
        loads[name] = machine_load()
        if name == "shard":  # the image: the first frame of the first shot's caption's first clip
            import yaml

            caption = yaml.safe_load(shots.read_text())["shots"][0]["prompt"]
            Image.fromarray(first_frames(read_clips(videos))[caption]).save(image)
    if not args.no_figures:
        print("\n== image-to-video samples and fidelity (report.md) ==", flush=True)
        t = time.perf_counter()
        fid = i2v_figures(out, vae, te)
        times["figures"] = time.perf_counter() - t
        loads["figures"] = machine_load()
        for stage, f in fid["stages"].items():
            print(f"  {stage:9s} prompted {f['prompted']:.3f}  other {f.get('other', float('nan')):.3f}")
        print(
            f"  first frame vs the image's VAE round trip: max abs {fid['first_frame']['max_abs_vs_vae_round_trip']}"
        )
    report = write_report(out, times, loads)
    print("\n== vidtrain image-to-video demo finished ==")
    for name, secs in times.items():
        print(f"  {name:7s} {secs:7.1f} s")
    print(f"  image:   {image}")
    print(f"  video:   {out / 'video.mp4'} (starts from the image)")
    print(f"  report:  {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default=None, help="run folder of the demo (default runs/demo, --i2v runs/demo_i2v)"
    )
    p.add_argument("--steps", type=int, default=30, help="teacher-forcing steps")
    p.add_argument("--dmd-steps", type=int, default=100, help="DMD critic steps (generator every 5th)")
    p.add_argument("--fresh", action="store_true", help="delete the run folder first")
    p.add_argument(
        "--random-init", action="store_true", help="start from random weights, not the shipped ones"
    )
    p.add_argument("--no-figures", action="store_true", help="skip the per-stage samples of the report")
    p.add_argument(
        "--i2v", action="store_true",
        help="the image-to-video demo instead (Wan2.2-shaped pair, vidtrain/assets/demo_i2v/; default --out runs/demo_i2v)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.out = args.out or ("runs/demo_i2v" if args.i2v else "runs/demo")
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), PYTHONUNBUFFERED="1")
    # one intra-op thread per process (the 2-rank stage has one per rank): the debug models' small
    # ops gain little from a second thread and stall in spin-waits when the 2 cores are shared
    # (the whole demo: 6.8 min vs 20.5 min at load average 7); set OMP_NUM_THREADS to change it
    env.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))

    if args.i2v:
        return run_i2v(out, args, env)
    vae, te, dit = prepare_assets(out, args.random_init)
    start = [f"model.checkpoint={dit}"] if dit else []
    shots = DEMO_ASSETS / "shots.yaml"
    videos, latents = out / "video_shards", out / "latent_shards"
    times: dict[str, float] = {}
    loads: dict[str, tuple[float, float, float] | None] = {}  # the machine's load as each stage ended
    # train, distil and sample with the attention the sampler's KV cache keeps: a window of
    # 6 latent frames, a 3-frame global sink and the shot sink (memory constant in length)
    attn = ["model.window_frames=6", "model.sink_frames=3", "model.shot_sink=true"]
    steps = [
        *data_steps(videos, latents, vae, te),
        ("train", [bin_("vidtrain-launch"), "--launcher", "deepspeed", "--nproc", "2",
                   str(RECIPES / "tf_debug_sp2.yaml"), "data.source=shards", f"data.shards={latents}",
                   f"run.dir={out / 'tf'}", f"train.max_steps={args.steps}", "train.progress=false", *start, *attn]),
        ("qat", [bin_("vidtrain"), "train", str(RECIPES / "qat_debug.yaml"), "data.source=shards",
                 f"data.shards={latents}", f"model.checkpoint={out / 'tf'}",
                 f"run.dir={out / 'qat'}", "train.progress=false", *attn]),
        ("dmd", [bin_("vidtrain"), "train", str(RECIPES / "dmd_lora_debug.yaml"), "data.source=shards",
                 f"data.shards={latents}", f"model.checkpoint={out / 'qat'}",
                 f"run.dir={out / 'dmd'}", "train.progress=false", f"train.max_steps={args.dmd_steps}",
                 *attn]),
        ("sample", [bin_("vidtrain"), "sample", "--checkpoint", str(out / "qat"), "--lora", str(out / "dmd" / "lora"),
                    "--shots", str(shots), "--out", str(out / "video.mp4"),
                    "--kv-cache", VIDEO_SETTINGS["kv_cache"], "--decode", "async", "--vae", str(vae),
                    "--text-encoder", str(te), "--height", "64", "--width", "64",
                    "--window-frames", str(VIDEO_SETTINGS["window_frames"]),
                    "--sink-frames", str(VIDEO_SETTINGS["sink_frames"])]),
        # drift past the trained length: 8x the clips' 2 chunks, teacher forcing vs QAT side by side
        ("drift", [bin_("vidtrain"), "eval", "--checkpoints", str(out / "tf"), str(out / "qat"),
                   "--prompts", str(_drift_prompts(out, shots)), "--out", str(out / "drift" / "eval.md"),
                   "--chunks", str(DRIFT_CHUNKS), "--text-encoder", str(te), "--drift", "--reference-shards",
                   str(latents), "--drift-window", "2", "--height", "64", "--width", "64",
                   "--window-frames", str(VIDEO_SETTINGS["window_frames"]),
                   "--sink-frames", str(VIDEO_SETTINGS["sink_frames"])]),
    ]  # fmt: skip
    for name, cmd in steps:
        times[name] = sh(cmd, logs / f"{name}.log", env)
        loads[name] = machine_load()
    if not args.no_figures:
        # each stage's checkpoint sampled beside the data, and the random-init baseline
        print("\n== per-stage samples and fidelity (report.md) ==", flush=True)
        t = time.perf_counter()
        fid = stage_figures(out, vae, te, video_settings=VIDEO_SETTINGS)
        times["figures"] = time.perf_counter() - t
        loads["figures"] = machine_load()
        for stage, f in fid["stages"].items():
            print(f"  {stage:7s} prompted {f['prompted']:.3f}  other {f.get('other', float('nan')):.3f}")

    report = write_report(out, times, loads)
    print("\n== vidtrain demo finished ==")
    for name, secs in times.items():
        log = logs / f"{name}.log"
        load = f"   load {loads[name][0]:.1f}" if loads.get(name) else ""
        print(f"  {name:7s} {secs:7.1f} s{load}" + (f"   log: {log}" if log.exists() else ""))
    print(f"  video:   {out / 'video.mp4'} (+ video.metrics.json, video.timeline.png)")
    print(f"  report:  {report} (per-stage grids in {out / 'grids'}, figures in fidelity.json)")
    (out / "demo_summary.json").write_text(json.dumps({"seconds": times, "report": str(report)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
