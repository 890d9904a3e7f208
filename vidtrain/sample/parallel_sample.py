"""Multi-rank sampling: Ulysses sequence parallelism over attention heads, the KV cache by heads.

`vidtrain sample --nproc N` starts N ranks through the launcher (`vidtrain-launch sample`); they
form one SP group (`vidtrain.parallel.mesh.build_mesh(sp_size=N)`). Every rank runs the same chunk
loop on the same noise (same seeds, same generators) and holds the whole chunk's latents; per
model pass:

  1. rank r takes its contiguous L/N share of the chunk's L tokens (patch embedding, AdaLN, FFN,
     cross-attention and the head run on those tokens only);
  2. in each self-attention the Ulysses all-to-all (training's own `apply_ulysses`, wrapping the
     cores the model declares) trades them for all L tokens of H/N heads; the inner core's
     `kv_hook` (the rank's `KVCache`) prepends the history of those heads and, on the clean pass,
     stores them: each rank's cache holds [B, H/N, L, D] per chunk block, 1/N of the bytes. NVFP4
     scales are per (batch, head, block) and per 16 values along D, so a head's stored bytes do not
     depend on which other heads sit beside it (tests/test_sample_parallel.py);
  3. the second all-to-all returns the local tokens; the model's output tokens are all-gathered
     into the chunk's velocity, identical on every rank, so the next step's input is too.

Rank 0 alone writes the mp4, metrics and timeline; it decodes with the async decoder
(`--decode-device`: its own GPU, another one, or the CPU) while the group goes on generating.
The other ranks generate only. Heads, and the chunk's tokens, must divide by N: a clear error
naming both numbers, raised before any rank starts.

Legend: B batch, H heads, L tokens of a chunk, Ll = L/N, P patch values, D head dim, N ranks.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed.nn.functional as dist_fn

from vidtrain.models.wan.attention import AttentionContext
from vidtrain.parallel.mesh import Mesh
from vidtrain.parallel.ulysses import apply_ulysses, check_heads
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler
from vidtrain.tokens import TokenMeta

FLAG = "--nproc"

# the autograd-aware all_gather of torch.distributed.nn is marked deprecated but carries gradients
# on gloo (CPU) as well as nccl (as ulysses.py's all_to_all_single)
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)


def check_ranks(num_heads: int, chunk_tokens: int, nproc: int) -> None:
    """Heads and a chunk's tokens must split evenly over `nproc` ranks (one line each)."""
    if nproc < 1:
        raise ValueError(f"{FLAG} must be >= 1, got {nproc}")
    check_heads(num_heads, nproc, FLAG)
    if chunk_tokens % nproc:
        raise ValueError(
            f"multi-rank sampling splits a chunk's tokens over the ranks: {chunk_tokens} tokens per chunk "
            f"are not divisible by {FLAG}={nproc} (change --height/--width or --frames-per-chunk)"
        )


class UlyssesSampler(StreamingSampler):
    """A StreamingSampler over an SP group: this rank runs its share of each chunk's tokens, with
    Ulysses attention over H/N heads and the KV cache of those heads (see the module docstring).
    `prefix_latents`: a continuation every `stream` call starts from (as cli.PrefixSampler)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: SamplerConfig | None,
        mesh: Mesh,
        prefix_latents: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, config)
        self.mesh = mesh
        self.group, self.nproc, self.rank = mesh.sp_group, mesh.sp_size, mesh.sp_rank
        self.prefix_latents = prefix_latents
        check_heads(model.cfg.num_heads, self.nproc, FLAG)
        if self.nproc > 1:
            apply_ulysses(model, self.group, self.nproc, FLAG)

    def stream(self, *args, **kw):
        if self.prefix_latents is not None:
            kw.setdefault("prefix_latents", self.prefix_latents)
        return super().stream(*args, **kw)

    def _run_model(self, x_BLP, t_BL, meta: TokenMeta, attn: AttentionContext, **kw) -> torch.Tensor:
        n = self.nproc
        if n == 1:
            return super()._run_model(x_BLP, t_BL, meta, attn, **kw)
        seq_len = x_BLP.shape[1]
        check_ranks(self.model.cfg.num_heads, seq_len, n)
        ll = seq_len // n
        mine = slice(self.rank * ll, (self.rank + 1) * ll)
        idx = torch.arange(mine.start, mine.stop, device=meta.frame.device)
        # local tokens for RoPE (`meta`), the chunk's global order for the attention (`attn.meta`)
        out_BlP = self.model(
            x_BLP[:, mine].contiguous(),
            t_BL[:, mine].contiguous(),
            None,
            meta=meta.index(idx),
            attn=attn,
            **kw,
        )
        # autograd-aware gather (DMD rollouts keep the exit step's graph)
        return torch.cat(dist_fn.all_gather(out_BlP.contiguous(), group=self.group), dim=1)


def generate_only(sampler: StreamingSampler, conds, chunks_per_shot, latent_hw, seeds) -> dict:
    """A rank other than 0: the same chunk loop (its collectives match rank 0's), no decode, no
    outputs; returns its per-chunk timeline and KV bytes (for a caller that wants them)."""
    rows = []
    t0 = time.perf_counter()
    for ch in sampler.stream(conds, chunks_per_shot, latent_hw, seeds):
        rows.append({"chunk": ch.index, "gen_start": ch.gen_start - t0, "gen_end": ch.gen_end - t0,
                     "kv_bytes": ch.kv_bytes})  # fmt: skip
    return {"timeline": rows, "kv_cache_bytes": max(r["kv_bytes"] for r in rows)}
