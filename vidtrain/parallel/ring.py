"""Ring / context-parallel attention over an SP group, for any head count, work-balanced.

Every rank keeps all heads and exchanges K/V instead of heads (ulysses.py): for models whose
heads do not divide by P. Causal masks make later frames' queries costlier, so a query schedule
from metadata (`schedule.ring_query_schedule`) moves queries from heavy ranks to light ones.
A plan (the schedule and the mask of the queries a rank executes) is built once per token order:
it lives in the forward's `AttentionContext.plans` (shared by every layer) and in the
`RingPlanCache` of the model's wrappers (shared by later steps with the same order).

Legend: B batch, H heads, L tokens (global), Ll local tokens, Nq queries a rank executes,
D head dim, P SP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from vidtrain.models.wan.attention import flex_attention, sdpa
from vidtrain.parallel.cores import WrappedCore, wrap_attention_cores
from vidtrain.parallel.schedule import query_work, ring_query_schedule
from vidtrain.tokens import MaskRule, TokenMeta, build_mask, flex_mask_mod

PLAN_SLOT = "ring"  # the key of ring attention's plan in AttentionContext.plans


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


class RingPlan:
    """What ring attention needs on this rank for one token order, built from metadata and shared
    by every layer: the work schedule and the mask of the queries this rank executes (dense for
    SDPA, or a FlexAttention block mask so that only allowed blocks are computed)."""

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


class RingPlanCache:
    """The recent plans of one model's ring wrappers (`apply_ring` gives all its layers one):
    the token order repeats step after step, and building a plan costs ~1 s of CPU at 96
    frames, 480x832."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._plans: list[RingPlan] = []

    def get(self, rule: MaskRule, meta: TokenMeta, sp_rank: int, sp_size: int, local: int) -> RingPlan:
        """The plan for this token order, reused while the metadata stays the same."""
        for plan in self._plans:
            if plan.matches(rule, meta, sp_rank, sp_size, local):
                return plan
        plan = RingPlan(rule, meta, sp_rank, sp_size, local)
        self._plans.insert(0, plan)
        del self._plans[self.size :]
        return plan


class RingAttention(WrappedCore):
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

    def __init__(
        self, inner: nn.Module, group, sp_size: int, sp_rank: int, plans: RingPlanCache | None = None
    ) -> None:
        super().__init__(inner)
        self.group, self.sp_size, self.sp_rank = group, sp_size, sp_rank
        self.plans = RingPlanCache() if plans is None else plans

    def _plan(self, ctx, local: int) -> RingPlan | None:
        if ctx.rule.kind == "full":
            return None  # every query costs the same: nothing to balance
        plan = ctx.plans.get(PLAN_SLOT)
        if plan is None:
            if ctx.meta is None:
                raise ValueError(f"mask rule {ctx.rule.kind!r} needs token metadata")
            plan = ctx.plans[PLAN_SLOT] = self.plans.get(
                ctx.rule, ctx.meta, self.sp_rank, self.sp_size, local
            )
        return plan

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
        backend = self.inner.backend
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


def apply_ring(model: nn.Module, group, sp_size: int, sp_rank: int) -> int:
    """Replace every declared self-attention core with a context-parallel wrapper (no head
    constraint); the wrappers of the model share one plan cache."""
    plans = RingPlanCache()
    return wrap_attention_cores(
        model, lambda _module, core: RingAttention(core, group, sp_size, sp_rank, plans)
    )
