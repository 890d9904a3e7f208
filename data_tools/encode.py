"""vidtrain-encode: video shards -> latent shards (VAE latents + text embeddings).

    vidtrain-encode VIDEO_SHARDS OUT --vae PATH --text-encoder PATH --batch-size 4
    torchrun --nproc-per-node 8 -m vidtrain.data_tools.encode VIDEO_SHARDS OUT ...  # RANK/WORLD_SIZE

Input shard i becomes output shard i (same name), encoded by rank `i % world_size`, so ranks
share nothing and a re-run skips every finished output shard. A latent sample holds

    __key__       the video sample's key
    latents.npy   float32 [C, F, H, W]: normalised VAE latents ((mu - mean) / std), F = 1 + (T-1)/4
    text.npy      float16 [L, D]: text-encoder states of the caption's L real tokens, at most
                  --max-text-len (a longer caption is truncated, said once). The padding is not
                  stored: the trainer pads each batch as the recipe's model.text_padding says
                  (wan: zeros up to model.text_len tokens, no mask, as Wan2.1; masked: to the
                  longest caption with a mask), so one shard set serves both
    json          the video sample's json plus caption, text_tokens, vae, text_encoder

Each rank writes `manifest.rank<r>-of-<n>.json`; the rank that completes the set merges them into
`manifest.json` (written last, atomically). An undecodable clip or shard is skipped and reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vidtrain.config import TEXT_LEN
from vidtrain.data_tools._shards import (
    TMP_SUFFIX,
    RollingShardWriter,
    ToolError,
    atomic_write_json,
    check_settings,
    check_shard,
    check_writable,
    manifest_of,
    report_skipped,
    resolve_shards,
    run_cli,
    shard_info,
    write_manifest,
)
from vidtrain.models.text import TextEncoder, make_tiny_text_encoder
from vidtrain.models.vae import CausalVideoVAE

TOOL = "vidtrain-encode"
VAE_FLAVOR_NAMES = ("debug", "wan2.1")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _sidecar(out: Path, name: str) -> Path:
    return out / f".{name}.json"


def load_vae(spec: str, seed: int, device: str, dtype: Any) -> Any:
    """`debug` / `wan2.1` build a random-initialised VAE (seeded); anything else is a weights path."""
    import torch

    if spec in VAE_FLAVOR_NAMES:
        if spec != "debug":
            print(
                f"{TOOL}: warning: --vae {spec} is random-initialised; give a weights path for real latents",
                file=sys.stderr,
            )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = CausalVideoVAE.from_flavor(spec)
    elif Path(spec).exists():
        vae = CausalVideoVAE.from_pretrained(spec)
    else:
        raise ToolError(
            f"--vae {spec!r} is neither a flavor ({', '.join(VAE_FLAVOR_NAMES)}) nor an existing path"
        )
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_text_encoder(args: argparse.Namespace, out: Path, device: str) -> Any:

    if args.tiny_text_encoder:
        path = out / ".tiny-text-encoder"
        if not (path / "config.json").exists():
            make_tiny_text_encoder(path, d_model=args.tiny_text_dim, seed=args.seed)
    else:
        path = Path(args.text_encoder)
    return TextEncoder.from_pretrained(path, max_length=args.max_text_len, device=device)


def decode_clip(mp4: bytes) -> np.ndarray:
    import decord

    vr = decord.VideoReader(io.BytesIO(mp4), num_threads=1)
    return vr.get_batch(list(range(len(vr)))).asnumpy()  # [T, H, W, 3] uint8


def read_video_samples(shard: Path) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    yield from wds.WebDataset(
        [str(shard)], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )


def vae_pass_size(latents_per_pass: int | None) -> int | str | None:
    """--latents-per-pass as `CausalVideoVAE.encode` takes it: None -> "auto" (the caches carried
    between passes, so every choice gives the same latents), 0 -> the whole clip in one pass."""
    if latents_per_pass is None:
        return "auto"
    if latents_per_pass < 0:
        raise ToolError(f"--latents-per-pass must be >= 0, got {latents_per_pass}")
    return latents_per_pass or None


class Encoder:
    """Batches clips of one shape through the VAE and their captions through the text encoder."""

    def __init__(self, vae: Any, text: Any, args: argparse.Namespace, device: str) -> None:
        self.vae, self.text, self.args, self.device = vae, text, args, device

    def check_clip(self, frames_THWC: np.ndarray) -> None:
        import torch

        self.vae.check_video(torch.empty((1, 3, *frames_THWC.shape[:3]), device="meta"))

    def encode_batch(
        self, clips_BTHWC: np.ndarray, captions: list[str]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        x = torch.from_numpy(clips_BTHWC).to(self.device).permute(0, 4, 1, 2, 3)  # -> [B, 3, T, H, W]
        x = x.to(next(self.vae.parameters()).dtype) / 127.5 - 1.0
        with torch.no_grad():
            z_BCFHW = self.vae.encode(x, latents_per_pass=vae_pass_size(self.args.latents_per_pass))
            emb_BLD, mask_BL = self.text.encode(captions)
        lens = mask_BL.sum(1).tolist()
        texts = [emb_BLD[b, :n].to(torch.float16).cpu().numpy() for b, n in enumerate(lens)]
        return z_BCFHW.float().cpu().numpy(), texts


def nonfinite_reason(z_CFHW: np.ndarray, t_LD: np.ndarray) -> str | None:
    """Why a sample's latents or text embeddings cannot be written (NaN/Inf), or None."""
    for name, a, hint in (
        ("latents", z_CFHW, "the VAE overflowed or the clip is corrupt; try --dtype fp32"),
        ("text embeddings", t_LD, "float16 overflow in the text encoder output"),
    ):
        bad = a.size - int(np.count_nonzero(np.isfinite(a)))
        if bad:
            return f"non-finite {name}: {bad} NaN/Inf value(s) of {a.size} ({hint})"
    return None


def encode_shard(src: Path, dst_index: int, out: Path, enc: Encoder, bar: Any) -> list[dict[str, str]]:
    """Encode one video shard into output shard `dst_index`; return the skipped samples."""
    skipped: list[dict[str, str]] = []
    writer = RollingShardWriter(out, dst_index, samples_per_shard=1 << 62, max_bytes=None)
    pending: list[tuple[str, np.ndarray, dict[str, Any]]] = []

    def flush() -> None:
        if not pending:
            return
        z, texts = enc.encode_batch(np.stack([p[1] for p in pending]), [p[2]["caption"] for p in pending])
        for (key, _, meta), z_CFHW, t_LD in zip(pending, z, texts):
            problem = nonfinite_reason(z_CFHW, t_LD)
            if problem is not None:  # refused: a NaN/Inf latent would poison every training step
                skipped.append({"input": f"{src.name}/{key}", "reason": problem})
                bar.update(1)
                continue
            meta = {**meta, "text_tokens": len(t_LD), "latent_shape": list(z_CFHW.shape)}
            meta.update(vae=enc.args.vae, text_encoder=enc.args.text_encoder or "tiny")
            writer.write(
                key, {"latents.npy": _npy(z_CFHW), "text.npy": _npy(t_LD), "json": json.dumps(meta).encode()}
            )
        bar.update(len(pending))
        pending.clear()

    for raw in read_video_samples(src):
        key = raw["__key__"]
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            meta["caption"] = raw["txt"].decode() if "txt" in raw else meta.get("caption", "")
            frames = decode_clip(raw["mp4"])
            enc.check_clip(frames)
        except Exception as e:
            skipped.append(
                {
                    "input": f"{src.name}/{key}",
                    "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                }
            )
            continue
        if pending and pending[0][1].shape != frames.shape:
            flush()
        pending.append((key, frames, meta))
        if len(pending) >= enc.args.batch_size:
            flush()
    flush()
    atomic_write_json(_sidecar(out, src.name), {"skipped": skipped})  # before the shard's rename
    writer.close()
    return skipped


def _rank_world(args: argparse.Namespace) -> tuple[int, int]:
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ToolError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world}")
    return rank, world


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    rank, world = _rank_world(args)
    if not args.tiny_text_encoder and not args.text_encoder:
        raise ToolError("give --text-encoder PATH (a local umT5/T5 folder) or --tiny-text-encoder")
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be >= 1, got {args.batch_size}")
    vae_pass_size(args.latents_per_pass)  # a negative --latents-per-pass fails before any work
    if args.max_text_len < 1:
        raise ToolError(f"--max-text-len must be >= 1, got {args.max_text_len}")
    try:
        shards = resolve_shards(args.input)
        manifest = manifest_of(args.input)
    except ValueError as e:
        raise ToolError(str(e)) from e
    entries = {str(s): e for s, e in zip(shards, manifest["shards"])} if manifest else {}
    out = Path(args.out)
    check_writable(out)
    settings = {
        k: getattr(args, k) for k in ("vae", "text_encoder", "tiny_text_encoder", "max_text_len", "seed")
    }
    check_settings(out, {"input": str(args.input), **settings})

    mine = [(i, s) for i, s in enumerate(shards) if i % world == rank]
    for i, _ in mine:  # unfinished files of a killed run of this rank
        Path(out / (f"shard-{i:06d}.tar" + TMP_SUFFIX)).unlink(missing_ok=True)
    todo = [(i, s) for i, s in mine if not (out / f"shard-{i:06d}.tar").exists()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(
        f"{TOOL}: rank {rank}/{world}: {len(mine)} shard(s), {len(mine) - len(todo)} already done, on {device}",
        file=sys.stderr,
    )

    skipped: list[dict[str, str]] = []
    if todo:
        enc = Encoder(
            load_vae(args.vae, args.seed, device, dtype), load_text_encoder(args, out, device), args, device
        )
        bar = tqdm(unit="clip", desc=TOOL, disable=args.no_progress)
        for i, src in todo:
            if not src.is_file():
                skipped.append({"input": str(src), "reason": "shard file does not exist"})
                continue
            problem = check_shard(src, entries[str(src)]) if str(src) in entries else None
            if problem is not None:  # damaged since vidtrain-shard wrote it: not encoded
                skipped.append({"input": str(src), "reason": f"input shard {problem}"})
                continue
            try:
                skipped += encode_shard(src, i, out, enc, bar)
            except Exception as e:  # an unreadable tar: its partial output is dropped
                Path(out / (f"shard-{i:06d}.tar" + TMP_SUFFIX)).unlink(missing_ok=True)
                skipped.append({"input": str(src), "reason": f"unreadable shard ({type(e).__name__}: {e})"})
        bar.close()
    return _finish(args, out, shards, mine, rank, world, skipped)


def _finish(args, out: Path, shards: list[Path], mine: list, rank: int, world: int, skipped: list) -> int:
    infos, done_skips = [], []
    for i, src in mine:
        dst = out / f"shard-{i:06d}.tar"
        if dst.exists():
            infos.append(shard_info(dst))
            side = _sidecar(out, src.name)
            if side.exists():
                done_skips += json.loads(side.read_text())["skipped"]
    all_skipped = done_skips + [s for s in skipped if s not in done_skips]
    report_skipped(TOOL, all_skipped)
    part = {"rank": rank, "world_size": world, "shards": infos, "skipped": all_skipped}
    atomic_write_json(out / f"manifest.rank{rank}-of-{world}.json", part)
    parts = [out / f"manifest.rank{r}-of-{world}.json" for r in range(world)]
    n_mine = sum(s["samples"] for s in infos)
    print(f"{TOOL}: rank {rank}: {n_mine} latent sample(s) in {len(infos)} shard(s) in {out}")
    if all(p.exists() for p in parts):
        loaded = [json.loads(p.read_text()) for p in parts]
        m = write_manifest(
            out,
            "vidtrain-latent-shards",
            vars(args) | {"world_size": world},
            [s for p in loaded for s in p["skipped"]],
            extra={
                "latent": {"text_dtype": "float16", "text_trimmed": True},
                "num_input_shards": len(shards),
            },
            shards=sorted((s for p in loaded for s in p["shards"]), key=lambda s: s["name"]),
        )
        print(f"{TOOL}: manifest.json: {m['num_samples']} sample(s) in {m['num_shards']} shard(s)")
    return 0 if n_mine > 0 or not mine else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog=TOOL,
        description="Encode video shards into latent shards.",
    )
    p.add_argument("input", help="video shard folder (with manifest.json), a manifest, or a .tar")
    p.add_argument("out", help="output folder for latent shards")
    p.add_argument("--vae", default="debug", help="debug | wan2.1 (random init) | PATH to Wan2.1 VAE weights")
    p.add_argument("--text-encoder", default=None, help="local umT5/T5 folder (encoder + tokenizer)")
    p.add_argument("--tiny-text-encoder", action="store_true", help="a tiny random umT5 (demos and tests)")
    p.add_argument("--tiny-text-dim", type=int, default=32, help="d_model of the tiny text encoder")
    p.add_argument(
        "--max-text-len", type=int, default=TEXT_LEN,
        help=f"tokens kept per caption (Wan: {TEXT_LEN}; at least the recipe's model.text_len)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="clips encoded together")
    p.add_argument(
        "--latents-per-pass", type=int, default=None,
        help="VAE latent frames per pass (default: as many as fit in half the free memory; 0 = whole clip)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="VAE compute dtype")
    p.add_argument("--rank", type=int, default=None, help="default: env RANK or 0")
    p.add_argument("--world-size", type=int, default=None, help="default: env WORLD_SIZE or 1")
    p.add_argument("--seed", type=int, default=0, help="init seed of random (flavor / tiny) models")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(TOOL, run, args)


if __name__ == "__main__":
    sys.exit(main())
