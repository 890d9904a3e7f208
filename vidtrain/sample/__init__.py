"""Streaming sampler: chunked few-step generation over a KV cache, multi-shot, NVFP4 cache,
async VAE decode, CLI (`vidtrain sample`) and evaluation (`vidtrain eval`)."""

from vidtrain.sample.kv_cache import KVCache, visible_frames
from vidtrain.sample.sampler import (
    ChunkOut,
    Conditioning,
    SamplerConfig,
    SampleResult,
    StreamingSampler,
    debug_text_context,
)

__all__ = [
    "ChunkOut",
    "Conditioning",
    "KVCache",
    "SampleResult",
    "SamplerConfig",
    "StreamingSampler",
    "debug_text_context",
    "visible_frames",
]
