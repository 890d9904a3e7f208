"""Progress of a long loop on rank 0: a tqdm bar on a terminal, plain lines into a file or pipe.

Training steps (`vidtrain train`, the launchers, `make demo`) and the sampler's chunks
(`vidtrain sample`) use the same class, so every stage a user waits on says where it is.
"""

from __future__ import annotations

import sys
import time

# the losses shown beside the step count, in this order (DMD: both roles)
PROGRESS_KEYS = ("loss", "generator_loss", "critic_loss")


class StepProgress:
    """A tqdm bar on a terminal; one plain line every ~10% of the `unit`s (and the last) when the
    output is a file or a pipe (a launcher, `make demo`, Slurm), so a long stage is never silent.

    With `keys` (the default: the training losses) the latest of each is shown beside the count;
    `unit` names what is counted (step, chunk)."""

    def __init__(
        self, total: int, initial: int, desc: str, enabled: bool = True, stream=None,
        unit: str = "step", keys: tuple[str, ...] = PROGRESS_KEYS,
    ) -> None:  # fmt: skip
        self.total, self.step, self.desc, self.unit, self.keys = total, initial, desc, unit, keys
        self.stream = stream or sys.stdout
        self.enabled = enabled and initial < total
        self.every = max(1, (total - initial) // 10)
        self.start = time.perf_counter()
        self.first = initial
        self._bar = None
        self.shown: dict[str, float] = {}  # the latest of each figure (DMD's generator: every k-th step)
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream
            )

    def update(self, logs: dict[str, float] | None = None) -> None:
        self.step += 1
        if not self.enabled:
            return
        self.shown.update({k: float(logs[k]) for k in self.keys if logs and k in logs})
        shown = dict(self.shown)
        if "critic_loss" in shown:  # DMD's `loss` is its critic loss
            shown.pop("loss", None)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
            return
        if (self.step - self.first) % self.every and self.step != self.total:
            return
        per = (time.perf_counter() - self.start) / (self.step - self.first)
        figures = "".join(f" {k.replace('_loss', '')} {v:.4f}" for k, v in shown.items())
        eta = per * (self.total - self.step)
        print(
            f"[vidtrain] {self.desc} {self.unit} {self.step}/{self.total}{figures} "
            f"({per:.2f} s/{self.unit}, eta {eta:.0f} s)",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
