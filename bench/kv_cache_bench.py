"""KV cache over long streams: time and tensor allocations per chunk, flat with a window.

    python bench/kv_cache_bench.py [--chunks 64] [--kv-cache nvfp4] [--static] [--json out.json]

The debug DiT streams one shot of CHUNKS chunks with a window of 6 latent frames and a 3-frame
sink (no VAE decode: the cache is what is measured). Per window of 8 chunks: seconds per chunk,
and the tensor ops per chunk that allocate a new output (counted with a TorchDispatchMode over
every aten op; a flat count means nothing grows with video length), the cache's bytes and the
address set of its storage (one set = preallocated, written in place). Then per single chunk at
chunks 8, 16, 32 and 64 (`--at`, counted from 1; the run streams one chunk more so that each of
them has its clean pass): its seconds and allocating ops. `--static`: the cache of `vidtrain
sample --compile` (history padded to the window's capacity, a key mask), run eagerly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import cpu_model, write_json

from vidtrain.models.wan import CausalWanDiT
from vidtrain.sample import kv_cache
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context


class AllocationCount(TorchDispatchMode):
    """Counts aten ops whose tensor output owns a storage none of the inputs had."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in _tensors((args, kwargs))}
        self.count += sum(1 for t in _tensors(out) if t.untyped_storage().data_ptr() not in seen)
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--kv-cache", default="nvfp4", choices=list(kv_cache.KV_DTYPES))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--impl", help="another kv_cache.py to measure (e.g. an older one from git show)")
    p.add_argument("--at", default="8,16,32,64", help="chunks (from 1) to report one by one")
    p.add_argument("--static", action="store_true", help="the padded, fixed-shape cache of --compile")
    a = p.parse_args(argv)
    cache_module = kv_cache
    if a.impl:
        import importlib.util

        from vidtrain.sample import sampler as sampler_module

        spec = importlib.util.spec_from_file_location("kv_cache_impl", a.impl)
        cache_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cache_module)
        sampler_module.KVCache = cache_module.KVCache
    torch.manual_seed(0)
    model = CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval()
    cfg = SamplerConfig(
        kv_cache=a.kv_cache, window_frames=6, sink_frames=3, timesteps=(1000.0, 750.0, 500.0, 250.0)
    )
    sampler = StreamingSampler(model, cfg)
    at = [int(x) for x in a.at.split(",") if x.strip()]
    n_chunks = max([a.chunks, *at]) + 1  # the last chunk has no clean pass: one more
    cond = debug_text_context(["a cat"], model.cfg.text_dim, length=8)
    rows, caches = [], []
    orig = sampler.new_cache

    def keep(*args, **kw):
        caches.append(orig(*args, **kw))
        caches[-1].static = a.static and caches[-1].capacity is not None
        return caches[-1]

    sampler.new_cache = keep
    counter = AllocationCount()
    marks: list[tuple[float, int, int, tuple]] = []
    orig_begin = cache_module.KVCache.begin

    def begin(self, chunk, shot, write=False):
        if not write:
            slots = [getattr(lay, "bufs", None) for lay in self.layers]
            bufs = tuple(b.data_ptr() for bs in slots if bs for parts in bs for b in parts)
            marks.append((time.perf_counter(), counter.count, self.nbytes(), bufs))
        return orig_begin(self, chunk, shot, write)

    cache_module.KVCache.begin = begin
    with torch.no_grad(), counter:  # counted run: allocations, bytes, addresses
        sampler.generate_latents([cond], [n_chunks], (4, 4), [0])
    counted, marks = marks, []
    with torch.no_grad():  # timed run (the counting mode is slow)
        sampler.generate_latents([cond], [n_chunks], (4, 4), [0])
    cache_module.KVCache.begin = orig_begin
    timed = marks
    for w in range(0, a.chunks - 8 + 1, 8):
        end = min(w + 8, len(timed) - 1)
        n = end - w
        t0, t1 = timed[w][0], timed[end][0]
        c0, c1, nbytes = counted[w][1], counted[end][1], counted[end][2]
        addresses = {m[3] for m in counted[max(w, 4) : w + 8] if m[3]}
        rows.append({
            "chunks": f"{w}-{w + n}", "s_per_chunk": round((t1 - t0) / n, 5),
            "allocations_per_chunk": (c1 - c0) / n, "kv_bytes": nbytes, "storage_address_sets": len(addresses),
        })  # fmt: skip
    per_chunk = [
        {
            "chunk": k,
            "s": round(timed[k][0] - timed[k - 1][0], 5),
            "allocations": counted[k][1] - counted[k - 1][1],
        }
        for k in at
    ]  # chunk k (from 1) runs from begin of index k-1 to begin of index k
    out = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "kv_cache": a.kv_cache,
        "static": a.static,
        "per_chunk": per_chunk,
        "impl": a.impl or "vidtrain.sample.kv_cache",
        "load_avg": os.getloadavg(),
        "rows": rows,
    }
    print(f"{'chunks':>8} {'s/chunk':>9} {'allocs/chunk':>13} {'kv bytes':>9} {'addr sets':>9}")
    for r in rows:
        print(
            f"{r['chunks']:>8} {r['s_per_chunk']:>9.4f} {r['allocations_per_chunk']:>13.1f} "
            f"{r['kv_bytes']:>9} {r['storage_address_sets']:>9}"
        )
    print(f"{'chunk':>8} {'s':>9} {'allocs':>13}")
    for r in per_chunk:
        print(f"{r['chunk']:>8} {r['s']:>9.4f} {r['allocations']:>13}")
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
