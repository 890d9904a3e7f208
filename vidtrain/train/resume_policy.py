"""What a resumed run may change: the recipe of the checkpoint against the recipe given now.

A resume continues a run exactly. Settings that only steer the loop from outside (how long it
runs, how often it logs and checkpoints, what it verifies, where it logs) may change and are
applied with a line each; anything else (model shape, flavor, data, method, seed, parallel
layout, optimizer and schedule shape, precision) cannot be honoured exactly, so it is refused
with a one-line diff unless `train.resume_changes=allow`. A few (`FIXED`: the error bank's
buckets and entries per bucket, whose sizes the checkpoint's state has) are refused even then.
"""

from __future__ import annotations

from typing import Any

from vidtrain.config import ConfigError

# dotted keys (or section prefixes ending in ".") that a resume may change
SAFE = (
    "run.dir",  # a moved run folder
    "run.name",
    "run.resume",
    "train.max_steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.verify_checkpoints",
    "train.on_nonfinite",
    "train.max_nonfinite_skips",
    "train.resume",
    "train.resume_changes",
    "parallel.timeout_s",
    "data.verify_shards",
    "data.on_bad_sample",
    "log.",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# dotted keys that a resume can never change, not even with train.resume_changes=allow: the
# checkpoint's state has their shape (the error bank's buckets x entries)
FIXED = {
    "method.error_recycling.buckets": "the error bank's timestep buckets",
    "method.error_recycling.bank_size": "the error bank's entries per bucket",
}


def is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


# keys an older vidtrain's recipe lacks whose old behaviour is not the new default: a checkpoint
# written before model.text_padding existed trained with masked caption pads
BEFORE_THE_KEY = {"model.text_padding": "masked"}


def recipe_changes(stored: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(safe, unsafe) changes as 'key: old -> new'; keys one side lacks (a newer or older
    vidtrain's schema) are not changes, but for those of BEFORE_THE_KEY (their old behaviour)."""
    a, b = flatten(stored), flatten(new)
    for key, old in BEFORE_THE_KEY.items():
        if any(k.startswith(key.rsplit(".", 1)[0] + ".") for k in a):  # the section is there
            a.setdefault(key, old)
    safe, unsafe = [], []
    for key in sorted(a.keys() & b.keys()):
        if a[key] != b[key]:
            (safe if is_safe(key) else unsafe).append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return safe, unsafe


def _bank_kept(stored: dict[str, Any], new: dict[str, Any]) -> bool:
    """Both recipes recycle errors (a bank is in the checkpoint and one is asked for)."""
    key = "method.error_recycling.enabled"
    return bool(flatten(stored).get(key)) and bool(flatten(new).get(key))


def check_resume(stored: dict[str, Any], new: dict[str, Any], where: str) -> list[str]:
    """Lines to print for the applied changes; ConfigError for changes that cannot be honoured."""
    safe, unsafe = recipe_changes(stored, new)
    fixed = [c for c in unsafe if c.split(":", 1)[0] in FIXED]
    if fixed and _bank_kept(stored, new):
        what = ", ".join(FIXED[c.split(":", 1)[0]] for c in fixed)
        raise ConfigError(
            f"resuming {where} with {'; '.join(fixed)}: the checkpoint holds {what} at the old size and "
            "cannot be resized (not even with train.resume_changes=allow); keep the old value, or start "
            "over with run.resume=false or a new run.dir"
        )
    allow = flatten(new).get("train.resume_changes") == "allow"
    if unsafe and not allow:
        raise ConfigError(
            f"resuming {where} with a changed recipe that cannot be honoured exactly: {'; '.join(unsafe)} "
            "(pass train.resume_changes=allow to accept, run.resume=false or a new run.dir to start over)"
        )
    notes = [f"resume applies {c}" for c in safe]
    notes += [f"resume accepts (train.resume_changes=allow) {c}" for c in unsafe]
    return notes
