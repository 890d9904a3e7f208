"""Multi-shot prompt files, checked strictly before any compute.

    # vidtrain sample --checkpoint RUN --shots recipes/shots_example.yaml --out video.mp4
    shots:
      - prompt: "a red car drives along a coastal road"
        chunks: 4          # duration in chunks (frames_per_chunk latent frames each)
      - prompt: "the camera pans across snowy mountains"
        seconds: 2.0       # or in seconds at --fps, rounded up to whole chunks

A chunk of C latent frames is 4*C pixel frames (the first chunk of a video 4*C - 3, as the VAE
keeps frame 0 alone), so `seconds` -> ceil(seconds * fps / (4 * C)) chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vidtrain.utils.io import read_yaml

SHOT_KEYS = {"prompt", "chunks", "seconds"}


@dataclass(frozen=True)
class Shot:
    prompt: str
    chunks: int


def parse_shots(data: object, *, fps: float, frames_per_chunk: int, source: str = "shots") -> list[Shot]:
    """Validate a loaded shots document; ValueError naming the shot and key that is wrong."""
    if not isinstance(data, dict) or set(data) != {"shots"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source}: expected a mapping with exactly the key 'shots', got {keys}")
    shots = data["shots"]
    if not isinstance(shots, list) or not shots:
        raise ValueError(f"{source}: 'shots' must be a non-empty list")
    out = []
    for i, s in enumerate(shots):
        where = f"{source}: shot {i}"
        if not isinstance(s, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(s).__name__}")
        unknown = sorted(set(s) - SHOT_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(SHOT_KEYS)}")
        prompt = s.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        if ("chunks" in s) == ("seconds" in s):
            raise ValueError(f"{where}: give exactly one of 'chunks' or 'seconds'")
        if "chunks" in s:
            n = s["chunks"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{where}: 'chunks' must be an integer >= 1, got {n!r}")
        else:
            sec = s["seconds"]
            if isinstance(sec, bool) or not isinstance(sec, (int, float)) or not 0 < sec < math.inf:
                raise ValueError(f"{where}: 'seconds' must be a finite number > 0, got {sec!r}")
            if not 0 < fps < math.inf:
                raise ValueError(f"--fps must be a finite number > 0, got {fps!r}")
            n = max(1, math.ceil(sec * fps / (4 * frames_per_chunk)))
        out.append(Shot(prompt, n))
    return out


def load_shots(path: str | Path, *, fps: float, frames_per_chunk: int) -> list[Shot]:
    data = read_yaml(path, "shots file")
    return parse_shots(data, fps=fps, frames_per_chunk=frames_per_chunk, source=str(path))
