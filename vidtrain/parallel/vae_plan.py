"""The planned VAE encode of an SP group (training from videos): one encode, no rank waiting.

Every rank encodes its range of `schedule.vae_encode_plan` (equal pixel frames read, halo
included; rank 0 has no halo, so it encodes more frames of its own), then one all-to-all hands
each latent frame to the ranks whose layout holds it. The latents equal the one-pass encode
whenever the halo is the VAE's receptive field, as each rank's own span encode would be. A rank's
range is one `CausalVideoVAE.encode_range` call: as many latent frames per network pass as fit in
memory (its "auto" default, caches carried between passes), not Wan's one latent frame per pass.

Legend: B batch, C channels, F latent frames, h/w latent size, P SP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vidtrain.parallel.schedule import vae_encode_plan


def _overlap(a: tuple[int, int], z: tuple[int, int]) -> tuple[int, int]:
    return max(a[0], z[0]), max(max(a[0], z[0]), min(a[1], z[1]))


def gather_planned_latents(source, need: list[tuple[int, int]], sp_rank: int, group) -> torch.Tensor:
    """The latents of this rank's span `need[sp_rank]`, VAE-encoded by the SP group's balanced plan.

    `need[r]`: the latent frames [f0, f1) rank r holds (its layout's `frame_span`, one per rank).
    `source` is lazy (`.frames(f0, f1)`, `.halo`, `.shape`, `.temporal_compression`, `.device`;
    vidtrain.data.videos.VideoLatents).
    """
    b, c, f, h, w = source.shape
    plan = vae_encode_plan(f, len(need), source.halo, source.temporal_compression)
    e0, e1 = plan[sp_rank]
    mine = source.frames(e0, e1) if e1 > e0 else None  # [B, C, e1-e0, h, w]
    parts, send_counts = [], []
    for span in need:  # destination-major
        s0, s1 = _overlap((e0, e1), span)
        send_counts.append(s1 - s0)
        if s1 > s0:
            parts.append(mine[:, :, s0 - e0 : s1 - e0])
    if parts:
        send = torch.cat(parts, dim=2).permute(2, 0, 1, 3, 4).contiguous()  # [frames, B, C, h, w]
    else:  # this rank encodes nothing (more ranks than the plan needs)
        send = torch.empty((0, b, c, h, w), device=source.device)
    recv_counts = []
    for seg in plan:  # source-major
        s0, s1 = _overlap(seg, need[sp_rank])
        recv_counts.append(s1 - s0)
    recv = send.new_empty((sum(recv_counts), b, c, h, w))
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group)
    return recv.permute(1, 2, 0, 3, 4).contiguous()  # plan ranges ascend: frames arrive in order
