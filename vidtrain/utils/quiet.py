"""Known-harmless third-party noise, in one place: what is filtered, where, and why.

vidtrain's commands print their own lines; what other packages print is kept unless it is
listed here. `VIDTRAIN_VERBOSE=1` (or `--verbose` where a command has it) turns all filtering
off. Two mechanisms:
  - `install()`: Python warnings filters (by category, module and message) and logging filters
    (by logger and message), for the processes vidtrain's entry points run (`vidtrain ...`,
    the data tools, the launcher and the ranks it starts);
  - `noise_line(line)`: lines of a launcher's child output (DeepSpeed's runner) that say
    nothing to a user: dropped by `vidtrain-launch`, every other line passes through.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "VIDTRAIN_VERBOSE"

# (category, module regex, message regex, why it is harmless)
WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (FutureWarning, r"torch\.distributed", r".*all_gather_into_tensor` is deprecated",
     "DeepSpeed ZeRO calls the old collective name; torch keeps it working"),
    (DeprecationWarning, r"torch\.utils\._pytree", r".*Enum.*",
     "pytree registration notes from third-party packages at import"),
)  # fmt: skip

# (logger, message regex, why it is harmless)
LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    ("torchao", r"^Failed to load .*/torchao/_C_\w+.*\.so",
     "torchao's optional CUDA kernels on a machine without them (peft imports torchao)"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported",
     "torchao registers its Enums with pytree the older way"),
    ("DeepSpeed", r"^Setting accelerator to CPU", "a CPU machine: DeepSpeed's accelerator probe says so"),
)  # fmt: skip

# lines of a DeepSpeed launch that are start-up chatter (their content is in --verbose)
NOISE_LINES: tuple[tuple[str, str], ...] = (
    (r"\[INFO\] \[(runner|launch)\.py:\d+:main\]", "DeepSpeed runner start-up and exit lines"),
    (r"\[WARNING\] \[runner\.py:\d+:fetch_hostfile\] Unable to find hostfile",
     "single-node launch: no hostfile is needed"),
    (r"\[WARNING\] \[real_accelerator\.py:\d+:get_accelerator\] Setting accelerator to CPU",
     "a CPU machine: DS_ACCELERATOR=cpu is set for the ranks, the runner still says it"),
    (r"^DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully$", "DeepSpeed's shared-memory comm op loaded"),
)  # fmt: skip
_NOISE = [re.compile(p) for p, _ in NOISE_LINES]


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def install() -> None:
    """The warnings filters above (nothing when verbose)."""
    if verbose():
        return
    for category, module, message, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, message, _why in LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropMessage(message))


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message matches a pattern."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def noise_line(line: str) -> bool:
    """True for a child-output line that `NOISE_LINES` lists (never when verbose)."""
    return not verbose() and any(p.search(line.rstrip("\n")) for p in _NOISE)
