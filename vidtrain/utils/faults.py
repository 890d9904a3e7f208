"""Fault injection for the run-safety tests (and for anyone who wants to see a fault handled).

`VIDTRAIN_FAULT=<stage>@<step>[@<rank>]` names one fault; unset, every call here is a no-op.
- a checkpoint stage (vidtrain.train.checkpoint.FAULT_STAGES: begin, model, state, engine_begin,
  engine, manifest, rename, latest): the process ends with `os._exit(86)` at that point of the
  write of step <step>'s checkpoint, as a kill or a node failure would end it;
- `nan`: the loss of step <step> (1-based, as in metrics.jsonl) is made NaN.
"""

from __future__ import annotations

import os

FAULT_ENV = "VIDTRAIN_FAULT"
KILL_EXIT_CODE = 86


def fault(stage: str, step: int, rank: int = 0) -> bool:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    parts = spec.split("@")
    if len(parts) not in (2, 3) or not all(p.lstrip("-").isdigit() for p in parts[1:]):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <stage>@<step>[@<rank>]")
    return parts[0] == stage and int(parts[1]) == step and (len(parts) == 2 or int(parts[2]) == rank)


def kill_point(stage: str, step: int, rank: int = 0) -> None:
    if fault(stage, step, rank):
        os._exit(KILL_EXIT_CODE)
