"""Multi-rank sampling (Ulysses over heads, KV cache by heads) equals one process.

2 gloo ranks on CPU, the debug DiT (4 heads, fp32), 4x4 latents (4 tokens per frame, 12 per
chunk), two shots under a window with sinks. Latents equal the one-process sampler within
rtol 1e-5 / atol 1e-5 (the tolerance of the SP training equality tests,
tests/test_parallel_equality.py: rel 1e-5; measured here: 0, bit-identical, in fp32, bf16 and
nvfp4 caches); each rank's KV cache holds exactly its heads, and an NVFP4 cache's stored bytes for
a head (codes, e4m3 scales, amax) equal the one-process cache's bytes for that head.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidtrain.models.wan import CausalWanDiT
from vidtrain.sample import kv_cache
from vidtrain.sample.parallel_sample import UlyssesSampler, check_ranks
from vidtrain.sample.sampler import SamplerConfig, StreamingSampler, debug_text_context
from vidtrain.testing.equality import spawn
from vidtrain.tokens import MaskRule

WORLD, HW, SEEDS, CHUNKS = 2, (4, 4), (1, 2), (2, 2)
KV = ("fp32", "bf16", "nvfp4")
RTOL = ATOL = 1e-5


def _model() -> CausalWanDiT:
    torch.manual_seed(0)
    return CausalWanDiT.from_flavor("debug", attn_backend="sdpa").eval().requires_grad_(False)


def _cfg(kv: str) -> SamplerConfig:
    return SamplerConfig(
        kv_cache=kv, timesteps=(1000.0, 500.0), window_frames=3, sink_frames=1, shot_sink=True
    )


def _conds(model):
    return [debug_text_context(["a cat", "a dog"], model.cfg.text_dim, length=8)] * len(CHUNKS)


class _Keep:
    """Keeps the last cache the sampler made (to read its stored bytes)."""

    def new_cache(self, tokens_per_frame):
        self.cache = super().new_cache(tokens_per_frame)
        return self.cache


class KeepOne(_Keep, StreamingSampler):
    pass


class KeepRanks(_Keep, UlyssesSampler):
    pass


def _stored(cache: kv_cache.KVCache) -> dict:
    """Every layer's stored K/V parts per chunk: dense [B, H, Lc, D], or NVFP4 codes, scales (as
    bytes) and amax, each with heads on dim 1."""
    return {
        (i, j): [p.clone() for t in layer[j] for p in kv_cache._Slots._parts(t)]
        for i, layer in enumerate(cache.layers)
        for j in layer.chunks()
    }


def _sample(sampler) -> torch.Tensor:
    return sampler.generate_latents(_conds(sampler.model), list(CHUNKS), HW, list(SEEDS)).latents_BCFHW


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from vidtrain.parallel.mesh import build_mesh

    mesh = build_mesh(world, 60.0)
    try:
        for kv in KV:
            sampler = KeepRanks(_model(), _cfg(kv), mesh)
            lat = _sample(sampler)
            torch.save({"latents": lat, "stored": _stored(sampler.cache), "nbytes": sampler.cache.nbytes()},
                       Path(out) / f"{kv}_rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp_sample")
    spawn(_worker, WORLD, (str(out),), timeout_s=240)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kv", KV)
def test_two_ranks_equal_one_process(ranks, kv):
    one = KeepOne(_model(), _cfg(kv))
    ref = _sample(one)
    ref_stored = _stored(one.cache)
    got = [torch.load(ranks / f"{kv}_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for g in got:  # every rank ends with the same latents (the gathered velocities)
        torch.testing.assert_close(g["latents"], got[0]["latents"], rtol=0, atol=0)
    err = float((got[0]["latents"] - ref).abs().max())
    print(f"[{kv}] max |latents(2 ranks) - latents(1 process)| = {err:.3g}")
    torch.testing.assert_close(got[0]["latents"], ref, rtol=RTOL, atol=ATOL)
    # the cache is sharded by heads: the same chunks, rank r holds heads [r*H/N, (r+1)*H/N)
    heads = _model().cfg.num_heads // WORLD
    assert sum(g["nbytes"] for g in got) == one.cache.nbytes()
    for key, parts in ref_stored.items():
        for r, g in enumerate(got):
            for p_ref, p_got in zip(parts, g["stored"][key]):
                mine = p_ref[:, r * heads : (r + 1) * heads]
                assert p_got.shape == mine.shape and p_got.dtype == mine.dtype
                # measured bit-identical here (the K/V reaching the cache are): NVFP4 codes,
                # e4m3 scales and amax of a head are the one-process cache's bytes for that head
                assert torch.equal(p_got.view(torch.uint8), mine.contiguous().view(torch.uint8)), (kv, key)


@pytest.mark.parametrize("kv", ["nvfp4", "bf16"])
def test_head_shard_stores_the_same_bytes(kv):
    """The one-process cache and N caches fed the heads' shards of the same K/V store, for each
    head, identical bytes: NVFP4's amax is per (batch, head, block), its scales per 16 values of D."""
    g = torch.Generator().manual_seed(0)
    rule = MaskRule("causal", 3, window_frames=3, sink_frames=1, shot_sink=True)
    b, h, lc, d, n = 2, 4, 12, 32, 2
    full = kv_cache.KVCache(2, rule, 4, kv)
    shards = [kv_cache.KVCache(2, rule, 4, kv) for _ in range(n)]
    for chunk in range(4):
        k = torch.randn(b, h, lc, d, generator=g) * (1 + torch.arange(h))[None, :, None, None]
        v = torch.randn(b, h, lc, d, generator=g)
        for cache in [full, *shards]:
            cache.begin(chunk, 0, write=True)
        for layer in range(2):
            ref_k, ref_v = (t.clone() for t in full.hook(layer, None, k, v, None)[:2])
            for r, cache in enumerate(shards):
                sl = slice(r * h // n, (r + 1) * h // n)
                out_k, out_v, _ = cache.hook(layer, None, k[:, sl], v[:, sl], None)
                # what the history reads back as (dequantized): the full cache's, head for head
                assert torch.equal(out_k, ref_k[:, sl]) and torch.equal(out_v, ref_v[:, sl])
    ref = _stored(full)
    assert ref
    for r, cache in enumerate(shards):
        got = _stored(cache)
        assert got.keys() == ref.keys()
        for key in ref:
            for p_ref, p_got in zip(ref[key], got[key]):
                mine = p_ref[:, r * h // n : (r + 1) * h // n]
                assert p_got.dtype == mine.dtype and p_got.shape == mine.shape
                assert torch.equal(p_got.view(torch.uint8), mine.contiguous().view(torch.uint8)), key
    assert sum(c.nbytes() for c in shards) == full.nbytes()


def test_heads_or_tokens_not_divisible_are_one_clear_line():
    with pytest.raises(ValueError, match=r"4 heads, --nproc=3"):
        check_ranks(4, 12, 3)
    with pytest.raises(ValueError, match=r"12 heads, --nproc=5"):
        check_ranks(12, 4680, 5)
    with pytest.raises(ValueError, match=r"10 tokens per chunk are not divisible by --nproc=4"):
        check_ranks(4, 10, 4)
    check_ranks(12, 4680, 4)


def test_one_rank_sampler_is_the_plain_sampler():
    from vidtrain.parallel.mesh import Mesh

    ref = _sample(StreamingSampler(_model(), _cfg("nvfp4")))
    got = _sample(UlyssesSampler(_model(), _cfg("nvfp4"), Mesh.single(torch.device("cpu"))))
    assert torch.equal(ref, got)


def test_sample_cli_nproc_exits_2_on_heads(tmp_path):
    from vidtrain.models.wan.state_dict import save_vidtrain

    ckpt = save_vidtrain(_model(), tmp_path / "model")
    shots = tmp_path / "shots.yaml"
    shots.write_text("shots:\n  - prompt: a cat\n    chunks: 2\n")
    r = subprocess.run(
        [sys.executable, "-m", "vidtrain.cli", "sample", "--checkpoint", str(ckpt), "--shots", str(shots),
         "--out", str(tmp_path / "v.mp4"), "--nproc", "3", "--height", "32", "--width", "32", "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "4 heads, --nproc=3" in r.stderr
    assert not (tmp_path / "v.mp4").exists()


def _frames(path: Path):
    import decord

    r = decord.VideoReader(str(path))
    return r.get_batch(list(range(len(r)))).asnumpy()


@pytest.mark.slow
def test_sample_cli_nproc_2_writes_the_one_process_video(tmp_path):
    """`vidtrain sample --nproc 2` (the launcher's torchrun ranks, gloo) writes, from rank 0 only,
    the same mp4 frames as one process; the metrics name the ranks and the sharded cache; the
    one-process run decodes on `--decode-device cpu`."""
    from vidtrain.models.wan.state_dict import save_vidtrain
    from vidtrain.sample import cli

    ckpt = save_vidtrain(_model(), tmp_path / "model")
    shots = tmp_path / "shots.yaml"
    shots.write_text("shots:\n  - prompt: a cat\n    chunks: 2\n  - prompt: a dog\n    chunks: 1\n")
    common = ["--checkpoint", str(ckpt), "--shots", str(shots), "--height", "32", "--width", "32",
              "--device", "cpu", "--window-frames", "3", "--kv-cache", "nvfp4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    r = subprocess.run(
        [sys.executable, "-m", "vidtrain.cli", "sample", *common, "--out", str(tmp_path / "two.mp4"), "--nproc", "2"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("[vidtrain] wrote") == 1  # rank 0 alone writes
    assert cli.main([*common, "--out", str(tmp_path / "one.mp4"), "--decode-device", "cpu"]) == 0
    assert (_frames(tmp_path / "two.mp4") == _frames(tmp_path / "one.mp4")).all()
    import json

    two = json.loads((tmp_path / "two.metrics.json").read_text())
    one = json.loads((tmp_path / "one.metrics.json").read_text())
    assert two["nproc"] == 2 and one["nproc"] == 1 and one["decode_device"] == "cpu"
    assert two["kv_cache_bytes"] == one["kv_cache_bytes"] == 2 * two["kv_cache_bytes_per_rank"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temps left


def test_launcher_sample_entry_dry_run(capsys):
    """`vidtrain-launch sample`: torchrun over `vidtrain.cli sample ARGS`, `--nproc` left to
    WORLD_SIZE (torchrun's parser would take it for its own --nproc-per-node)."""
    from vidtrain.launch import launcher

    rc = launcher.main(
        ["sample", "--nproc", "4", "--dry-run", "--", "--checkpoint", "m", "--nproc", "4", "--seed=3"]
    )
    assert rc == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4"
    tail = cmd[cmd.index("--module") + 1 :]
    assert tail == ["vidtrain.cli", "sample", "--checkpoint", "m", "--seed=3"]
    assert launcher.main(["sample", "--nproc", "2"]) == 2
    assert "needs `-- ARGS`" in capsys.readouterr().err
