"""Sequence parallelism: Ulysses or ring attention and the teacher-forcing layouts over an SP group.

Ulysses (DeepSpeed-Ulysses): each rank holds L/P tokens of every head. Before attention an
all-to-all trades them for all L tokens of H/P heads; the inner core attends with the mask of
the *global* token order (built from metadata); a second all-to-all returns the local tokens.
Both all-to-alls are autograd functions, so backward runs the mirror exchange. Ring /
context parallel (`RingAttention`) keeps every head and exchanges K/V instead: for models whose
heads do not divide by P; a query schedule (schedule.py) evens its attention work.

Layouts decide which tokens a rank holds (DESIGN section 4-5):
  naive     the single-process [all clean | all noisy] sequence cut into P contiguous pieces;
  balanced  rank r holds frames [r*F/P, (r+1)*F/P) in both copies, clean then noisy.
Global order = concatenation of the ranks' local sequences; masks follow from metadata.
A rank reads only the clean latents of its frame span (`layout_frame_span`); when training from
videos the latents are lazy and the group encodes the clip once by the balanced encode plan
(`gather_planned_latents`: each rank one range plus a left halo, then an all-to-all of latents),
and each rank noises its span with the group's shared noise and timesteps.

Legend: B batch, H heads, L tokens (global), Ll local tokens, D head dim, P SP ranks,
C channels, F latent frames, T pixel frames.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from vidtrain.forcing.teacher import TFSequence, build_tf_sequence
from vidtrain.models.wan.attention import flex_attention, sdpa
from vidtrain.parallel.schedule import query_work, ring_query_schedule, vae_encode_plan
from vidtrain.tokens import MaskRule, TokenMeta, build_mask, flex_mask_mod, grid_meta

LAYOUTS = ("naive", "balanced")
# the autograd-aware all-to-all of torch.distributed.nn is marked deprecated but is the one that
# carries gradients on gloo (CPU) as well as nccl
warnings.filterwarnings("ignore", message=".*all_to_all_single is deprecated", category=FutureWarning)


# ---- Ulysses ----------------------------------------------------------------------------------


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


class UlyssesAttention(nn.Module):
    """Wraps a block's attention core: all-to-all in, inner core on the global sequence, all-to-all out."""

    def __init__(self, inner: nn.Module, group, sp_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.group = group
        self.sp_size = sp_size

    @property
    def layer_idx(self) -> int:
        return self.inner.layer_idx

    def forward(self, q_BHLD, k_BHLD, v_BHLD, ctx) -> torch.Tensor:
        p = self.sp_size
        q, k, v = (_heads_to_seq(t, p, self.group) for t in (q_BHLD, k_BHLD, v_BHLD))
        if ctx.meta is not None and len(ctx.meta) != q.shape[2]:
            raise ValueError(f"global metadata has {len(ctx.meta)} tokens, gathered sequence {q.shape[2]}")
        return _seq_to_heads(self.inner(q, k, v, ctx), p, self.group)


def apply_ulysses(model: nn.Module, group, sp_size: int) -> int:
    """Replace every self-attention core with a Ulysses wrapper (from outside the model)."""
    n = 0
    for module in model.modules():
        core = getattr(module, "core", None)
        if core is None or isinstance(core, UlyssesAttention) or not hasattr(module, "num_heads"):
            continue
        if module.num_heads % sp_size:
            raise ValueError(
                f"Ulysses sequence parallelism needs heads divisible by parallel.sp_size: "
                f"{module.num_heads} heads, sp_size={sp_size}"
            )
        module.core = UlyssesAttention(core, group, sp_size)
        n += 1
    if n == 0:
        raise ValueError("no self-attention core found to wrap for sequence parallelism")
    return n


# ---- ring / context parallel ------------------------------------------------------------------


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence: [B, H, Ll, D] -> [B, H, P*Ll, D]; backward reduce-scatters
    the gradient (an all-to-all of contiguous pieces plus a sum: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x_BHLD: torch.Tensor, group, p: int) -> torch.Tensor:
        ctx.group, ctx.p = group, p
        parts = [torch.empty_like(x_BHLD) for _ in range(p)]
        dist.all_gather(parts, x_BHLD.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, g_BHLD: torch.Tensor):
        b, h, seq_len, d = g_BHLD.shape
        send = g_BHLD.reshape(b, h, ctx.p, seq_len // ctx.p, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)  # [P(src), B, H, Ll, D]: every rank's gradient of my piece
        dist.all_to_all_single(recv, send, group=ctx.group)
        return recv.sum(0), None, None


class _RingPlan:
    """What ring attention needs on this rank for one token order, built from metadata and shared
    by every layer (and by later steps with the same order, `_ring_plan`): the work schedule and
    the mask of the queries this rank executes (dense for SDPA, or a FlexAttention block mask so
    that only allowed blocks are computed)."""

    def __init__(self, rule: MaskRule, meta: TokenMeta, sp_rank: int, sp_size: int, local: int) -> None:
        self.rule, self.meta, self.key = rule, meta, (rule, sp_rank, sp_size, local, len(meta))
        self._mask, self._block_mask, self._index = None, None, {}
        work = query_work(rule, meta, meta)
        sched = ring_query_schedule(list(torch.split(work, local)))
        self.trivial = sched.trivial
        if self.trivial:  # nothing to move: own queries, own mask rows
            self.rows = meta.index(slice(sp_rank * local, (sp_rank + 1) * local))
            return
        self.order = sched.send_order(sp_rank)  # my local queries, grouped by executor
        self.inverse = torch.argsort(self.order)
        self.send = sched.send_counts(sp_rank)
        received = sched.received(sp_rank)  # owner-major: the order they arrive in
        self.recv = [len(idx) for _, idx in received]
        self.rows = meta.index(torch.cat([owner * local + idx for owner, idx in received]))

    def matches(self, rule: MaskRule, meta: TokenMeta, sp_rank: int, sp_size: int, local: int) -> bool:
        if (
            self.key != (rule, sp_rank, sp_size, local, len(meta))
            or self.meta.frame.device != meta.frame.device
        ):
            return False
        return all(
            torch.equal(getattr(self.meta, f), getattr(meta, f)) for f in ("frame", "chunk", "noisy", "shot")
        )

    def index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, inverse) on `device`, moved once."""
        if device not in self._index:
            self._index[device] = (self.order.to(device), self.inverse.to(device))
        return self._index[device]

    def attend(self, q_BHND, k_BHLD, v_BHLD, use_flex: bool) -> torch.Tensor:
        """Attention of the executed queries (rows) over all keys."""
        if use_flex:
            if self._block_mask is None:
                from torch.nn.attention.flex_attention import create_block_mask

                dev = q_BHND.device
                mod = flex_mask_mod(self.rule, self.rows.to(dev), self.meta.to(dev))
                self._block_mask = create_block_mask(
                    mod,
                    None,
                    None,
                    len(self.rows),
                    len(self.meta),
                    device=str(dev),
                    _compile=dev.type == "cuda",
                )
            return flex_attention(q_BHND, k_BHLD, v_BHLD, self._block_mask)
        if self._mask is None:
            self._mask = build_mask(self.rule, self.rows, self.meta)
        return sdpa(q_BHND, k_BHLD, v_BHLD, self._mask)


class RingAttention(nn.Module):
    """Context-parallel attention for any head count, work-balanced.

    K/V are exchanged with an all-gather whose backward reduce-scatters their gradients (the
    "allgather" rotation of PyTorch's context parallelism), so every rank holds all keys. Causal
    masks make later frames' queries costlier, so queries are not attended where they live: a
    schedule from metadata (`schedule.ring_query_schedule`) keeps each rank's own queries up to
    the mean work and moves the surplus of heavy ranks to light ones with an autograd-aware
    all-to-all; results come back the same way. Every rank then computes the same number of
    query-key pairs (the balance report's `attn_pairs_ring`) with FlexAttention block masks
    (GPU, or `model.attn_backend=flex`); dense SDPA masks on CPU evaluate every pair. Not yet
    done: P2P ring passes overlapped with compute (transient K/V of the whole sequence per layer
    here), KV fake-quant hooks (QAT).
    """

    def __init__(self, inner: nn.Module, group, sp_size: int, sp_rank: int) -> None:
        super().__init__()
        self.inner = inner
        self.group, self.sp_size, self.sp_rank = group, sp_size, sp_rank

    @property
    def layer_idx(self) -> int:
        return self.inner.layer_idx

    def _plan(self, ctx, local: int) -> _RingPlan | None:
        if ctx.rule.kind == "full":
            return None  # every query costs the same: nothing to balance
        if getattr(ctx, "_ring_plan", None) is None:
            if ctx.meta is None:
                raise ValueError(f"mask rule {ctx.rule.kind!r} needs token metadata")
            ctx._ring_plan = _ring_plan(ctx.rule, ctx.meta, self.sp_rank, self.sp_size, local)
        return ctx._ring_plan

    def forward(self, q_BHLD, k_BHLD, v_BHLD, ctx) -> torch.Tensor:
        if ctx.kv_hook is not None:
            raise ValueError(
                "parallel.sp_impl=ring does not support KV hooks (QAT KV fake-quant) yet; use ulysses"
            )
        local = q_BHLD.shape[2]
        k_all = _GatherSeq.apply(k_BHLD, self.group, self.sp_size)  # [B, H, L, D]
        v_all = _GatherSeq.apply(v_BHLD, self.group, self.sp_size)
        if ctx.meta is not None and len(ctx.meta) != k_all.shape[2]:
            raise ValueError(
                f"global metadata has {len(ctx.meta)} tokens, gathered sequence {k_all.shape[2]}"
            )
        plan = self._plan(ctx, local)
        # FlexAttention computes only the blocks the mask allows (what the schedule evens out);
        # dense SDPA (CPU: flex has no backward there) evaluates every query-key pair
        backend = getattr(self.inner, "backend", "sdpa")
        use_flex = backend == "flex" or (backend == "auto" and q_BHLD.is_cuda)
        if plan is None:
            return sdpa(q_BHLD, k_all, v_all, None)
        if plan.trivial:
            return plan.attend(q_BHLD, k_all, v_all, use_flex)
        # my queries, executor-major, token-major for the all-to-all: [Ll, B, H, D]
        order, inverse = plan.index(q_BHLD.device)
        send = q_BHLD.index_select(2, order).permute(2, 0, 1, 3).contiguous()
        recv = dist_fn.all_to_all_single(
            send.new_empty((sum(plan.recv), *send.shape[1:])), send, plan.recv, plan.send, group=self.group
        )
        q_exec = recv.permute(1, 2, 0, 3).contiguous()  # [B, H, Nq, D]: the queries I attend, owner-major
        if q_exec.shape[2]:
            out = plan.attend(q_exec, k_all, v_all, use_flex)
        else:  # nothing to attend here; keep q, K and V in the graph so that backward runs both
            # exchanges and the K/V gather's reduce-scatter like every other rank (else: hang)
            out = q_exec * 0 + (k_all.sum() + v_all.sum()) * 0
        out = out.permute(2, 0, 1, 3).contiguous()
        back = dist_fn.all_to_all_single(
            out.new_empty(send.shape), out, plan.send, plan.recv, group=self.group
        )
        return back.index_select(0, inverse).permute(1, 2, 0, 3)


_RING_PLANS: list[_RingPlan] = []  # recent plans: the token order repeats step after step


def _ring_plan(rule: MaskRule, meta: TokenMeta, sp_rank: int, sp_size: int, local: int) -> _RingPlan:
    """The plan for this token order, reused while the metadata stays the same (building it
    costs ~1 s of CPU at 96 frames, 480x832)."""
    for plan in _RING_PLANS:
        if plan.matches(rule, meta, sp_rank, sp_size, local):
            return plan
    plan = _RingPlan(rule, meta, sp_rank, sp_size, local)
    _RING_PLANS.insert(0, plan)
    del _RING_PLANS[4:]
    return plan


def apply_ring(model: nn.Module, group, sp_size: int, sp_rank: int) -> int:
    """Replace every self-attention core with a context-parallel wrapper (no head constraint)."""
    n = 0
    for module in model.modules():
        core = getattr(module, "core", None)
        if (
            core is None
            or isinstance(core, RingAttention | UlyssesAttention)
            or not hasattr(module, "num_heads")
        ):
            continue
        module.core = RingAttention(core, group, sp_size, sp_rank)
        n += 1
    if n == 0:
        raise ValueError("no self-attention core found to wrap for sequence parallelism")
    return n


# ---- teacher-forcing layouts ------------------------------------------------------------------


def check_layout(layout: str, frames: int, frames_per_chunk: int, sp_size: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if frames % (sp_size * frames_per_chunk):
        raise ValueError(
            f"{frames} latent frames do not split over sp_size={sp_size} ranks in whole chunks of "
            f"{frames_per_chunk} frames: frames must be a multiple of {sp_size * frames_per_chunk}"
        )


def rank_frames(frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """Frame range [f0, f1) that a rank holds in the balanced layout (and encodes with the VAE)."""
    per = frames // sp_size
    return sp_rank * per, (sp_rank + 1) * per


def layout_metas(
    layout: str, frames: int, hp: int, wp: int, frames_per_chunk: int, sp_size: int
) -> list[TokenMeta]:
    """Per-rank token metadata of a layout; their concatenation is the global order."""
    check_layout(layout, frames, frames_per_chunk, sp_size)
    if layout == "balanced":
        out = []
        for r in range(sp_size):
            f0, f1 = rank_frames(frames, r, sp_size)
            kw = dict(frame_offset=f0)
            out.append(
                TokenMeta.cat([
                    grid_meta(f1 - f0, hp, wp, frames_per_chunk, noisy=False, **kw),
                    grid_meta(f1 - f0, hp, wp, frames_per_chunk, noisy=True, **kw),
                ])
            )  # fmt: skip
        return out
    full = TokenMeta.cat([
        grid_meta(frames, hp, wp, frames_per_chunk, noisy=False),
        grid_meta(frames, hp, wp, frames_per_chunk, noisy=True),
    ])  # fmt: skip
    piece = len(full) // sp_size
    return [full.index(slice(r * piece, (r + 1) * piece)) for r in range(sp_size)]


def layout_frame_span(layout: str, frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """Latent frames [f0, f1) whose tokens (clean or noisy) a rank holds: the only clean latents
    it needs, and so the only frames it encodes when training from videos."""
    if layout == "balanced":
        return rank_frames(frames, sp_rank, sp_size)
    return naive_frame_span(frames, sp_rank, sp_size)


def take_frames(x0_BCFHW, f0: int, f1: int) -> torch.Tensor:
    """Latent frames [f0, f1) of a latent tensor, or of a lazy source (`.frames(f0, f1)`, e.g.
    vidtrain.data.videos.VideoLatents, which VAE-encodes just those frames)."""
    if isinstance(x0_BCFHW, torch.Tensor):
        return x0_BCFHW[:, :, f0:f1]
    return x0_BCFHW.frames(f0, f1)


def local_tf_sequence(
    layout: str,
    x0_BCFHW,
    noise_BCFHW: torch.Tensor,
    sigma_BF: torch.Tensor,
    frames_per_chunk: int,
    sp_rank: int,
    sp_size: int,
    group=None,
) -> tuple[TFSequence, TokenMeta]:
    """This rank's part of the teacher-forcing sequence and the global metadata.

    `x0_BCFHW` is a latent tensor or a lazy source (`take_frames`): only the rank's frame span
    is read. A lazy source with the SP `group` given is encoded by the group's balanced plan
    (`gather_planned_latents`); without a group each rank encodes its own span.
    Naive: the span's [clean | noisy] sequence, cut to the rank's piece of the global
    [all clean | all noisy] (pieces are whole frame copies since F divides by P * fpc).
    """
    _, _, f, h, w = x0_BCFHW.shape
    metas = layout_metas(layout, f, h // 2, w // 2, frames_per_chunk, sp_size)
    f0, f1 = layout_frame_span(layout, f, sp_rank, sp_size)
    if group is not None and sp_size > 1 and not isinstance(x0_BCFHW, torch.Tensor):
        x0_local = gather_planned_latents(x0_BCFHW, layout, sp_rank, sp_size, group)
    else:
        x0_local = take_frames(x0_BCFHW, f0, f1)
    seq = build_tf_sequence(
        x0_local,
        noise_BCFHW[:, :, f0:f1],
        sigma_BF[:, f0:f1],
        frames_per_chunk,
        frame_offset=f0,
    )
    if layout == "naive":
        a, b = sp_rank * 2 * f // sp_size, (sp_rank + 1) * 2 * f // sp_size  # frame copies [a, b)
        copy = seq.meta.frame + seq.meta.noisy.long() * f  # clean frame i -> i, noisy -> f + i
        seq = seq.index(torch.nonzero((copy >= a) & (copy < b)).squeeze(1))
    return seq, TokenMeta.cat(metas)


def encode_local_frames(
    vae,
    video_BCTHW: torch.Tensor,
    layout: str,
    sp_rank: int,
    sp_size: int,
    frames_per_chunk: int,
    halo: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Latents this rank needs, encoded from its own pixel frames plus a left halo.

    Returns (latents [B, C, f1-f0, h, w], f0) for the rank's `layout_frame_span`. Balanced: only
    the rank's frame range. Naive: a rank's piece of [clean | noisy] may cover any frames, so it
    encodes the frames its piece touches. `halo` defaults to the VAE's temporal receptive field
    (exact encode).
    """
    frames = vae.num_latent_frames(video_BCTHW.shape[2])
    check_layout(layout, frames, frames_per_chunk, sp_size)
    f0, f1 = layout_frame_span(layout, frames, sp_rank, sp_size)
    halo = vae.temporal_receptive_field() if halo is None else halo
    return vae.encode_range(video_BCTHW, f0, f1, halo), f0


def gather_planned_latents(source, layout: str, sp_rank: int, sp_size: int, group) -> torch.Tensor:
    """The latents of this rank's `layout_frame_span`, VAE-encoded by the SP group's balanced plan.

    `source` is lazy (`.frames(f0, f1)`, `.halo`, `.shape`, `.temporal_compression`, `.device`;
    vidtrain.data.videos.VideoLatents).
    Every rank encodes its range of `schedule.vae_encode_plan` (equal pixel frames read, halo
    included; rank 0 has no halo, so it encodes more frames of its own), then one all-to-all
    hands each latent frame to the ranks that hold it. The latents equal the one-pass encode
    whenever the halo is the VAE's receptive field, as each rank's own span encode would be.
    """
    b, c, f, h, w = source.shape
    plan = vae_encode_plan(f, sp_size, source.halo, source.temporal_compression)
    need = [layout_frame_span(layout, f, r, sp_size) for r in range(sp_size)]
    e0, e1 = plan[sp_rank]

    def overlap(a: tuple[int, int], z: tuple[int, int]) -> tuple[int, int]:
        return max(a[0], z[0]), max(max(a[0], z[0]), min(a[1], z[1]))

    mine = source.frames(e0, e1) if e1 > e0 else None  # [B, C, e1-e0, h, w]
    parts, send_counts = [], []
    for span in need:  # destination-major
        s0, s1 = overlap((e0, e1), span)
        send_counts.append(s1 - s0)
        if s1 > s0:
            parts.append(mine[:, :, s0 - e0 : s1 - e0])
    if parts:
        send = torch.cat(parts, dim=2).permute(2, 0, 1, 3, 4).contiguous()  # [frames, B, C, h, w]
    else:  # this rank encodes nothing (more ranks than the plan needs)
        send = torch.empty((0, b, c, h, w), device=source.device)
    recv_counts = []
    for seg in plan:  # source-major
        s0, s1 = overlap(seg, need[sp_rank])
        recv_counts.append(s1 - s0)
    recv = send.new_empty((sum(recv_counts), b, c, h, w))
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    return recv.permute(1, 2, 0, 3, 4).contiguous()  # plan ranges ascend: frames arrive in order


def naive_frame_span(frames: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """Latent frames [f0, f1) whose tokens (clean or noisy) land on a rank in the naive layout."""
    total = 2 * frames
    a, b = sp_rank * total // sp_size, (sp_rank + 1) * total // sp_size  # in "frame copies"
    spans = [(max(a, 0), min(b, frames)), (max(a, frames) - frames, min(b, total) - frames)]
    spans = [(s, e) for s, e in spans if e > s]
    return min(s for s, _ in spans), max(e for _, e in spans)


def sp_all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out, group=group)
    return out
