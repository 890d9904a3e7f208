"""Error recycling (Stable-Video-Infinity, LongLive 2.0): a bank of the model's own errors.

Teacher forcing conditions every noisy chunk on a perfect clean history; at inference the
history is the model's own output, with its errors. Error recycling closes that gap: every
training step writes the per-frame prediction errors of its noisy frames into a bank bucketed
by timestep, and later steps add a sampled error to the clean-history copy of the sequence (and
optionally to the noisy input; `build_tf_sequence(history_BCFHW=, noisy_delta_BCFHW=)`), while
the velocity targets stay those of the true latents.

The bank is pure torch (no process group): the teacher-forcing method gathers every rank's
errors through its strategy and writes the same list, in the same order, on every rank, so the
banks of all ranks are equal and a one-process run writes the same bank
(vidtrain/train/methods.py). Memory is bounded: one entry is one latent frame's error [C, H, W]
in the storage dtype, `bank_size` entries per bucket replaced as a ring, each bucket allocated at
its first write (on the CPU): at most buckets x bank_size x C x H x W elements.

Legend: B batch, C channels, F latent frames, H/W latent size, N entries, L tokens, P patch vector.
"""

from __future__ import annotations

import torch

from vidtrain.forcing.flow import NUM_TRAIN_TIMESTEPS
from vidtrain.forcing.teacher import TFSequence
from vidtrain.tokens import unpatchify

BANK_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ErrorBank:
    """`buckets` timestep buckets over [0, NUM_TRAIN_TIMESTEPS), `bank_size` entries each."""

    def __init__(self, buckets: int, bank_size: int, dtype: torch.dtype = torch.bfloat16) -> None:
        if buckets < 1 or bank_size < 1:
            raise ValueError(
                f"an error bank needs buckets >= 1 and bank_size >= 1, got {buckets}, {bank_size}"
            )
        self.buckets, self.bank_size, self.dtype = int(buckets), int(bank_size), dtype
        self.entry_shape: tuple[int, ...] | None = None  # [C, H, W], fixed by the first write
        self.slots: list[torch.Tensor | None] = [None] * self.buckets  # [bank_size, C, H, W] each
        self.writes = torch.zeros(self.buckets, dtype=torch.long)  # writes per bucket, ever

    # ---- figures --------------------------------------------------------------------------------
    def bucket_of(self, t: torch.Tensor) -> torch.Tensor:
        """Bucket index of timesteps t in [0, NUM_TRAIN_TIMESTEPS] (t = 1000 joins the last)."""
        b = torch.floor(torch.as_tensor(t, dtype=torch.float64) * self.buckets / NUM_TRAIN_TIMESTEPS)
        return b.long().clamp(0, self.buckets - 1)

    @property
    def filled(self) -> torch.Tensor:
        """Entries held per bucket [buckets]."""
        return self.writes.clamp(max=self.bank_size)

    @property
    def fill(self) -> float:
        """Share of all slots that hold an entry."""
        return float(self.filled.sum()) / (self.buckets * self.bank_size)

    @property
    def empty(self) -> bool:
        return not bool(self.writes.any())

    @property
    def nbytes(self) -> int:
        """Bytes the allocated buckets hold now."""
        return sum(s.numel() * s.element_size() for s in self.slots if s is not None)

    def max_nbytes(self, entry_shape: tuple[int, ...] | None = None) -> int:
        """The bound: every bucket allocated (entries of `entry_shape`, default the bank's)."""
        shape = entry_shape or self.entry_shape
        if shape is None:
            return 0
        per = torch.Size(shape).numel() * torch.empty((), dtype=self.dtype).element_size()
        return self.buckets * self.bank_size * per

    # ---- writing --------------------------------------------------------------------------------
    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if self.entry_shape is None:
            self.entry_shape = tuple(shape)
        elif tuple(shape) != self.entry_shape:
            raise ValueError(
                f"error recycling banks one latent size: entries are {list(self.entry_shape)} [C, H, W], "
                f"got {list(shape)} (train on one resolution, or turn method.error_recycling off)"
            )

    def add(self, err_NCHW: torch.Tensor, t_N: torch.Tensor) -> None:
        """Write entries in order, each into its timestep's bucket, over the oldest when full."""
        if len(err_NCHW) == 0:
            return
        if err_NCHW.ndim != 4 or len(t_N) != len(err_NCHW):
            raise ValueError(
                f"entries must be [N, C, H, W] with N timesteps, got {list(err_NCHW.shape)}, {len(t_N)}"
            )
        self._check_shape(tuple(err_NCHW.shape[1:]))
        for e, b in zip(err_NCHW, self.bucket_of(t_N).tolist(), strict=True):
            if self.slots[b] is None:
                self.slots[b] = torch.zeros(self.bank_size, *self.entry_shape, dtype=self.dtype)
            self.slots[b][int(self.writes[b]) % self.bank_size] = e.to(self.dtype)
            self.writes[b] += 1

    # ---- drawing (every draw from the caller's generator: equal on every rank) -----------------
    def _entries(self, bucket: int, u: torch.Tensor) -> torch.Tensor:
        n = int(self.filled[bucket])
        idx = (u * n).long().clamp(max=n - 1)
        return self.slots[bucket][idx].float()

    def sample_history(self, frames: int, generator: torch.Generator) -> torch.Tensor | None:
        """Errors for a sample's clean history [F, C, H, W]: one bucket drawn uniformly among the
        filled ones (one level of error for the sample), an entry drawn per frame; None if empty."""
        u = torch.rand(1 + frames, generator=generator, dtype=torch.float64)
        full = torch.nonzero(self.filled > 0).squeeze(1)
        if len(full) == 0:
            return None
        bucket = int(full[min(int(u[0] * len(full)), len(full) - 1)])
        return self._entries(bucket, u[1:])

    def sample_at(
        self, t_F: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Errors for frames at timesteps t_F ([F, C, H, W], each from its own timestep's bucket)
        and which frames found one [F] (an empty bucket gives zeros); None if the bank is empty."""
        u = torch.rand(len(t_F), generator=generator, dtype=torch.float64)
        if self.empty:
            return None
        out = torch.zeros(len(t_F), *self.entry_shape)
        found = torch.zeros(len(t_F), dtype=torch.bool)
        for i, b in enumerate(self.bucket_of(t_F).tolist()):
            if int(self.filled[b]) > 0:
                out[i], found[i] = self._entries(b, u[i : i + 1])[0], True
        return out, found

    # ---- state (part of the method's checkpoint state) ------------------------------------------
    def state_dict(self) -> dict:
        """Sizes, write counts and the entries held (the filled part of each bucket only)."""
        filled = self.filled.tolist()
        return {
            "buckets": self.buckets,
            "bank_size": self.bank_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "entry_shape": None if self.entry_shape is None else list(self.entry_shape),
            "writes": self.writes.clone(),
            "entries": [
                None if s is None else s[:n].clone() for s, n in zip(self.slots, filled, strict=True)
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["buckets"], state["bank_size"]) != (self.buckets, self.bank_size):
            raise ValueError(
                f"the checkpoint's error bank has buckets={state['buckets']} x bank_size={state['bank_size']}, "
                f"the recipe asks for {self.buckets} x {self.bank_size}: a bank cannot be resized on resume "
                "(keep method.error_recycling.buckets and bank_size, or start a new run)"
            )
        self.entry_shape = None if state["entry_shape"] is None else tuple(state["entry_shape"])
        self.writes = state["writes"].clone().long()
        self.slots = [None] * self.buckets
        for b, held in enumerate(state["entries"]):
            if held is not None:
                self.slots[b] = torch.zeros(self.bank_size, *self.entry_shape, dtype=self.dtype)
                self.slots[b][: len(held)] = held.to(self.dtype)


def noisy_frame_errors(
    pred_BLP: torch.Tensor, seq: TFSequence, sigma_BF: torch.Tensor, kind: str, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The error of every noisy frame a (rank's part of a) sequence holds: (global frame indices
    [n] ascending, errors [B, n, C, H, W] in fp32 on the CPU).

    `kind` velocity: v_pred - v_target; x0: x0_pred - x0 = -sigma * (v_pred - v_target), since
    x0_pred = x_t - sigma * v_pred. A layout holds whole frame copies, so a frame's noisy tokens
    are all on one rank, in grid order.
    """
    if kind not in ("x0", "velocity"):
        raise ValueError(f"error kind must be 'x0' or 'velocity', got {kind!r}")
    noisy = seq.meta.noisy.cpu()
    idx = torch.nonzero(noisy).squeeze(1)
    frames = seq.meta.frame.cpu()[idx]
    order = torch.argsort(frames, stable=True)
    idx, frames = idx[order], frames[order]
    uniq = torch.unique_consecutive(frames)
    per = (h // 2) * (w // 2)
    if len(idx) != len(uniq) * per:
        raise ValueError(f"{len(idx)} noisy tokens are not whole frames of {per} tokens")
    v = pred_BLP.detach()[:, idx.to(pred_BLP.device)].float().cpu() - seq.target_BLP[:, idx].float().cpu()
    err = unpatchify(v, len(uniq), h, w).transpose(1, 2)  # [B, n, C, H, W]
    if kind == "x0":
        err = err * -sigma_BF[:, uniq].float().cpu()[:, :, None, None, None]
    return uniq, err.contiguous()
