"""The KV cache's preallocated slots: bit-identical to gathering the visible blocks and
concatenating them, storage at fixed addresses with a window, bounded by `history_slots`."""

from __future__ import annotations

import pytest
import torch

from vidtrain.formats import nvfp4 as N
from vidtrain.sample import kv_cache
from vidtrain.tokens import MaskRule

TPF = 4  # tokens per latent frame


def _reference(rule, kv, shots, kv_dtype):
    """The cache's semantics written plainly: a dict of stored blocks, visible tokens gathered
    chunk by chunk, one torch.cat per pass (what the cache did before its slots)."""
    stored, shot_start, outs = {}, {}, []
    c = rule.frames_per_chunk
    for chunk, ((k, v), shot) in enumerate(zip(kv, shots)):
        shot_start.setdefault(shot, chunk)

        def vis(j, chunk=chunk, shot=shot):
            frames = torch.arange(j * c, (j + 1) * c)
            return kv_cache.visible_frames(rule, chunk, shot_start[shot], frames)

        for j in [j for j in sorted(stored) if not vis(j).any()]:
            del stored[j]
        ks, vs = [], []
        for j in sorted(stored):
            sk, sv = stored[j]
            if kv_dtype == "nvfp4":
                sk, sv = N.dequantize(sk, k.dtype), N.dequantize(sv, k.dtype)
            else:
                sk, sv = sk.to(k.dtype), sv.to(k.dtype)
            idx = torch.nonzero(vis(j).repeat_interleave(TPF)).squeeze(1)
            ks.append(sk.index_select(2, idx))
            vs.append(sv.index_select(2, idx))
        outs.append((torch.cat([*ks, k], 2), torch.cat([*vs, v], 2)))
        if kv_dtype == "nvfp4":
            stored[chunk] = (N.quantize_blocks(k, (0, 1)), N.quantize_blocks(v, (0, 1)))
        else:
            stored[chunk] = (k.to(kv_cache.KV_DTYPES[kv_dtype]), v.to(kv_cache.KV_DTYPES[kv_dtype]))
    return outs


RULES = [
    MaskRule("causal", 3, window_frames=4, sink_frames=1, shot_sink=True),
    MaskRule("causal", 3, window_frames=6, sink_frames=3),
    MaskRule("causal", 3),  # unbounded history: the slots grow
]


@pytest.mark.parametrize("rule", RULES, ids=["window4-sink1-shot", "window6-sink3", "unbounded"])
@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "nvfp4"])
@pytest.mark.parametrize("grad", [False, True])
def test_slots_equal_gather_and_cat(rule, kv_dtype, grad):
    g = torch.Generator().manual_seed(0)
    n = 12
    kv = [
        tuple(torch.randn(2, 2, 3 * TPF, 32, generator=g) * (i % 3 + 1) for _ in range(2)) for i in range(n)
    ]
    shots = [0] * 5 + [1] * 4 + [2] * 3
    want = _reference(rule, kv, shots, kv_dtype)
    cache = kv_cache.KVCache(1, rule, TPF, kv_dtype, nvfp4_backend="torch")
    with torch.set_grad_enabled(grad):
        for chunk, ((k, v), shot) in enumerate(zip(kv, shots)):
            cache.begin(chunk, shot, write=True)
            gk, gv, mask = cache.hook(0, None, k, v, None)
            assert mask is None
            assert torch.equal(gk, want[chunk][0]) and torch.equal(gv, want[chunk][1]), chunk


def test_storage_is_preallocated_at_fixed_addresses():
    rule = MaskRule("causal", 3, window_frames=6, sink_frames=3, shot_sink=True)
    slots = kv_cache.history_slots(rule)
    assert slots == 2 + 1 + 1 + 1 and kv_cache.history_slots(MaskRule("causal", 3)) is None
    cache = kv_cache.KVCache(2, rule, TPF, "nvfp4", nvfp4_backend="torch")
    g = torch.Generator().manual_seed(1)
    addresses, workspaces, sizes = set(), set(), []
    with torch.no_grad():
        for chunk in range(64):
            cache.begin(chunk, chunk // 10, write=True)
            k, v = (torch.randn(1, 2, 3 * TPF, 32, generator=g) for _ in range(2))
            for layer in range(2):
                cache.hook(layer, None, k, v, None)
            if chunk >= 8:  # the window and sinks are full
                addresses.add(tuple(b.data_ptr() for lay in cache.layers for bs in lay.bufs for b in bs))
                workspaces.add(tuple(w.data_ptr() for w in cache._workspace.values()))
                sizes.append(cache.nbytes())
            assert len(cache.layers[0]) <= slots
    assert len(addresses) == 1 and len(workspaces) == 1  # nothing reallocated over 56 chunks
    per_chunk = cache.nbytes() / len(cache.layers[0])
    assert 0 < max(sizes) <= slots * per_chunk  # the bytes held stay within the slots
    assert all(b.shape[0] == slots for lay in cache.layers for bs in lay.bufs for b in bs)
