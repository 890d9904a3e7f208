"""vidtrain-shard: videos -> webdataset video shards of fixed-size clips.

    vidtrain-shard INPUT OUT --height 480 --width 832 --frames 81 --fps 16 --workers 8

INPUT is a folder of videos (caption from a sidecar `<stem>.txt`, else the file stem) or a
CSV / JSONL list with `path`, `caption` and optional `start`, `end` (seconds). Each video is
decoded with decord, sampled to `--fps`, resized to cover HxW and center-cropped, and cut into
non-overlapping clips of `--frames` = 1+4k frames. A sample holds

    __key__   <stem>_<8 hex of the source path>_c<clip>
    mp4       the clip re-encoded as H.264 (libx264, yuv420p, `--crf`, default 18: visually
              lossless, not bit-exact; every clip keeps exactly `--frames` frames)
    json      source, fps, source_fps, frames, size [H, W], clip range (frames and seconds), caption
    txt       the caption

Shards roll over at `--samples-per-shard` or `--shard-size-mb`. A re-run skips the samples of
finished shards; bad inputs are skipped and listed in manifest.json, which is written last.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vidtrain.data_tools._shards import (
    RollingShardWriter,
    ToolError,
    check_settings,
    check_writable,
    finished_shards,
    readable_keys,
    remove_stale_tmp,
    report_skipped,
    run_cli,
    safe_key,
    write_manifest,
)

TOOL = "vidtrain-shard"
VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg")
CLIPS_PER_TASK = 2  # clips per worker task: small enough to spread one long video


@dataclass(frozen=True)
class VideoInput:
    path: str
    caption: str
    start: float | None = None  # seconds
    end: float | None = None
    digest_len: int = 8  # hex digits of the source digest in its keys (longer only on a collision)


@dataclass(frozen=True)
class ClipSpec:
    height: int
    width: int
    frames: int
    fps: float | None  # None keeps the source rate
    stride: int  # target frames between clip starts
    max_clips: int | None
    crf: int


# ---------------------------------------------------------------- inputs


def list_inputs(source: Path) -> list[VideoInput]:
    """Videos of a folder (sorted, recursive) or the rows of a CSV / JSONL list.

    A list must be UTF-8; a row needs `path`; `start` / `end` are finite seconds >= 0 with end
    after start. Two rows of the same video and range are refused (their clips' keys would be
    equal); distinct videos whose keys would collide get a longer digest in the later one's keys.
    """
    if source.is_dir():
        vids = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file())
        return _unique_keys([(str(p), VideoInput(str(p), _sidecar_caption(p))) for p in vids])
    if not source.is_file():
        raise ToolError(f"input {source} does not exist (give a folder of videos, a .csv or a .jsonl)")
    suffix = source.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise ToolError(f"input {source}: expected a folder, a .csv or a .jsonl file")
    text = _read_utf8(source)
    rows: list[tuple[int, Any]] = []  # (line, row)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = [(reader.line_num, row) for row in reader]
        except csv.Error as e:
            raise ToolError(f"{source}:{reader.line_num}: not valid CSV ({e})") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ToolError(f"{source}:{n}: not a JSON object ({e.msg})") from None
    inputs = []
    for n, row in rows:
        if not isinstance(row, dict) or not row.get("path"):
            raise ToolError(f"{source}:{n}: no 'path' (columns: path, caption, optional start, end)")
        try:
            inputs.append((f"{source}:{n}", _row_input(row, source.parent)))
        except ValueError as e:
            raise ToolError(f"{source}:{n}: {e}") from None
    return _unique_keys(inputs)


def _read_utf8(source: Path) -> str:
    raw = source.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM, as spreadsheet programs write
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ToolError(
            f"{source}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save the list as UTF-8"
        ) from None


def _seconds(row: dict[str, Any], name: str) -> float | None:
    value = row.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return x


def _row_input(row: dict[str, Any], base: Path) -> VideoInput:
    path = Path(str(row["path"]))
    path = path if path.is_absolute() else base / path
    start, end = _seconds(row, "start"), _seconds(row, "end")
    if end is not None and end <= (start or 0.0):
        raise ValueError(f"end ({end:g} s) must be after start ({start or 0.0:g} s)")
    return VideoInput(str(path), str(row.get("caption") or path.stem), start, end)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _digest(ident: str, n: int) -> str:
    return _sha1(ident)[:n]


def _ident(video: VideoInput) -> str:
    return f"{Path(video.path).resolve()}|{video.start}|{video.end}"


def _key_prefix(video: VideoInput) -> str:
    return f"{safe_key(Path(video.path).stem)[:60]}_{_digest(_ident(video), video.digest_len)}"


def _unique_keys(inputs: list[tuple[str, VideoInput]]) -> list[VideoInput]:
    """Refuse two inputs of the same video and range; give a distinct video whose key prefix
    collides with an earlier one's a longer digest (16, then 40 hex), reported on stderr."""
    by_ident: dict[str, str] = {}
    by_prefix: dict[str, str] = {}
    out = []
    for where, v in inputs:
        ident = _ident(v)
        if ident in by_ident:
            raise ToolError(
                f"{where}: same video and clip range as {_where_short(by_ident[ident], where)} "
                f"({v.path}, start={v.start}, end={v.end}); their clips' keys would collide: remove one"
            )
        by_ident[ident] = where
        for n in (8, 16, 40):
            v = replace(v, digest_len=n)
            prefix = _key_prefix(v)
            if prefix not in by_prefix:
                break
            other = _where_short(by_prefix[prefix], where)
            print(f"{TOOL}: note: {where}: key {prefix} collides with {other} (another file); using a longer digest",
                  file=sys.stderr)  # fmt: skip
        by_prefix[prefix] = where
        out.append(v)
    return out


def _where_short(other: str, where: str) -> str:
    """'line N' when `other` is a line of the same list as `where`, else `other` itself."""
    src, _, line = other.rpartition(":")
    return f"line {line}" if src and where.startswith(src + ":") and line.isdigit() else other


def _sidecar_caption(video: Path) -> str:
    txt = video.with_suffix(".txt")
    if txt.is_file():
        text = txt.read_text(errors="replace").strip()
        if text:
            return text
    return video.stem


# ---------------------------------------------------------------- clip geometry


def clip_windows(
    n_src: int, src_fps: float, spec: ClipSpec, start: float | None, end: float | None
) -> list[list[int]]:
    """Source frame indices of every clip: time-sample to the target fps, then cut windows."""
    fps = spec.fps or src_fps
    t0 = max(0.0, start or 0.0)
    t1 = min(n_src / src_fps, end) if end is not None else n_src / src_fps
    n_out = max(0, math.floor((t1 - t0) * fps + 1e-6))
    idx = [min(n_src - 1, round((t0 + j / fps) * src_fps)) for j in range(n_out)]
    clips = [idx[s : s + spec.frames] for s in range(0, n_out - spec.frames + 1, spec.stride)]
    return clips[: spec.max_clips] if spec.max_clips else clips


def cover_size(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    """Smallest (h', w') with the source aspect ratio that covers (th, tw)."""
    scale = max(th / h, tw / w)
    return max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))


def center_crop(frames_THWC: np.ndarray, th: int, tw: int) -> np.ndarray:
    _, h, w, _ = frames_THWC.shape
    y, x = (h - th) // 2, (w - tw) // 2
    return frames_THWC[:, y : y + th, x : x + tw]


# ---------------------------------------------------------------- worker functions


def probe(video: VideoInput, spec: ClipSpec) -> dict[str, Any]:
    """Open a video; return its geometry and clip count, or the reason it is skipped."""
    path = Path(video.path)
    if not path.exists():
        return {"error": "file does not exist"}
    if path.stat().st_size == 0:
        return {"error": "empty file (0 bytes)"}
    try:
        import decord

        vr = decord.VideoReader(str(path), num_threads=1)
        n, fps = len(vr), float(vr.get_avg_fps())
        h, w = vr[0].shape[:2]
    except Exception as e:  # decord raises its own error types for corrupt / non-video input
        return {"error": f"cannot decode as video ({type(e).__name__}: {str(e).splitlines()[0][:160]})"}
    if n <= 0 or not fps > 0:
        return {"error": f"no frames or no frame rate (frames={n}, fps={fps})"}
    clips = clip_windows(n, fps, spec, video.start, video.end)
    if not clips:
        have = max(0, math.floor(n / fps * (spec.fps or fps)))
        return {"error": f"shorter than one clip: {have} frames at the target rate, need {spec.frames}"}
    return {"frames": n, "fps": fps, "height": h, "width": w, "clips": len(clips)}


def encode_mp4(frames_THWC: np.ndarray, fps: float, crf: int) -> bytes:
    import imageio_ffmpeg

    _, h, w, _ = frames_THWC.shape
    fd, tmp = tempfile.mkstemp(suffix=".mp4", prefix="vidtrain-clip-")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            tmp,
            (w, h),
            fps=fps,
            codec="libx264",
            quality=None,
            macro_block_size=16,
            output_params=["-crf", str(crf), "-preset", "medium", "-threads", "1"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for f in frames_THWC:
            writer.send(np.ascontiguousarray(f))
        writer.close()
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


def make_clips(task: tuple[VideoInput, dict[str, Any], ClipSpec, list[int]]) -> list[dict[str, Any]]:
    """Decode, resize, crop and encode some clips of one video. Errors come back as values."""
    video, meta, spec, clip_ids = task
    out: list[dict[str, Any]] = []
    try:
        import decord

        rh, rw = cover_size(meta["height"], meta["width"], spec.height, spec.width)
        vr = decord.VideoReader(video.path, width=rw, height=rh, num_threads=1)
        windows = clip_windows(meta["frames"], meta["fps"], spec, video.start, video.end)
        for c in clip_ids:
            idx = windows[c]
            frames = center_crop(vr.get_batch(idx).asnumpy(), spec.height, spec.width)
            out.append(
                _sample(video, meta, spec, c, idx, encode_mp4(frames, spec.fps or meta["fps"], spec.crf))
            )
    except Exception as e:
        out.append(
            {"error": f"failed while decoding clips ({type(e).__name__}: {str(e).splitlines()[0][:160]})"}
        )
    return out


def clip_key(video: VideoInput, clip: int) -> str:
    return f"{_key_prefix(video)}_c{clip:05d}"


def _sample(
    video: VideoInput, meta: dict[str, Any], spec: ClipSpec, c: int, idx: list[int], mp4: bytes
) -> dict:
    fps = spec.fps or meta["fps"]
    info = {
        "source": video.path,
        "fps": fps,
        "source_fps": meta["fps"],
        "frames": spec.frames,
        "size": [spec.height, spec.width],
        "source_size": [meta["height"], meta["width"]],
        "clip": {
            "index": c,
            "source_frames": [idx[0], idx[-1] + 1],
            "seconds": [idx[0] / meta["fps"], (idx[-1] + 1) / meta["fps"]],
        },
        "caption": video.caption,
    }
    files = {"mp4": mp4, "json": json.dumps(info).encode(), "txt": video.caption.encode()}
    return {"key": clip_key(video, c), "files": files}


# ---------------------------------------------------------------- driver


@contextlib.contextmanager
def _ordered_map(workers: int) -> Iterator[Callable]:
    """An ordered map: in-process for one worker, else over one spawn pool for the whole run."""
    if workers <= 1:
        yield map
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield lambda fn, items: pool.imap(fn, items, chunksize=1)


def _probe_one(args: tuple[VideoInput, ClipSpec]) -> dict[str, Any]:
    return probe(*args)


def run(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    out = Path(args.out)
    inputs = list_inputs(Path(args.input))
    if not inputs:
        raise ToolError(f"no videos found in {args.input} (extensions: {', '.join(VIDEO_EXTS)})")
    check_writable(out)
    settings = {"input": str(args.input), **asdict(spec)}
    settings.update(samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size_mb)
    check_settings(out, settings)
    stale = remove_stale_tmp(out)
    if stale:
        print(
            f"{TOOL}: removed {len(stale)} unfinished file(s) of an earlier run: {', '.join(stale)}",
            file=sys.stderr,
        )

    done_shards = finished_shards(out)
    done_keys: set[str] = set()
    for p in done_shards.values():
        keys, problem = readable_keys(p)
        if problem is not None:  # finished shards are renamed complete: this one was damaged since
            raise ToolError(
                f"finished shard {p} is damaged ({problem}); delete it and re-run to re-make its clips"
            )
        done_keys.update(keys)
    writer = RollingShardWriter(
        out,
        start_index=max(done_shards, default=-1) + 1,
        samples_per_shard=args.samples_per_shard,
        max_bytes=int(args.shard_size_mb * 2**20) if args.shard_size_mb else None,
    )
    with _ordered_map(args.workers) as pmap:
        tasks, skipped = _plan(inputs, spec, done_keys, pmap)
        if done_shards:
            n_todo = sum(len(t[3]) for t in tasks)
            print(
                f"{TOOL}: resuming: {len(done_shards)} finished shard(s), {n_todo} clip(s) to do",
                file=sys.stderr,
            )
        _write_all(tasks, writer, skipped, pmap, args)
    writer.close()
    report_skipped(TOOL, skipped)
    manifest = write_manifest(
        out,
        "vidtrain-video-shards",
        vars(args) | {"input": str(args.input), "out": str(out)},
        skipped,
        extra={"clip": {"frames": spec.frames, "height": spec.height, "width": spec.width, "fps": spec.fps}},
    )
    n, k = manifest["num_samples"], manifest["num_shards"]
    print(f"{TOOL}: {n} clips in {k} shard(s) in {out}; {len(skipped)} input(s) skipped")
    return 0 if n > 0 else 1


def _plan(inputs: list[VideoInput], spec: ClipSpec, done_keys: set[str], pmap: Callable) -> tuple[list, list]:
    """Probe every input; return the clip tasks still to do and the skipped inputs."""
    tasks, skipped = [], []
    for video, meta in zip(inputs, pmap(_probe_one, [(v, spec) for v in inputs])):
        if "error" in meta:
            skipped.append({"input": video.path, "reason": meta["error"]})
            continue
        todo = [c for c in range(meta["clips"]) if clip_key(video, c) not in done_keys]
        tasks += [
            (video, meta, spec, todo[i : i + CLIPS_PER_TASK]) for i in range(0, len(todo), CLIPS_PER_TASK)
        ]
    return tasks, skipped


def _write_all(tasks: list, writer: RollingShardWriter, skipped: list, pmap: Callable, args) -> None:
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t[3]) for t in tasks), unit="clip", desc=TOOL, disable=args.no_progress)
    for task, results in zip(tasks, pmap(make_clips, tasks)):
        for r in results:
            if "error" in r:
                skipped.append({"input": task[0].path, "reason": r["error"]})
                continue
            writer.write(r["key"], r["files"])
            bar.update(1)
    bar.close()


def _spec_from_args(args: argparse.Namespace) -> ClipSpec:
    if args.height % 16 or args.width % 16 or args.height <= 0 or args.width <= 0:
        raise ToolError(f"--height/--width must be positive multiples of 16, got {args.height}x{args.width}")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise ToolError(f"--frames must be 1+4k (1, 5, 9, 17, ..., 81), got {args.frames}")
    if args.fps is not None and args.fps <= 0:
        raise ToolError(f"--fps must be > 0, got {args.fps}")
    if args.workers < 1:
        raise ToolError(f"--workers must be >= 1, got {args.workers}")
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise ToolError("--samples-per-shard must be >= 1")
    if args.shard_size_mb is not None and args.shard_size_mb <= 0:
        raise ToolError("--shard-size-mb must be > 0")
    if args.samples_per_shard is None and args.shard_size_mb is None:
        args.shard_size_mb = 256.0
    if args.width < 64:
        print(
            f"{TOOL}: warning: decord 0.6 misreads some clips narrower than 64 px (16 and 48 seen)",
            file=sys.stderr,
        )
    if not 0 <= args.crf <= 51:
        raise ToolError(f"--crf must be in 0..51, got {args.crf}")
    return ClipSpec(
        args.height,
        args.width,
        args.frames,
        args.fps,
        args.clip_stride or args.frames,
        args.max_clips_per_video,
        args.crf,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog=TOOL,
        description="Cut videos into fixed-size clips in webdataset shards.",
    )
    p.add_argument("input", help="folder of videos, or a .csv / .jsonl with path,caption[,start,end]")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar and manifest.json")
    p.add_argument("--height", type=int, default=480, help="clip height, multiple of 16 (default 480)")
    p.add_argument("--width", type=int, default=832, help="clip width, multiple of 16 (default 832)")
    p.add_argument("--frames", type=int, default=81, help="frames per clip, 1+4k (default 81)")
    p.add_argument(
        "--fps", type=float, default=16.0, help="target frame rate (default 16; 0 keeps the source)"
    )
    p.add_argument(
        "--clip-stride", type=int, default=None, help="target frames between clip starts (default --frames)"
    )
    p.add_argument("--max-clips-per-video", type=int, default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--samples-per-shard", type=int, default=None)
    g.add_argument("--shard-size-mb", type=float, default=None, help="target shard size (default 256)")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality, 0 (best) .. 51 (default 18)")
    p.add_argument("--workers", type=int, default=1, help="decode/encode processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fps == 0:
        args.fps = None
    return run_cli(TOOL, run, args)


if __name__ == "__main__":
    sys.exit(main())
