"""The run folder's checkpoint layout, read side: which step folders exist, which are intact.

A leaf module (it imports nothing of vidtrain's rooms) so that every room that resolves a run
folder to a model (the model loader, the sampler, the DMD teacher) reads it the same way as the
trainer's resume; `vidtrain/train/checkpoint.py` is the write side.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vidtrain.utils.io import sha256_file

_STEP_RE = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
STATE = "trainer_state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def staging_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every final-named step folder, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()
    )


def verify_checkpoint(folder: Path, hashes: bool = True, needs_engine: bool = False) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is intact.

    A folder without a manifest was written by a vidtrain older than manifests: it counts as
    intact when its trainer state is there (the caller says it was not verified).
    """
    manifest = folder / MANIFEST
    if not manifest.exists():
        if not (folder / STATE).exists():
            return f"no {MANIFEST} and no {STATE} (an incomplete write)"
    else:
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for rel, meta in files.items():
            path = folder / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != meta["size"]:
                return f"{rel} has {path.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
            if hashes and sha256_file(path) != meta["sha256"]:
                return f"{rel} does not match its sha256 (corrupted)"
    if needs_engine and not (folder / "engine").is_dir():
        return "no engine/ (DeepSpeed's optimizer state); train.resume=weights_only resumes without it"
    return None


def find_resumable(
    run_dir: Path, hashes: bool = True, needs_engine: bool = False
) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of a run and a line for each newer one that was skipped."""
    notes = []
    for _, folder in reversed(step_folders(run_dir)):
        reason = verify_checkpoint(folder, hashes, needs_engine)
        if reason is None:
            if not (folder / MANIFEST).exists():
                notes.append(
                    f"{folder.name} has no {MANIFEST} (written by an older vidtrain): used unverified"
                )
            return folder, notes
        notes.append(f"skipped {folder.name}: {reason}")
    return None, notes


def latest_checkpoint(run_dir: Path, hashes: bool = False) -> Path | None:
    """The newest intact checkpoint of a run folder (file sizes checked; sha256 with `hashes`)."""
    return find_resumable(Path(run_dir), hashes)[0]
