"""Shard-set plumbing shared by the data tools: atomic shard writing, resume scan, manifest.

A shard set is a folder of `shard-NNNNNN.tar` webdataset files plus `manifest.json`.
Every shard is written as `shard-NNNNNN.tar.tmp` and renamed when complete, so a killed run
never leaves a half-written shard under a final name; the manifest is written last, the
same way. A re-run reads the keys of the finished shards and skips those samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vidtrain.utils import quiet

SHARD_GLOB = "shard-*.tar"
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
TMP_SUFFIX = ".tmp"
MANIFEST = "manifest.json"
SETTINGS = ".vidtrain-settings.json"


class ToolError(ValueError):
    """A user error a tool reports as one line (no traceback)."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def safe_key(text: str) -> str:
    """A webdataset key: no dots (they split the extension) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def check_writable(out_dir: Path) -> None:
    """Create `out_dir` and prove a file can be written there, else raise a one-line ToolError."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ToolError(
            f"output folder {out_dir} is not writable ({e.strerror or e}); pick another output folder"
        ) from e


HASH_BLOCK = 4 << 20  # bytes read per step while hashing (bench/verify_bench.py)


def sha256_file(path: Path, block: int = HASH_BLOCK) -> str:
    """sha256 of a file, streamed in `block`-byte reads into one reused buffer (constant memory)."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def check_shard(path: Path, entry: dict[str, Any]) -> str | None:
    """None when the shard matches its manifest entry (size first, then sha256), else what is wrong."""
    size = path.stat().st_size
    want = entry.get("bytes")
    if want is not None and size != want:
        return f"{size} bytes, manifest.json says {want} (truncated or changed after it was written)"
    if entry.get("sha256"):
        got = sha256_file(path)
        if got != entry["sha256"]:
            return (
                f"sha256 {got[:16]}... does not match manifest.json's {entry['sha256'][:16]}... "
                "(damaged or changed after it was written)"
            )
    return None


def readable_keys(path: Path) -> tuple[list[str], str | None]:
    """The sample keys of a shard read as far as it goes, and why it stopped early (None: it did not)."""
    keys: list[str] = []
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                key = Path(m.name).name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    except (tarfile.TarError, OSError, EOFError) as e:
        return keys, f"unreadable after {len(keys)} sample(s) ({type(e).__name__}: {error_text(e)})"
    return keys, None


def error_text(e: BaseException) -> str:
    """First line of an exception's message (webdataset wraps tar errors in a tuple with the file)."""
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return msg.split(" @ <", 1)[0].splitlines()[0][:200] if msg else type(e).__name__


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}{TMP_SUFFIX}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def shard_keys(path: Path) -> list[str]:
    """The sample keys of a finished shard, in order (webdataset groups members by key)."""
    keys: list[str] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key = Path(m.name).name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


def finished_shards(out_dir: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in out_dir.glob(SHARD_GLOB) if (m := _SHARD_RE.match(p.name))}


def remove_stale_tmp(out_dir: Path) -> list[str]:
    """Delete temp files a killed run left behind; return their names."""
    stale = sorted(p for p in out_dir.glob(f"*{TMP_SUFFIX}") if p.is_file())
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into a folder made with other content-changing settings."""
    path = out_dir / SETTINGS
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff and finished_shards(out_dir):
            desc = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ToolError(f"{out_dir} holds shards made with other settings ({desc}); use an empty folder")
    atomic_write_json(path, settings)


class RollingShardWriter:
    """Writes samples into numbered shards, rolling over at a sample count or byte size.

    Each shard is a `.tmp` file until it is complete; `close()` finishes the last one.
    """

    def __init__(
        self, out_dir: Path, start_index: int, samples_per_shard: int | None, max_bytes: int | None
    ) -> None:
        if not samples_per_shard and not max_bytes:
            raise ValueError("give samples_per_shard or max_bytes")
        self.out_dir = out_dir
        self.index = start_index
        self.samples_per_shard = samples_per_shard
        self.max_bytes = max_bytes
        self.written: list[dict[str, Any]] = []  # shards finished by this writer
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        tmp = self.out_dir / (shard_name(self.index) + TMP_SUFFIX)
        self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed by _finish)
        self._count, self._bytes = 0, 0

    def _finish(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        final = self.out_dir / shard_name(self.index)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.written.append(shard_info(final, self._count))
        self.index += 1

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: `files` maps extension (`mp4`, `json`, ...) to bytes."""
        size = sum(len(b) + 1024 for b in files.values())
        full = self._tar is not None and (
            (self.samples_per_shard and self._count >= self.samples_per_shard)
            or (self.max_bytes and self._count > 0 and self._bytes + size > self.max_bytes)
        )
        if full:
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext in sorted(files):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(files[ext])
            info.mtime = 0  # deterministic bytes: same inputs give the same checksum
            self._tar.addfile(info, io.BytesIO(files[ext]))
        self._count += 1
        self._bytes += size

    def close(self) -> None:
        if self._tar is not None:
            self._finish()


def shard_info(path: Path, samples: int | None = None) -> dict[str, Any]:
    if samples is None:
        samples = len(shard_keys(path))
    return {"name": path.name, "samples": samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(
    out_dir: Path,
    kind: str,
    args: dict[str, Any],
    skipped: list[dict[str, str]],
    extra: dict[str, Any] | None = None,
    shards: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Describe every finished shard of `out_dir` (checksums recomputed) and write manifest.json."""
    if shards is None:
        shards = [shard_info(p) for _, p in sorted(finished_shards(out_dir).items())]
    manifest = {
        "format": kind,
        "version": 1,
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(s["samples"] for s in shards),
        "skipped": skipped,
        "args": args,
        **(extra or {}),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def load_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def manifest_of(source: str | Path | Iterable[str | Path]) -> dict[str, Any] | None:
    """The manifest a shard source is read through (a folder's or the given file), else None."""
    if not isinstance(source, (str, Path)):
        return None
    p = Path(source)
    if p.is_file() and p.name.endswith(".json"):
        return json.loads(p.read_text())
    return load_manifest(p) if p.is_dir() else None


def resolve_shards(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """Shard paths from a folder (manifest order if present), a manifest file, or a list of paths."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_file() and p.name.endswith(".json"):
            folder, manifest = p.parent, json.loads(p.read_text())
        elif p.is_dir():
            folder, manifest = p, load_manifest(p)
        elif p.is_file() and p.suffix == ".tar":
            return [p]
        else:
            raise ValueError(f"{p} is neither a shard folder, a manifest.json nor a .tar shard")
        if manifest is not None:
            return [folder / s["name"] for s in manifest["shards"]]
        shards = [q for _, q in sorted(finished_shards(folder).items())]
        if not shards:
            raise ValueError(f"no shard-NNNNNN.tar files in {folder}")
        return shards
    paths = [Path(s) for s in source]
    if not paths:
        raise ValueError("empty list of shards")
    return paths


def report_skipped(tool: str, skipped: list[dict[str, str]]) -> None:
    for s in skipped:
        print(f"{tool}: skipped {s['input']}: {s['reason']}", file=sys.stderr)


def run_cli(tool: str, run, args) -> int:
    """Run a data tool; a ToolError (bad input the user can fix) is one line and exit 2."""
    quiet.install()
    try:
        return run(args)
    except ToolError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2
