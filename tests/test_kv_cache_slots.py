"""The KV cache's preallocated slots: bit-identical to gathering the visible blocks and
concatenating them, storage at fixed addresses with a window, bounded by `history_slots`."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def _bytes_equal(a, b) -> bool:
    return a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_into_slot_storage_gives_the_quantizers_bytes(dtype):
    """The cache's writes quantize straight into a slot's storage: NVFP4 and FP8 bytes equal the
    quantizers' (blocks of zeros, large and tiny values included), nothing moves."""
    from vidtrain import kernels

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 12, 32, generator=g) * torch.tensor([1e-3, 1.0, 300.0])[None, :, None, None]
    x[1, 0] = 0.0  # an all-zero (batch, head) block
    x = x.to(dtype)
    n = 4  # a buffer of slots; write into slot 2
    data = torch.zeros(n, 2, 3, 12, 16, dtype=torch.uint8)
    scales = torch.zeros(n, 2, 3, 12, 2, dtype=torch.uint8)
    amax = torch.zeros(n, 2, 3, 1, 1)
    ptrs = [t.data_ptr() for t in (data, scales, amax)]
    for backend in ("torch", "interpret"):
        kv_cache.nvfp4_quantize_into(x, data[2], scales[2], amax[2], backend=backend)
        for want in (N.quantize_blocks(x, (0, 1)), kernels.quantize_blocks(x, (0, 1), backend="torch")):
            assert torch.equal(data[2], want.data), backend
            assert torch.equal(scales[2], want.scales.view(torch.uint8)), backend
            assert torch.equal(amax[2], want.amax.float()), backend
    assert [t.data_ptr() for t in (data, scales, amax)] == ptrs
    assert not data[[0, 1, 3]].any() and not scales[[0, 1, 3]].any()  # the other slots untouched
    codes = torch.zeros(n, 2, 3, 12, 32, dtype=torch.uint8)
    scale = torch.zeros(n, 2, 3, 1, 1)
    kv_cache.fp8_quantize_into(x, codes[1], scale[1])
    want = kv_cache.fp8_quantize_block(x)
    assert _bytes_equal(codes[1], want.data) and torch.equal(scale[1], want.scale.float())


@pytest.mark.parametrize("kv_dtype", ["bf16", "nvfp4", "fp8"])
def test_write_is_in_place(kv_dtype, monkeypatch):
    """A chunk's K/V land in its slot with no block-sized copy_: `_Slots.write` (copy finished
    blocks) is never called, the slot's views are the buffers' and hold the quantizers' bytes."""
    rule = MaskRule("causal", 3, window_frames=6, sink_frames=3)
    cache = kv_cache.KVCache(1, rule, TPF, kv_dtype, nvfp4_backend="torch")
    monkeypatch.setattr(kv_cache._Slots, "write", lambda *a: pytest.fail("copied a finished block"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for chunk in range(6):
            cache.begin(chunk, 0, write=True)
            k, v = (torch.randn(1, 2, 3 * TPF, 32, generator=g) for _ in range(2))
            cache.hook(0, None, k, v, None)
            sk, sv = cache.layers[0][chunk]
            if kv_dtype == "nvfp4":
                for got, t in ((sk, k), (sv, v)):
                    want = N.quantize_blocks(t, (0, 1))
                    assert torch.equal(got.data, want.data) and torch.equal(got.amax, want.amax)
                    assert torch.equal(got.scales.view(torch.uint8), want.scales.view(torch.uint8))
            elif kv_dtype == "fp8":
                want = kv_cache.fp8_quantize_block(k)
                assert _bytes_equal(sk.data, want.data) and torch.equal(sk.scale, want.scale)
            else:
                assert torch.equal(sk, k.bfloat16()) and torch.equal(sv, v.bfloat16())
            slot = cache.layers[0].slot[chunk]
            first = sk.data if kv_dtype in ("nvfp4", "fp8") else sk
            assert first.data_ptr() == cache.layers[0].bufs[0][0][slot].data_ptr()


class _AllocationCount(TorchDispatchMode):
    """Counts aten ops whose tensor output owns a storage none of the inputs had
    (bench/kv_cache_bench.py's count)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in _flat((args, kwargs))}
        self.count += sum(1 for t in _flat(out) if t.untyped_storage().data_ptr() not in seen)
        return out


def _flat(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _flat(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _flat(v)


@pytest.mark.parametrize("static", [False, True], ids=["exact", "padded"])
def test_allocations_per_chunk_do_not_grow(static):
    """Streaming with a window (NVFP4 cache, the debug DiT): the allocating ops of chunk 24 are no
    more than chunk 8's, and every chunk from 8 to 24 counts the same."""
    from vidtrain.models.wan import CausalWanDiT
    from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context

    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    cfg = SamplerConfig(kv_cache="nvfp4", window_frames=6, sink_frames=3, timesteps=(1000.0,))
    sampler = StreamingSampler(model, cfg)
    new_cache = sampler.new_cache

    def cache(tpf):
        c = new_cache(tpf)
        c.static, c.nvfp4_backend = static, "torch"
        return c

    sampler.new_cache = cache
    cond = debug_text_context(["a cat"], model.cfg.text_dim, length=8)
    counter, counts = _AllocationCount(), []
    with torch.no_grad(), counter:
        last = 0
        for _ in sampler.stream([cond], [26], (4, 4), [0]):  # chunk 25 (no clean pass) not counted
            counts.append(counter.count - last)
            last = counter.count
    assert counts[24] <= counts[8] and len(set(counts[8:25])) == 1, counts


def test_quantize_with_amax_out_checks_the_storage():
    """`vidtrain.kernels.quantize_with_amax(out=)` returns a tensor viewing `out` and refuses
    storage of the wrong shape or dtype with a message naming what it needs."""
    from vidtrain import kernels

    x = torch.randn(2, 3, 5, 32)
    amax = kernels.abs_amax(x, (0, 1))
    data = torch.empty(2, 3, 5, 16, dtype=torch.uint8)
    scales = torch.empty(2, 3, 5, 2, dtype=torch.uint8)
    q = kernels.quantize_with_amax(x, amax, backend="torch", out=(data, scales))
    assert q.data.data_ptr() == data.data_ptr() and q.scales.data_ptr() == scales.data_ptr()
    assert torch.equal(N.dequantize(q), N.dequantize(N.quantize_blocks(x, (0, 1))))
    with pytest.raises(ValueError, match=r"need uint8 \(2, 3, 5, 16\)"):
        kernels.quantize_with_amax(x, amax, backend="torch", out=(data.float(), scales))
    with pytest.raises(ValueError, match=r"need uint8 \(2, 3, 5, 2\)"):
        kernels.quantize_with_amax(x, amax, backend="torch", out=(data, scales[:, :, :4]))
