"""Work schedules that even out a sequence-parallel group without changing the layout.

The balanced teacher-forcing layout fixes which frames a rank *holds* (contiguous frame ranges,
DESIGN section 5): tokens and loss tokens are then even. Two kinds of work are not, if each rank
did exactly its own share, and are scheduled here instead:

* VAE encode with a left halo (training from videos). Rank 0 needs no left context, every other
  rank reads `halo` latent frames of it. `vae_encode_plan` cuts [0, F) into contiguous encode
  ranges with equal pixel frames read, halo included (rank 0 takes more frames of its own); the
  encoded latents then move to the ranks that hold them (`vae_plan.gather_planned_latents`).
  Same total work as "each rank encodes its own span", the same exact latents, no rank waits.
* Attention under context parallelism (`parallel.sp_impl=ring`). Causal masks give a rank's
  queries more keys the later its frames are (balanced layout: rank P-1 does ~2x the mean).
  Every rank holds all keys/values after the all-gather, so any rank can attend any query:
  `ring_query_schedule` keeps on each rank a prefix of its own queries worth at most the mean
  work and hands the surplus of heavy ranks, in global order, to the ranks short of the mean. A
  query's attention is computed whole on one rank (no partial softmax to merge).

Both schedules are pure functions of the sizes and the token metadata, so every rank computes
the same one, and the balance report counts exactly what training runs.

Legend: P SP ranks, F latent frames, L tokens, Lq queries, Lk keys.
"""

from __future__ import annotations

import torch

from vidtrain.tokens import MaskRule, TokenMeta, build_mask

TEMPORAL_COMPRESSION = 4  # Wan2.1's VAE: latent 0 <- pixel frame 0, latent j >= 1 <- frames 4j-3..4j


def pixel_frames(start: int, end: int, halo: int, tc: int = TEMPORAL_COMPRESSION) -> int:
    """Pixel frames a causal VAE reads to encode latent frames [start, end) with a left halo."""
    if end <= start:
        return 0
    first = max(0, start - halo)
    p0 = 0 if first == 0 else tc * first - (tc - 1)
    return tc * (end - 1) + 1 - p0


def vae_encode_plan(frames: int, sp: int, halo: int, tc: int = TEMPORAL_COMPRESSION) -> list[tuple[int, int]]:
    """Contiguous latent ranges [start, end), one per rank, covering [0, frames) and minimising
    the largest number of pixel frames any rank reads (halo included).

    The cost of a range grows as its end moves right and shrinks as its start does, so the
    greedy cut under a bound is optimal and a binary search over the bound finds the least one.
    Greedy fills the first ranks: on a clip hardly longer than the halo, where every range reads
    from the clip's start, the first ranks get everything and the rest idle (same slowest rank as
    any split, no redundant prefixes encoded); trailing ranges may be empty.
    """
    if frames < 1 or sp < 1 or halo < 0:
        raise ValueError(f"need frames >= 1, sp >= 1, halo >= 0; got {frames}, {sp}, {halo}")

    def cut(bound: int) -> list[tuple[int, int]] | None:
        out, s = [], 0
        for _ in range(sp):
            e = s
            while e < frames and pixel_frames(s, e + 1, halo, tc) <= bound:
                e += 1
            out.append((s, e))
            s = e
        return out if s == frames else None

    lo, hi = 1, pixel_frames(0, frames, halo, tc)
    while lo < hi:
        mid = (lo + hi) // 2
        if cut(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return cut(lo)


def query_work(rule: MaskRule, meta_q: TokenMeta, meta_k: TokenMeta) -> torch.Tensor:
    """Keys the mask allows for each query, int64 [Lq], without an [Lq, Lk] mask.

    The rule reads frame, chunk, copy and shot only, so tokens are grouped by those four and the
    mask is evaluated group by group (a few hundred groups for a production clip)."""
    if rule.kind == "full":
        return torch.full((len(meta_q),), len(meta_k), dtype=torch.long)

    def groups(m: TokenMeta) -> tuple[TokenMeta, torch.Tensor, torch.Tensor]:
        key = m.frame.cpu().long()  # one int64 per (frame, chunk, copy, shot): 1-D unique is fast
        for field, values in ((2, m.noisy.long()), (None, m.chunk), (None, m.shot)):
            values = values.cpu().long()
            size = field or int(values.max()) + 1
            key = key * size + values
        uniq, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
        first = torch.full((len(uniq),), len(m), dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(len(m)), reduce="amin")
        return m.to("cpu").index(first), inverse, counts

    rep_q, inv_q, _ = groups(meta_q)
    rep_k, _, counts_k = groups(meta_k)
    per_group = build_mask(rule, rep_q, rep_k).long() @ counts_k
    return per_group[inv_q]


class QuerySchedule:
    """Which rank computes the attention of which query (`ring_query_schedule`).

    executor[r]: int64 [Ll_r], the executing rank of each of rank r's local queries.
    For owner r, `send_order(r)` lists its local queries grouped by executor (executor-major,
    local order inside) and `send_counts(r)[e]` how many go to e; an executor receives them
    owner-major, in that order (`received(e)`: (owner, local index) pairs).
    """

    def __init__(self, executor: list[torch.Tensor], work: list[torch.Tensor]) -> None:
        self.executor, self.work = executor, work
        self.p = len(executor)

    @property
    def trivial(self) -> bool:
        """Every query stays on its own rank."""
        return all(bool((ex == r).all()) for r, ex in enumerate(self.executor))

    def send_order(self, r: int) -> torch.Tensor:
        return torch.sort(self.executor[r], stable=True).indices

    def send_counts(self, r: int) -> list[int]:
        return torch.bincount(self.executor[r], minlength=self.p).tolist()

    def received(self, e: int) -> list[tuple[int, torch.Tensor]]:
        return [(r, torch.nonzero(ex == e).squeeze(1)) for r, ex in enumerate(self.executor)]

    def load(self) -> list[float]:
        """Query-key pairs each rank computes."""
        out = [0.0] * self.p
        for ex, w in zip(self.executor, self.work):
            for e, v in enumerate(torch.zeros(self.p, dtype=torch.float64).index_add_(0, ex, w.double())):
                out[e] += float(v)
        return out


def ring_query_schedule(work: list[torch.Tensor]) -> QuerySchedule:
    """Even out attention work: `work[r][i]` = keys allowed for rank r's local query i.

    Each rank keeps the longest prefix of its own queries whose work fits under the mean; the
    rest of every heavy rank (a suffix) forms one stream in global order that is cut, by
    cumulative work, into the shortfalls of the ranks in rank order. The largest load exceeds the
    mean by less than one query's work (at most Lk pairs).
    """
    p = len(work)
    totals = [float(w.double().sum()) for w in work]
    target = sum(totals) / p
    executor, kept, load = [], [], []
    for r, w in enumerate(work):
        cum = torch.cumsum(w.double(), 0)
        k = len(w) if totals[r] <= target else int((cum <= target).sum())
        kept.append(k)
        load.append(float(cum[k - 1]) if k else 0.0)
        executor.append(torch.full((len(w),), r, dtype=torch.long))
    shortfall = torch.tensor([max(0.0, target - x) for x in load], dtype=torch.float64)
    bounds = torch.cumsum(shortfall, 0)
    before = 0.0  # work of the surplus stream ahead of the current owner's suffix
    for r, w in enumerate(work):
        suffix = w[kept[r] :].double()
        if len(suffix) == 0:
            continue
        start = before + torch.cumsum(suffix, 0) - suffix  # stream position where each query starts
        executor[r][kept[r] :] = torch.searchsorted(bounds, start, right=True).clamp_max(p - 1)
        before += float(suffix.sum())
    return QuerySchedule(executor, work)
