"""A Markdown report of a pipeline run folder: what ran, where each artefact is, the plots, and
what each trained stage generates next to the data (`stage_figures`).

Fidelity figure (`frame_distance`, lower is closer): every frame is shrunk to an 8x8 RGB
thumbnail (area average, values in [0, 1]); a generated frame's distance to a set of reference
frames is the RMSE between its thumbnail and the nearest reference thumbnail; the figure is the
mean over the generated frames. It sees the colours and the coarse layout of a frame (8x8 cells of
a 64x64 frame), not fine detail. Per stage it is measured against the frames of the clips whose
caption was the prompt (`prompted`) and against each other caption's clips (`other`, their mean):
prompted well below other says the caption steers what comes out. `motion` is the mean thumbnail RMSE between
consecutive frames (0 = a frozen video), for generated frames and for the data.

Legend: B samples, T pixel frames, H/W pixel height/width, N frames.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vidtrain.data_tools.encode import decode_clip, read_video_samples
from vidtrain.models.vae import CausalVideoVAE
from vidtrain.models.wan import CausalWanDiT
from vidtrain.sample.cli import latent_size, load_model, load_text_encoder, load_vae, shot_conditionings
from vidtrain.sample.decode import to_uint8_frames
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler

THUMB = 8  # thumbnail side of the fidelity figure
GRID_FRAMES = 6  # frames per row of a stage grid
# stage -> (run folder of the checkpoint, LoRA folder or None), relative to the demo's run folder
STAGES = {"tf": ("tf", None), "qat": ("qat", None), "dmd": ("qat", "dmd/lora")}
STAGE_TITLES = {
    "random": "random init (the old demo's weights)",
    "tf": "teacher forcing",
    "qat": "NVFP4 QAT",
    "dmd": "DMD LoRA, 4 steps",
    "vae": "VAE reconstruction (the floor)",
    "i2v": "image-to-video from the first frame (teacher forcing, task mixed)",
    "i2v_text": "the same model, text only",
    "i2v_random": "random init (the Wan2.2-shaped pair), image-conditioned",
}
I2V_CAN_AND_CANNOT = """\
What the image-to-video demo shows: the Wan2.2-shaped pair (`vidtrain/assets/demo_i2v/`: the
wan2.2-debug VAE, 16x spatial stride and 48 latent channels, so a 64x64 frame is a 4x4 latent;
the wan2.2-debug DiT trained with `data.task=mixed`) conditions on each caption's first frame the
Wan2.2 way: the image's latent is held clean at timestep 0 as latent frame 0, so the first
decoded frame is the image through the VAE (checked above) and the chunks after it continue from
it. With 4x4 latents the frames are coarse colour layouts. What it cannot do: trained on 7 clips
with one caption per video, the tiny DiT has memorised each caption's video, so the image adds
little to its own caption (the text-only row is as close), and when image and caption disagree
the frames after the image follow the caption (the swap figure above): the conditioning path is
exact, the model too small and its data too few to make the image matter beyond the first frame."""


# ---------------------------------------------------------------- the fidelity figure


def thumbnails(frames_NHWC: np.ndarray) -> np.ndarray:
    """uint8 frames [N, H, W, 3] -> [N, 3 * THUMB * THUMB] float thumbnails in [0, 1] (area average)."""
    x = torch.from_numpy(np.ascontiguousarray(frames_NHWC)).permute(0, 3, 1, 2).float() / 255.0
    return F.adaptive_avg_pool2d(x, THUMB).flatten(1).numpy()


def frame_distance(gen_NHWC: np.ndarray, ref_NHWC: np.ndarray) -> float:
    """Mean over generated frames of the thumbnail RMSE to the nearest reference frame."""
    g, r = thumbnails(gen_NHWC), thumbnails(ref_NHWC)
    d2 = ((g[:, None, :] - r[None, :, :]) ** 2).mean(-1)  # [Ng, Nr]
    return float(np.sqrt(d2.min(1)).mean())


def motion(frames_THWC: np.ndarray) -> float:
    """Mean thumbnail RMSE between consecutive frames (0 = frozen)."""
    t = thumbnails(frames_THWC)
    return float(np.sqrt(((t[1:] - t[:-1]) ** 2).mean(-1)).mean()) if len(t) > 1 else 0.0


def fidelity(gen: dict[str, np.ndarray], clips: Sequence[tuple[str, np.ndarray]]) -> dict:
    """Figures of generated videos {prompt: [T, H, W, 3]} against the clips [(caption, [T, H, W, 3])]:
    `by_caption[prompt][caption]`: frame_distance to that caption's clips; `prompted`: the mean
    over prompts of the distance to the prompt's own clips; `other`: of the mean distance to
    each other caption's clips; `motion` of the generated videos, `motion_data` of the clips."""
    captions = list(dict.fromkeys(c for c, _ in clips))
    frames_of = {c: np.concatenate([f for cc, f in clips if cc == c]) for c in captions}
    by_caption, prompted, other = {}, [], []
    for prompt, frames in gen.items():
        if prompt not in frames_of:
            raise ValueError(f"no clip has the caption {prompt!r} (captions: {captions})")
        by_caption[prompt] = {c: frame_distance(frames, ref) for c, ref in frames_of.items()}
        prompted.append(by_caption[prompt][prompt])
        rest = [d for c, d in by_caption[prompt].items() if c != prompt]
        if rest:
            other.append(float(np.mean(rest)))
    out = {
        "prompted": float(np.mean(prompted)),
        "motion": float(np.mean([motion(f) for f in gen.values()])),
        "motion_data": float(np.mean([motion(f) for c, f in clips if c in gen])),
        "by_caption": by_caption,
    }
    if other:
        out["other"] = float(np.mean(other))
    return out


# ---------------------------------------------------------------- data and generation


def read_clips(video_shards: str | Path) -> list[tuple[str, np.ndarray]]:
    """(caption, uint8 frames [T, H, W, 3]) of every clip of a video shard set, in key order."""
    root = Path(video_shards)
    manifest = json.loads((root / "manifest.json").read_text())
    items = []
    for shard in manifest["shards"]:
        for raw in read_video_samples(root / shard["name"]):
            caption = raw["txt"].decode() if "txt" in raw else json.loads(raw["json"])["caption"]
            items.append((raw["__key__"], caption, decode_clip(raw["mp4"])))
    return [(c, f) for _, c, f in sorted(items, key=lambda it: it[0])]


def prompts_of(clips: Sequence[tuple[str, np.ndarray]]) -> list[str]:
    """The distinct captions, in order of first appearance."""
    return list(dict.fromkeys(c for c, _ in clips))


@torch.no_grad()
def generate(
    model: CausalWanDiT,
    cfg: SamplerConfig,
    vae: CausalVideoVAE,
    text_encoder,
    prompts: Sequence[str],
    chunks: int = 2,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    images: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """One streamed sample per prompt (one batch, seed + i for prompt i), decoded: {prompt: uint8 [T, H, W, 3]}.
    `images` {prompt: uint8 [H, W, 3]}: image-to-video, each sample's first frame encoded by the
    VAE as one pixel frame and held as its first latent frame (an I2V base)."""
    model = model.float().eval()
    conds = shot_conditionings([list(prompts)], text_encoder, model.cfg.text_dim, cfg)
    if images is not None:
        first = torch.from_numpy(np.stack([images[p] for p in prompts])).permute(0, 3, 1, 2)[:, :, None]
        z = vae.float().eval().encode(first.float() / 127.5 - 1.0, latents_per_pass=None)[:, :, 0]
        conds[0] = dataclasses.replace(conds[0], image_latent=z)
    seeds = [seed + i for i in range(len(prompts))]
    outs = StreamingSampler(model, cfg).stream(
        conds, [chunks], latent_size(*size, vae.spatial_compression), seeds
    )
    z_BCFHW = torch.cat([c.x0_BCFHW for c in outs], dim=2)
    x_BCTHW = vae.float().eval().decode(z_BCFHW.float(), latents_per_pass=None)
    return {p: to_uint8_frames(x_BCTHW, i) for i, p in enumerate(prompts)}


def first_frames(clips: Sequence[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{caption: uint8 [H, W, 3]}: the first frame of each caption's first clip (the I2V image)."""
    out: dict[str, np.ndarray] = {}
    for caption, frames in clips:
        out.setdefault(caption, np.ascontiguousarray(frames[0]))
    return out


def random_init(seed: int = 0, flavor: str = "debug") -> tuple[CausalWanDiT, CausalVideoVAE]:
    """The random-init baseline: the debug DiT and VAE (`flavor` "wan2.2-debug": the Wan2.2-shaped
    pair, image-to-video) as seeded random initialisations."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CausalWanDiT.from_flavor(flavor)
        torch.manual_seed(seed)
        vae = CausalVideoVAE.from_flavor(flavor)
    return model, vae


@torch.no_grad()
def reconstruct(vae: CausalVideoVAE, clips: Sequence[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """The clips through the VAE (encode, decode): what the DiT's latents can at best become."""
    out = []
    for caption, frames in clips:
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        z = vae.float().eval().encode(x, latents_per_pass=None)
        out.append((caption, to_uint8_frames(vae.decode(z, latents_per_pass=None))))
    return out


def plot_grid(
    gen: dict[str, np.ndarray], clips: Sequence[tuple[str, np.ndarray]], out_png: Path, title: str
) -> Path:
    """Per prompt, a row of data frames (its first clip) above a row of generated frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, labels = [], []
    for prompt, frames in gen.items():
        data = next(f for c, f in clips if c == prompt)
        n = min(len(frames), len(data))
        idx = np.linspace(0, n - 1, GRID_FRAMES).round().astype(int)
        for name, video in (("data", data), ("generated", frames)):
            rows.append(np.concatenate([np.pad(video[i], ((1, 1), (1, 1), (0, 0)), constant_values=255)
                                        for i in idx], axis=1))  # fmt: skip
            labels.append(f"{prompt}\n{name}")
    mosaic = np.concatenate(rows, axis=0)
    h = rows[0].shape[0]
    fig, ax = plt.subplots(figsize=(1.1 * GRID_FRAMES + 1.6, 1.1 * len(rows) + 0.5))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([h * (i + 0.5) for i in range(len(rows))], labels, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def shot_frames(shots: Sequence[dict], frames_per_chunk: int, temporal: int = 4) -> list[tuple[int, int]]:
    """Pixel frame range [a, b) of each shot ({"chunks": n}) of a streamed video: latent frame 0
    decodes to pixel frame 0, latent frame f >= 1 to pixel frames 4f-3 .. 4f."""
    ranges, f0 = [], 0
    for shot in shots:
        f1 = f0 + shot["chunks"] * frames_per_chunk
        ranges.append((0 if f0 == 0 else temporal * f0 - (temporal - 1), temporal * (f1 - 1) + 1))
        f0 = f1
    return ranges


@torch.no_grad()
def video_figures(
    out: Path, clips, cfg: SamplerConfig, baseline: tuple[CausalWanDiT, CausalVideoVAE], text_encoder,
    seed: int = 0,
) -> dict | None:  # fmt: skip
    """Per shot of out/video.mp4 (shots from video.metrics.json): frame_distance to the prompt's
    clips, beside the same shots streamed from the random-init `baseline` with `cfg` and `seed`."""
    video, metrics = out / "video.mp4", out / "video.metrics.json"
    if not video.exists() or not metrics.exists():
        return None
    import imageio.v3 as iio

    shots = json.loads(metrics.read_text()).get("shots")
    frames = iio.imread(video)
    if not shots:
        return None
    model, vae = baseline
    model = model.float().eval()
    conds = shot_conditionings([[s["prompt"]] for s in shots], text_encoder, model.cfg.text_dim, cfg)
    chunks = [s["chunks"] for s in shots]
    h, w = frames.shape[1:3]
    z = torch.cat(
        [c.x0_BCFHW for c in StreamingSampler(model, cfg).stream(conds, chunks, latent_size(h, w), [seed])], 2
    )
    rand = to_uint8_frames(vae.float().eval().decode(z, latents_per_pass=None))
    frames_of = {c: np.concatenate([f for cc, f in clips if cc == c]) for c in prompts_of(clips)}
    rows = []
    for shot, (a, b) in zip(shots, shot_frames(shots, cfg.frames_per_chunk)):
        ref = frames_of[shot["prompt"]]
        rows.append({"prompt": shot["prompt"], "chunks": shot["chunks"], "frames": [a, b],
                     "distance": frame_distance(frames[a:b], ref), "random": frame_distance(rand[a:b], ref)})  # fmt: skip
    return {"shots": rows, "distance": float(np.mean([r["distance"] for r in rows])),
            "random": float(np.mean([r["random"] for r in rows]))}  # fmt: skip


def stage_figures(
    out: Path,
    vae_path: str | Path,
    text_encoder_path: str | Path,
    chunks: int = 2,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    video_settings: dict | None = None,
) -> dict:
    """Sample every stage of a demo run folder and the random-init baseline the same way (one
    batch of one sample per clip caption, `chunks` chunks at `size`, seeds seed + i), write
    `out/grids/<stage>.png` and `out/fidelity.json`; return what fidelity.json holds. With a
    video.mp4 (the DMD LoRA on the QAT model), also its per-shot figures against the same shots
    from the random-init baseline, sampled with `video_settings` (the sample stage's flags)."""
    out = Path(out)
    clips = read_clips(out / "video_shards")
    prompts = prompts_of(clips)
    vae = load_vae(str(vae_path), 16, "cpu", torch.float32)  # the debug family: 16 latent channels
    figures: dict[str, dict] = {}

    t0 = time.perf_counter()

    def record(stage: str, gen: dict[str, np.ndarray]) -> None:
        figures[stage] = fidelity(gen, clips)
        figures[stage]["grid"] = f"grids/{stage}.png"
        plot_grid(gen, clips, out / "grids" / f"{stage}.png", STAGE_TITLES[stage])
        # one line per stage sampled: this part of the demo runs ~10 s and must not be silent
        print(f"[vidtrain] report: {stage} sampled ({time.perf_counter() - t0:.0f} s)", flush=True)

    tf_cfg = None
    for stage, (run, lora) in STAGES.items():
        ckpt, lora_dir = out / run, (out / lora if lora else None)
        if not ckpt.exists() or (lora_dir is not None and not lora_dir.exists()):
            continue
        cfg = SamplerConfig.from_run(ckpt, lora_dir)
        tf_cfg = tf_cfg or cfg
        model = load_model(ckpt, str(lora_dir) if lora_dir else None)
        te = load_text_encoder(str(text_encoder_path), model.cfg.text_dim, "cpu", cfg.text_len)
        record(stage, generate(model, cfg, vae, te, prompts, chunks, size, seed))
        figures[stage]["sampler"] = {"timesteps": list(cfg.timesteps), "kv_cache": cfg.kv_cache}
    cfg = tf_cfg or SamplerConfig()
    rand_model, rand_vae = random_init(seed)
    te = load_text_encoder(str(text_encoder_path), rand_model.cfg.text_dim, "cpu", cfg.text_len)
    record("random", generate(rand_model, cfg, rand_vae, te, prompts, chunks, size, seed))
    recon = reconstruct(vae, clips)
    first = {p: next(f for c, f in recon if c == p) for p in prompts}
    record("vae", first)
    video_cfg = cfg
    if (out / "qat").exists() and (out / "dmd" / "lora").exists():
        video_cfg = SamplerConfig.from_run(out / "qat", out / "dmd" / "lora", video_settings or {})
    te = load_text_encoder(str(text_encoder_path), rand_model.cfg.text_dim, "cpu", video_cfg.text_len)
    video = video_figures(out, clips, video_cfg, (rand_model, rand_vae), te, seed)
    result = {
        "metric": "mean thumbnail (8x8 RGB, [0,1]) RMSE of each generated frame to its nearest clip frame",
        "chunks": chunks,
        "size": list(size),
        "seed": seed,
        "prompts": prompts,
        "stages": figures,
    }
    if video is not None:
        result["video"] = video
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------- the report


def plot_kv_bytes(metrics_json: Path, out_png: Path) -> Path | None:
    """KV-cache bytes per generated chunk (flat once the window fills: constant memory)."""
    if not metrics_json.exists():
        return None
    rows = json.loads(metrics_json.read_text()).get("timeline", [])
    if not rows or "kv_bytes" not in rows[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r.get("chunk", i) for i, r in enumerate(rows)], [r["kv_bytes"] / 1024 for r in rows], marker="o")
    ax.set_xlabel("chunk")
    ax.set_ylabel("KV cache (KiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _last_metrics(run: Path) -> dict:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def _rel(out: Path, path: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _img(out: Path, path: Path, title: str) -> str:
    return f"### {title}\n\n![{title}]({_rel(out, path)})\n" if path.exists() else ""


CAN_AND_CANNOT = """\
What the tiny model can and cannot do: the debug DiT (0.15 M parameters) and the debug VAE were
trained on these few clips only (`vidtrain/assets/demo/README.md`). Prompted with a clip's
caption, the first chunk has that clip's colours and coarse layout, nearest its own clips (the
two `carphone` captions, one scene, are each other's nearest). They memorise, they do not
generalise: frames are blurry (the VAE's 8x8 latent grid), faces and fine detail are gone, other
prompts give a blend of the clips; from the second chunk on (generated from its own blurry history,
not the ground truth it trained on) the content drifts into texture, and after a scene cut the new
shot inherits the previous shot's history, so later shots of the video are far weaker than the
first."""


@torch.no_grad()
def i2v_figures(
    out: Path, vae_path: str | Path, text_encoder_path: str | Path, chunks: int = 2,
    size: tuple[int, int] = (64, 64), seed: int = 0,
) -> dict:  # fmt: skip
    """The image-to-video demo's figures: out/tf (an I2V base) conditioned on each caption's first
    frame, the same model from text only, the random-init Wan2.2-shaped pair conditioned alike,
    and the VAE floor; grids and out/fidelity.json (`task: i2v`), with the first generated frame
    against the VAE round trip of the image."""
    out = Path(out)
    clips = read_clips(out / "video_shards")
    prompts, images = prompts_of(clips), first_frames(clips)
    vae = load_vae(str(vae_path), 48, "cpu", torch.float32)  # the Wan2.2 family: 48 latent channels
    cfg = SamplerConfig.from_run(out / "tf")
    model = load_model(out / "tf", None)
    te = load_text_encoder(str(text_encoder_path), model.cfg.text_dim, "cpu", cfg.text_len)
    figures: dict[str, dict] = {}
    gens = {
        "i2v": generate(model, cfg, vae, te, prompts, chunks, size, seed, images),
        "i2v_text": generate(model, cfg, vae, te, prompts, chunks, size, seed),
    }
    rand_model, rand_vae = random_init(seed, "wan2.2-debug")
    gens["i2v_random"] = generate(rand_model, cfg, rand_vae, te, prompts, chunks, size, seed, images)
    recon = reconstruct(vae, clips)
    gens["vae"] = {p: next(f for c, f in recon if c == p) for p in prompts}
    for stage, gen in gens.items():
        figures[stage] = fidelity(gen, clips) | {"grid": f"grids/{stage}.png"}
        plot_grid(gen, clips, out / "grids" / f"{stage}.png", STAGE_TITLES[stage])
        print(f"[vidtrain] report: {stage} sampled", flush=True)
    # image and caption disagreeing: caption i with caption i+1's image; which clip do the frames
    # after the image follow?
    nxt = {p: prompts[(i + 1) % len(prompts)] for i, p in enumerate(prompts)}
    swapped = generate(model, cfg, vae, te, prompts, chunks, size, seed, {p: images[nxt[p]] for p in prompts})
    frames_of = {c: np.concatenate([f for cc, f in clips if cc == c]) for c in prompts}
    rows = [{"caption": p, "image_of": nxt[p], "to_caption_clips": frame_distance(swapped[p][1:], frames_of[p]),
             "to_image_clips": frame_distance(swapped[p][1:], frames_of[nxt[p]])} for p in prompts]  # fmt: skip
    # the first generated frame is the image through the VAE (its latent pinned at timestep 0)
    first = np.stack([images[p] for p in prompts])
    rt = np.stack([f[0] for _, f in reconstruct(vae, [(p, images[p][None]) for p in prompts])])
    gen0 = np.stack([gens["i2v"][p][0] for p in prompts])
    result = {
        "task": "i2v",
        "metric": "mean thumbnail (8x8 RGB, [0,1]) RMSE of each generated frame to its nearest clip frame",
        "chunks": chunks, "size": list(size), "seed": seed, "prompts": prompts, "stages": figures,
        "swapped": {"rows": rows, "to_caption_clips": float(np.mean([r["to_caption_clips"] for r in rows])),
                    "to_image_clips": float(np.mean([r["to_image_clips"] for r in rows]))},
        "first_frame": {
            "max_abs_vs_vae_round_trip": int(np.abs(gen0.astype(int) - rt.astype(int)).max()),
            "rmse_vs_image": float(np.sqrt(np.mean((gen0.astype(float) - first.astype(float)) ** 2)) / 255.0),
        },
    }  # fmt: skip
    (out / "fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _learned(out: Path) -> list[str]:
    path = out / "fidelity.json"
    if not path.exists():
        return []
    fid = json.loads(path.read_text())
    stages = fid["stages"]
    order = [s for s in ("random", "i2v_random", "tf", "qat", "dmd", "i2v", "i2v_text", "vae") if s in stages]
    lines = [
        "## What the model learned",
        "",
        f"Each stage's checkpoint samples {fid['chunks']} chunks at {fid['size'][0]}x{fid['size'][1]}, one "
        f"sample per clip caption ({', '.join(f'`{p}`' for p in fid['prompts'])}; seed {fid['seed']} + i); "
        + (
            "image-to-video rows start from the first frame of the caption's first clip; the random-init "
            "baseline is the wan2.2-debug DiT and VAE as seeded random initialisations, conditioned alike."
            if fid.get("task") == "i2v"
            else "the random-init baseline samples the same way from the debug DiT and VAE as seeded random "
            "initialisations (the demo's weights before `vidtrain/assets/demo/`)."
        ),
        "",
        "Fidelity (lower is closer): a frame's distance to a set of clip frames is the RMSE between "
        "its 8x8 RGB thumbnail (values in [0, 1]) and the nearest one of theirs, averaged over the "
        "generated frames. `prompted`: against the clips of the prompt's video; `other`: the mean "
        "against each other video's clips (`carphone_distorted` and `carphone_pristine` are one scene, a "
        "degraded and a clean copy: each is the other's twin). `motion`: mean thumbnail RMSE between "
        "consecutive frames (data: "
        f"{stages[order[0]]['motion_data']:.3f}). The VAE row is the clips themselves through the VAE.",
        "",
        "| stage | prompted | other | motion |",
        "|---|---:|---:|---:|",
    ]
    for s in order:
        f = stages[s]
        other = f"{f['other']:.3f}" if "other" in f else ""
        lines.append(f"| {STAGE_TITLES[s]} | {f['prompted']:.3f} | {other} | {f['motion']:.3f} |")
    if "video" in fid:
        v = fid["video"]
        lines += ["", "[video.mp4](video.mp4), per shot (the same figure against the prompt's clips; random init: the "
                  "same shots streamed from the random-init weights):", "", "| shot | chunks | video.mp4 | random init |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for r in v["shots"]:
            lines.append(f"| `{r['prompt']}` | {r['chunks']} | {r['distance']:.3f} | {r['random']:.3f} |")
        lines.append(f"| mean | | {v['distance']:.3f} | {v['random']:.3f} |")
    if "first_frame" in fid:
        ff = fid["first_frame"]
        lines += ["", f"First generated frame against the image through the VAE (encode, decode): max abs "
                  f"{ff['max_abs_vs_vae_round_trip']} (uint8), against the image itself: RMSE "
                  f"{ff['rmse_vs_image']:.3f} (the VAE's own error)."]  # fmt: skip
    if "swapped" in fid:
        sw = fid["swapped"]
        lines += ["", "Image and caption disagreeing (each caption with the next caption's first frame): the "
                  "frames after the image are at "
                  f"{sw['to_caption_clips']:.3f} from the caption's clips and {sw['to_image_clips']:.3f} from the "
                  "image's (lower is closer)."]  # fmt: skip
    lines += ["", I2V_CAN_AND_CANNOT if fid.get("task") == "i2v" else CAN_AND_CANNOT, ""]
    for s in order:
        lines.append(
            _img(out, out / stages[s]["grid"], f"{STAGE_TITLES[s]}: data (top) and generated (below)")
        )
    return lines


def machine_load() -> tuple[float, float, float] | None:
    """The load averages (1, 5, 15 minutes), None where the OS has none: printed beside timings,
    which on a shared machine swing with what else runs."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def _drift(out: Path) -> list[str]:
    """The drift section (the demo's `vidtrain eval --drift` stage): the plot and eval's summary."""
    eval_md, png = out / "drift" / "eval.md", out / "drift" / "eval.drift.png"
    if not eval_md.exists():
        return []
    lines = ["", "## Drift past the trained length", "",
             "Each checkpoint streams 8x the training clips' length; per window of chunks, the latents "
             "against the training data (Frechet distance, channel statistics), frame change and its "
             "chunk-boundary ratio (flicker), and similarity to the first frames (identity). "
             "Table and summary: [drift/eval.md](drift/eval.md).", ""]  # fmt: skip
    if png.exists():
        lines.append(_img(out, png, "drift over time, checkpoints side by side"))
    return lines


def write_report(
    out: Path, seconds: dict[str, float], loads: dict[str, tuple[float, float, float] | None] | None = None
) -> Path:
    """`out/report.md` with the stage table, what the model learned (when `stage_figures` wrote
    fidelity.json), the figures, and links to every artefact; every path relative to `out`.
    `loads`: the machine's load averages at the end of each stage (`machine_load`), shown beside
    its time."""
    out = Path(out)
    loads = loads or {}
    cpus = os.cpu_count() or 0
    lines = [
        "# vidtrain pipeline report", "",
        f"Times are wall seconds on this machine ({cpus} CPUs); the load column is the 1-minute load "
        "average when the stage ended: above the CPU count, other work was sharing the machine and "
        "the time is longer than the stage needs.", "",
        "| stage | seconds | load | last metrics |", "|---|---:|---:|---|",
    ]  # fmt: skip
    run_of = {"train": "tf", "qat": "qat", "dmd": "dmd"}
    for stage, secs in seconds.items():
        m = _last_metrics(out / run_of[stage]) if stage in run_of else {}
        shown = ", ".join(
            f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float) and k in ("loss", "samples_per_s")
        )
        load = loads.get(stage)
        lines.append(f"| {stage} | {secs:.1f} | {'' if load is None else f'{load[0]:.1f}'} | {shown} |")
    video = out / "video.mp4"
    metrics = out / "video.metrics.json"
    lines += ["", "## Video", ""]
    if video.exists():
        where = " — metrics in [video.metrics.json](video.metrics.json)" if metrics.exists() else ""
        lines.append("[video.mp4](video.mp4)" + where)
    if metrics.exists():
        m = json.loads(metrics.read_text())
        for key in ("fps_end_to_end", "first_chunk_latency_s", "peak_memory_bytes", "kv_cache_bytes"):
            if key in m:
                lines.append(f"- `{key}`: {m[key]:.4g}")
        if loads.get("sample") is not None:
            lines.append(
                f"- machine load when sampling ended (1 min): {loads['sample'][0]:.1f} on {cpus} CPUs"
            )
    lines += ["", *_learned(out)]
    lines += _drift(out)
    kv_png = plot_kv_bytes(metrics, out / "kv_bytes.png")
    lines += ["", "## Figures", ""]
    for run in ("tf", "qat", "dmd"):
        lines.append(_img(out, out / run / "loss.png", f"{run}: loss"))
    lines.append(_img(out, out / "tf" / "balance.png", "teacher forcing: per-rank balance"))
    if kv_png:
        lines.append(_img(out, kv_png, "KV cache bytes over time"))
    lines.append(_img(out, out / "video.timeline.png", "generation and decoding timeline"))
    lines += ["", "## Artefacts", ""]
    for name, rel in (
        ("video shards", "video_shards/manifest.json"), ("latent shards", "latent_shards/manifest.json"),
        ("teacher forcing run", "tf"), ("QAT run", "qat"), ("DMD run", "dmd"), ("DMD LoRA", "dmd/lora"),
        ("fidelity figures", "fidelity.json"), ("drift", "drift/eval.md"), ("logs", "logs"),
    ):  # fmt: skip
        if (out / rel).exists():
            lines.append(f"- {name}: [{rel}]({rel})")
    path = out / "report.md"
    path.write_text("\n".join(ln for ln in lines if ln is not None) + "\n")
    return path
