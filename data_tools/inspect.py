"""vidtrain-inspect: counts, shapes and checksums of a video or latent shard set.

    vidtrain-inspect SHARDS [--contact-sheet sheet.png] [--max-samples 64]

Verifies every shard against manifest.json (sample count and sha256), reports the clip or
latent shapes seen (decoding up to `--max-samples` samples), and for video shards draws a
contact sheet: one row per sample, `--sheet-frames` frames spread over the clip. Exit code 1
when a shard is missing or does not match the manifest.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from vidtrain.data_tools._shards import (
    ToolError,
    error_text,
    load_manifest,
    readable_keys,
    resolve_shards,
    run_cli,
    sha256_file,
)

TOOL = "vidtrain-inspect"


def _samples(shard: Path):
    import webdataset as wds

    yield from wds.WebDataset(
        [str(shard)], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
    )


def verify(shards: list[Path], manifest: dict[str, Any] | None) -> tuple[list[str], int]:
    """Check each shard against the manifest; return problems and the sample count."""
    problems, total = [], 0
    listed = {s["name"]: s for s in (manifest or {}).get("shards", [])}
    for p in shards:
        if not p.is_file():
            problems.append(f"{p.name}: missing")
            continue
        keys, unreadable = readable_keys(p)
        n = len(keys)
        total += n
        if unreadable:
            problems.append(f"{p.name}: {unreadable}")
        want = listed.get(p.name)
        if want is None:
            continue
        if want["samples"] != n:
            problems.append(f"{p.name}: {n} samples, manifest says {want['samples']}")
        if sha256_file(p) != want["sha256"]:
            problems.append(f"{p.name}: checksum MISMATCH")
    return problems, total


def describe(
    shards: list[Path], max_samples: int, problems: list[str] | None = None
) -> tuple[str, Counter, list[dict[str, Any]]]:
    """Kind of shard set, a count of shapes, and (for video) a few decoded clips. Samples that
    cannot be decoded or hold non-finite latents are added to `problems`."""
    shapes: Counter = Counter()
    kind, clips, seen = "unknown", [], 0
    problems = [] if problems is None else problems
    for p in shards:
        if not p.is_file():
            continue
        try:
            for s in _samples(p):
                if seen >= max_samples:
                    return kind, shapes, clips
                seen += 1
                try:
                    kind = _describe_sample(s, shapes, clips) or kind
                except Exception as e:  # a damaged sample: reported, the rest still described
                    problems.append(f"{p.name}: sample {s['__key__']}: {type(e).__name__}: {error_text(e)}")
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(f"{p.name}: unreadable ({type(e).__name__}: {error_text(e)})")
    return kind, shapes, clips


def _describe_sample(s: dict[str, Any], shapes: Counter, clips: list[dict[str, Any]]) -> str | None:
    import decord

    if "mp4" in s:
        vr = decord.VideoReader(io.BytesIO(s["mp4"]))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        shapes["x".join(map(str, frames.shape[:3])) + " (frames x H x W)"] += 1
        clips.append({"key": s["__key__"], "frames": frames})
        return "video"
    if "latents.npy" in s:
        lat = np.load(io.BytesIO(s["latents.npy"]))
        shapes["latents " + "x".join(map(str, lat.shape))] += 1
        arrays = [("latents", lat)]
        if "text.npy" in s:
            t = np.load(io.BytesIO(s["text.npy"]))
            shapes[f"text width {t.shape[-1]} ({t.dtype})"] += 1
            arrays.append(("text", t))
        for name, a in arrays:
            if not np.isfinite(a).all():
                raise ValueError(f"{name} hold non-finite values (NaN/Inf)")
        return "latent"
    return None


def contact_sheet(clips: list[dict[str, Any]], path: Path, frames_per_row: int, rows: int) -> None:
    """A grid PNG: one row per clip, frames spread evenly over it, the key above each row."""
    from PIL import Image, ImageDraw

    clips = clips[:rows]
    if not clips:
        raise ToolError("no decodable clip to draw")
    h, w = clips[0]["frames"].shape[1:3]
    label, pad = 12, 2
    sheet = Image.new(
        "RGB", (frames_per_row * (w + pad) + pad, len(clips) * (h + label + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(sheet)
    for r, clip in enumerate(clips):
        f = clip["frames"]
        y = pad + r * (h + label + pad)
        draw.text((pad, y), clip["key"][:80], fill="black")
        for c, i in enumerate(np.linspace(0, len(f) - 1, frames_per_row).round().astype(int)):
            img = Image.fromarray(f[i]).resize((w, h)) if f[i].shape[:2] != (h, w) else Image.fromarray(f[i])
            sheet.paste(img, (pad + c * (w + pad), y + label))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def run(args: argparse.Namespace) -> int:
    try:
        shards = resolve_shards(args.shards)
    except ValueError as e:
        raise ToolError(str(e)) from e
    folder = Path(args.shards) if Path(args.shards).is_dir() else Path(args.shards).parent
    manifest = load_manifest(folder)
    problems, total = verify(shards, manifest)
    kind, shapes, clips = describe(shards, args.max_samples, problems)
    listed = f" (manifest: {manifest['num_samples']})" if manifest else " (no manifest.json)"
    print(f"{folder}: {kind} shards, {len(shards)} shard(s), {total} sample(s){listed}")
    if manifest:
        print(f"  skipped inputs in manifest: {len(manifest.get('skipped', []))}")
        for s in manifest.get("skipped", [])[:10]:
            print(f"    {s['input']}: {s['reason']}")
    for shape, n in sorted(shapes.items()):
        print(
            f"  {shape}: {n}" + (f" (first {args.max_samples} samples)" if total > args.max_samples else "")
        )
    for p in problems:
        print(f"  PROBLEM {p}")
    if manifest:
        print("  checksums OK" if not problems else f"  {len(problems)} problem(s)")
    if args.contact_sheet:
        if kind != "video":
            raise ToolError(f"--contact-sheet needs video shards; {folder} holds {kind} shards")
        contact_sheet(clips, Path(args.contact_sheet), args.sheet_frames, args.sheet_rows)
        print(f"  contact sheet: {args.contact_sheet}")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog=TOOL,
        description="Counts, shapes, checksums and a contact sheet of shards.",
    )
    p.add_argument("shards", help="shard folder, manifest.json or .tar")
    p.add_argument("--contact-sheet", default=None, help="write a PNG grid of sample frames (video shards)")
    p.add_argument("--sheet-rows", type=int, default=8, help="clips in the contact sheet")
    p.add_argument("--sheet-frames", type=int, default=6, help="frames per clip in the contact sheet")
    p.add_argument("--max-samples", type=int, default=64, help="samples decoded for shapes and the sheet")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(TOOL, run, args)


if __name__ == "__main__":
    sys.exit(main())
