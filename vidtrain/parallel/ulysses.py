"""Ulysses sequence parallelism (DeepSpeed-Ulysses) over an SP group.

Each rank holds L/P tokens of every head. Before attention an all-to-all trades them for all L
tokens of H/P heads; the inner core attends with the mask of the *global* token order (built
from metadata); a second all-to-all returns the local tokens. Both all-to-alls are autograd
functions, so backward runs the mirror exchange. Heads must divide by P (else: ring.py).

Legend: B batch, H heads, L tokens (global), Ll local tokens, D head dim, P SP ranks.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn

from vidtrain.parallel.cores import WrappedCore, wrap_attention_cores

# the autograd-aware all-to-all of torch.distributed.nn is marked deprecated but is the one that
# carries gradients on gloo (CPU) as well as nccl
warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated", category=FutureWarning)


def _heads_to_seq(x_BHLD: torch.Tensor, p: int, group) -> torch.Tensor:
    """[B, H, Ll, D] (all heads, local tokens) -> [B, H/P, P*Ll, D] (head group, all tokens)."""
    b, h, ll, d = x_BHLD.shape
    send = x_BHLD.reshape(b, p, h // p, ll, d).transpose(0, 1).contiguous()  # [P, B, H/P, Ll, D]
    recv = dist_fn.all_to_all_single(torch.empty_like(send), send, group=group)  # [P(src), B, H/P, Ll, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * ll, d)


def _seq_to_heads(x_BHLD: torch.Tensor, p: int, group) -> torch.Tensor:
    """Inverse of `_heads_to_seq`: [B, H/P, P*Ll, D] -> [B, H, Ll, D]."""
    b, hp, seq_len, d = x_BHLD.shape
    send = x_BHLD.reshape(b, hp, p, seq_len // p, d).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, H/P, Ll, D]
    recv = dist_fn.all_to_all_single(torch.empty_like(send), send, group=group)  # [P(head grp), ...]
    return recv.transpose(0, 1).reshape(b, hp * p, seq_len // p, d)


class UlyssesAttention(WrappedCore):
    """Wraps a block's attention core: all-to-all in, inner core on the global sequence, all-to-all out."""

    def __init__(self, inner: nn.Module, group, sp_size: int) -> None:
        super().__init__(inner)
        self.group = group
        self.sp_size = sp_size

    def forward(self, q_BHLD, k_BHLD, v_BHLD, ctx) -> torch.Tensor:
        p = self.sp_size
        q, k, v = (_heads_to_seq(t, p, self.group) for t in (q_BHLD, k_BHLD, v_BHLD))
        if ctx.meta is not None and len(ctx.meta) != q.shape[2]:
            raise ValueError(f"global metadata has {len(ctx.meta)} tokens, gathered sequence {q.shape[2]}")
        return _seq_to_heads(self.inner(q, k, v, ctx), p, self.group)


def check_heads(num_heads: int, sp_size: int, flag: str = "parallel.sp_size") -> None:
    """Ulysses splits the heads over the SP ranks: a count that does not divide is one clear line
    naming both numbers (`flag`: the setting that chose the rank count)."""
    if num_heads % sp_size:
        name = "sp_size" if flag == "parallel.sp_size" else flag
        raise ValueError(
            f"Ulysses sequence parallelism needs heads divisible by {flag}: "
            f"{num_heads} heads, {name}={sp_size}"
        )


def apply_ulysses(model: nn.Module, group, sp_size: int, flag: str = "parallel.sp_size") -> int:
    """Replace every declared self-attention core with a Ulysses wrapper (from outside the model).
    Training and the multi-rank sampler (vidtrain/sample/parallel_sample.py, `flag` "--nproc")
    wrap the same way: the core inside, and so any `AttentionContext.kv_hook`, sees this rank's
    H/P heads over all tokens."""

    def wrap(module: nn.Module, core: nn.Module) -> UlyssesAttention:
        check_heads(module.num_heads, sp_size, flag)
        return UlyssesAttention(core, group, sp_size)

    return wrap_attention_cores(model, wrap)
