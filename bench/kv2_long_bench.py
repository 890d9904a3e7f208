"""kv2 (2-bit KV cache) vs NVFP4, FP8 and naive 2-bit RTN over a long multi-shot stream: latent error.

    python bench/kv2_long_bench.py [--chunks-per-shot 8] [--seeds 8] [--out runs/kv2_long.json]

The shipped demo DiT (vidtrain/assets/demo/dit, trained on the demo clips) streams one long
multi-shot video per cache format with the settings it was trained with (`SamplerConfig.from_run`,
bounded: a 6-frame window, a 3-frame global sink and the shot sink), the prompts of
vidtrain/assets/demo/shots.yaml (the first --shots of them) encoded by the demo text encoder
(`load_text_encoder` / `shot_conditionings` of `vidtrain sample`), the same seeds and so the same
noise for every format. The bf16 cache is the reference; per format: the largest KV cache
bytes any chunk attended to (its ratio to bf16's; with the bounded window, the steady state),
the relative L2 error of the latents against the bf16 run's over the whole video, per shot and
per chunk (chunk 0 attends to no cache: exactly 0 for every format; chunk 1 is the first chunk
that reads one), and the stream's wall time. For
scale, the row "bf16, other seeds" is the same error between two unrelated videos (bf16, seeds
shifted by N: other noise, same prompts); --no-unrelated skips it.

Formats: the sampler's caches (fp32, bf16, fp8, nvfp4 with the amax and mse scale rules, kv2) and
`rtn2`, naive 2-bit round-to-nearest per token and block of channels (`kv2.rtn2_fake_quantize`),
which the sampler has no cache for: emulated here (the fake-quantized K/V kept in an fp32 cache,
its bytes counted as stored: 2-bit codes + fp16 scale and zero point per block). `--seeds N`
streams N seeds as one batch (every format quantizes each sample and head alone) and reports
mean +- std over them. Deterministic given --seed (one intra-op thread by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_json

from vidtrain.demo import DEMO_ASSETS
from vidtrain.formats import kv2
from vidtrain.sample.cli import load_model, load_text_encoder, shot_conditionings
from vidtrain.sample.kv_cache import KVCache
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler
from vidtrain.sample.shots import load_shots

# name -> (SamplerConfig.kv_cache, kv_scale_rule); "rtn2" is emulated (RTN2Cache)
FORMATS = {
    "bf16": ("bf16", "amax"),
    "fp32": ("fp32", "amax"),
    "fp8": ("fp8", "amax"),
    "nvfp4": ("nvfp4", "amax"),
    "nvfp4-mse": ("nvfp4", "mse"),
    "kv2": ("kv2", "amax"),
    "rtn2": ("fp32", "amax"),
}
DEFAULT_FORMATS = "bf16,fp32,fp8,nvfp4,nvfp4-mse,kv2,rtn2"
REFERENCE = "bf16"
UNRELATED = "bf16, other seeds"  # not a cache format: the error of an unrelated video, for scale


class RTN2Cache(KVCache):
    """A KV cache of naive 2-bit RTN blocks, emulated: K/V fake-quantized on write and kept in
    fp32; `nbytes` counts what RTN stores (L*D/4 code bytes + an fp16 scale and zero point per
    token and block of `block` channels)."""

    def __init__(self, *args, block: int = 16, **kw) -> None:
        super().__init__(*args, **kw)
        self.block = block

    def _write(self, layer, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> None:
        if k_BHLD.shape[-1] % self.block:
            raise ValueError(f"--rtn-block {self.block} must divide the head dim {k_BHLD.shape[-1]}")
        q = lambda t: kv2.rtn2_fake_quantize(t.float(), self.block)  # noqa: E731
        super()._write(layer, q(k_BHLD), q(v_BHLD))

    def nbytes(self) -> int:
        elements = super().nbytes() // 4  # fp32 storage
        # the format's own count, each block of channels taken as one row of `block` elements
        return kv2.rtn2_nbytes_per_block(elements // self.block, self.block, self.block)


class RTN2Sampler(StreamingSampler):
    """The sampler with RTN2Cache in place of its own cache (everything else as it is)."""

    rtn_block = 16

    def new_cache(self, tokens_per_frame: int) -> KVCache:
        cfg = self.config
        return RTN2Cache(
            len(self.model.blocks), cfg.rule(), tokens_per_frame, "fp32", static=cfg.compile,
            block=self.rtn_block,
        )  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def stream(model, cfg: SamplerConfig, conds, chunks_per_shot, latent_hw, seeds, rtn_block: int | None):
    """(latents [B, C, F, H, W], peak KV bytes attended per sample, wall seconds)."""
    if rtn_block is None:
        sampler = StreamingSampler(model, cfg)
    else:
        sampler = RTN2Sampler(model, cfg)
        sampler.rtn_block = rtn_block
    t0 = time.perf_counter()
    outs = list(sampler.stream(conds, chunks_per_shot, latent_hw, seeds))
    wall = time.perf_counter() - t0
    z = torch.cat([c.x0_BCFHW.detach().float() for c in outs], dim=2)
    return z, max(c.kv_bytes for c in outs) // len(seeds), wall


def errors(z: torch.Tensor, ref: torch.Tensor, chunks_per_shot: list[int], fpc: int) -> dict:
    """Per sample: relative L2 over the video, per shot and per chunk."""
    bounds, start = [], 0
    for n in chunks_per_shot:
        bounds.append((start * fpc, (start + n) * fpc))
        start += n
    n_chunks = sum(chunks_per_shot)
    out = []
    for b in range(z.shape[0]):
        zb, rb = z[b], ref[b]
        out.append({
            "overall": _rel(zb, rb),
            "per_shot": [_rel(zb[:, lo:hi], rb[:, lo:hi]) for lo, hi in bounds],
            "per_chunk": [_rel(zb[:, i * fpc : (i + 1) * fpc], rb[:, i * fpc : (i + 1) * fpc]) for i in range(n_chunks)],
        })  # fmt: skip
    return out


def _ms(xs: list[float]) -> dict:
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(xs) > 1 else 0.0}


def summarize(per_sample: list[dict]) -> dict:
    n_shots, n_chunks = len(per_sample[0]["per_shot"]), len(per_sample[0]["per_chunk"])
    return {
        "overall": _ms([s["overall"] for s in per_sample]),
        "per_shot": [_ms([s["per_shot"][i] for s in per_sample]) for i in range(n_shots)],
        "per_chunk": [_ms([s["per_chunk"][i] for s in per_sample]) for i in range(n_chunks)],
    }


def _fmt(m: dict, n: int) -> str:
    return f"{m['mean']:.4f}" if n == 1 else f"{m['mean']:.4f} ± {m['std']:.4f}"


def table(rows: list[dict], n_seeds: int) -> str:
    n_shots = len(rows[0]["error"]["per_shot"])
    shots = " | ".join(f"shot {i}" for i in range(n_shots))
    lines = [
        f"| format | KV bytes / sample | vs bf16 | rel L2 overall | {shots} | chunk 1 | last chunk | wall s |",
        "|---|---:|---:|---:|" + "---:|" * n_shots + "---:|---:|---:|",
    ]
    for r in rows:
        e = r["error"]
        per_shot = " | ".join(_fmt(m, n_seeds) for m in e["per_shot"])
        c1 = _fmt(e["per_chunk"][1], n_seeds) if len(e["per_chunk"]) > 1 else "-"
        lines.append(
            f"| {r['format']} | {r['kv_bytes']} | {r['bytes_vs_bf16']:.3f} | {_fmt(e['overall'], n_seeds)} | "
            f"{per_shot} | {c1} | {_fmt(e['per_chunk'][-1], n_seeds)} | {r['wall_s']:.2f} |"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO_ASSETS / "dit"), help="the DiT (default: the demo's)")
    p.add_argument("--shots-file", default=str(DEMO_ASSETS / "shots.yaml"), help="prompts, one per shot")
    p.add_argument("--shots", type=int, default=3, help="the first N prompts of --shots-file, one shot each")
    p.add_argument("--chunks-per-shot", type=int, default=8, help="chunks of every shot")
    p.add_argument(
        "--text-encoder", default=str(DEMO_ASSETS / "text_encoder"),
        help="umT5 folder (default: the demo's); 'none' for the sampler's fixed random contexts",
    )  # fmt: skip
    p.add_argument("--latent-size", type=int, default=8, help="latent height = width (the demo: 8, 64 px)")
    p.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--rtn-block", type=int, default=16, help="channels per scale of the rtn2 emulation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=8, help="seeds seed..seed+N-1 (one batch); mean ± std")
    p.add_argument(
        "--no-unrelated", dest="unrelated", action="store_false",
        help="skip the 'bf16, other seeds' row (the error of an unrelated video, for scale)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", default=None, help="write the figures here (JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    names = [f.strip() for f in a.formats.split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise SystemExit(f"unknown format(s) {unknown}; known: {', '.join(FORMATS)}")
    names = [REFERENCE] + [f for f in names if f != REFERENCE]
    if a.shots < 1 or a.chunks_per_shot < 1 or a.seeds < 1:
        raise SystemExit("--shots, --chunks-per-shot and --seeds must be >= 1")
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    model = load_model(a.checkpoint, None).to(device, torch.float32).eval().requires_grad_(False)
    base = SamplerConfig.from_run(a.checkpoint, None, {}, bounded=True)
    shots = load_shots(a.shots_file, fps=16.0, frames_per_chunk=base.frames_per_chunk)
    if a.shots > len(shots):
        raise SystemExit(f"--shots {a.shots}: {a.shots_file} has {len(shots)}")
    shots = shots[: a.shots]
    seeds = [a.seed + i for i in range(a.seeds)]
    te = None if a.text_encoder == "none" else a.text_encoder
    enc = load_text_encoder(te, model.cfg.text_dim, device, base.text_len)
    conds = shot_conditionings([[s.prompt] * len(seeds) for s in shots], enc, model.cfg.text_dim, base)
    chunks_per_shot = [a.chunks_per_shot] * len(shots)
    hw = (a.latent_size, a.latent_size)

    runs = {}
    for name in names:
        kv, rule = FORMATS[name]
        cfg = dataclasses.replace(base, kv_cache=kv, kv_scale_rule=rule)
        runs[name] = stream(
            model, cfg, conds, chunks_per_shot, hw, seeds, a.rtn_block if name == "rtn2" else None
        )
        print(f"[kv2_long] {name}: {runs[name][2]:.2f} s", file=sys.stderr, flush=True)
    if a.unrelated:  # the scale of "a different video": bf16 with other seeds (other noise)
        other = [s + len(seeds) for s in seeds]
        runs[UNRELATED] = stream(
            model, dataclasses.replace(base, kv_cache="bf16"), conds, chunks_per_shot, hw, other, None
        )
        names.append(UNRELATED)
    ref, ref_bytes, _ = runs[REFERENCE]
    rows = []
    for name in names:
        z, nbytes, wall = runs[name]
        per_sample = errors(z, ref, chunks_per_shot, base.frames_per_chunk)
        rows.append({
            "format": name, "kv_cache": FORMATS.get(name, ("bf16",))[0],
            "kv_scale_rule": FORMATS.get(name, ("bf16", "amax"))[1],
            "kv_bytes": nbytes, "bytes_vs_bf16": nbytes / ref_bytes, "wall_s": wall,
            "error": summarize(per_sample), "per_seed": per_sample,
        })  # fmt: skip
    print(table(rows, len(seeds)))
    settings = {
        "checkpoint": a.checkpoint, "prompts": [s.prompt for s in shots], "chunks_per_shot": chunks_per_shot,
        "frames_per_chunk": base.frames_per_chunk, "latent_hw": list(hw), "window_frames": base.window_frames,
        "sink_frames": base.sink_frames, "shot_sink": base.shot_sink, "timesteps": list(base.timesteps),
        "shift": base.shift, "text_encoder": te, "seeds": seeds, "rtn_block": a.rtn_block, "reference": REFERENCE,
    }  # fmt: skip
    if a.out:
        env = {"cpus": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
               "machine": platform.processor() or platform.machine()}  # fmt: skip
        write_json(a.out, {"settings": settings, "env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
