"""The reference streaming sampler: chunk-by-chunk few-step denoising over a KV cache.

Per chunk c (C latent frames):
  1. start from fresh noise at the first timestep (per-sample torch.Generator: same seed, same
     video; different seeds, different videos, whatever the batch holds);
  2. few-step denoising over `timesteps` (default 1000, 750, 500, 250, shifted like training);
     update "x0" (default, Self-Forcing / CausVid): predict x0 = x_t - sigma*v, then re-noise it
     to the next timestep with *fresh* noise; update "euler": x <- x + (sigma' - sigma) * v.
     Either way the chunk's output is the x0 prediction of the last step;
  3. one pass of the clean chunk at t=0 whose K/V the cache stores (skipped after the last chunk).
Image-to-video, the Wan2.2 way (`Conditioning.image_latent`, shot 0's): during chunk 0 latent frame
0 is the image latent, its tokens at timestep 0 (per-frame timesteps), reset to it after every
step; the chunk's output keeps it bit-exactly and its clean pass caches it, as teacher forcing's
clean copy with `flow.condition_first_frame`. Continuation (`prefix_latents`, k whole chunks):
the prefix chunks are only written into the cache by clean passes (t=0) under the same
window/sink rule and yielded as they are (`ChunkOut.prefix`); generation continues at chunk k.
History enters every pass through `AttentionContext.kv_hook` (kv_cache.KVCache), so the same
model code serves teacher forcing and streaming.
`SamplerConfig.compile` (`vidtrain sample --compile`): the model's forward runs under
torch.compile ("reduce-overhead", i.e. CUDA graphs, on CUDA; "default" elsewhere), the KV hook
eagerly between the graphs, over a static cache (history padded to the window's capacity with a
key mask): one set of graphs for every chunk; latents equal the eager path's within float
tolerance (the eager path without it is unchanged).

The text of a shot enters as its embedded context and, per layer, its cross-attention K/V,
computed once per shot and reused by every chunk and step (`cross_kv_cache`). A `Conditioning`
holds the context as the model takes it: `SamplerConfig.condition` builds it from encoder states
in the run's `text_padding` (wan: `text_len` zero-padded tokens, no mask, as Wan2.1 and the
run's training), so `vidtrain sample`, `vidtrain eval` and DMD's rollouts see what training saw.

`StreamingSampler.stream` is the one chunk loop; `generate_latents` collects it, and the DMD
stage calls it with `grad_exit=[k_0, k_1, ...]` (or one k for all chunks) for self-forcing
rollouts: denoising of chunk c stops at step k_c, whose x0 prediction keeps its graph (for
chunks in `grad_chunks`); all other passes, including the cache writes, run under no_grad.

Legend: B batch, C channels, F frames, H/W latent size, L tokens, S text tokens, T text dim,
D model dim.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidtrain.config import (
    DENOISING_STEPS,
    FRAMES_PER_CHUNK,
    TEXT_LEN,
    TEXT_PADDING,
    TIMESTEP_SHIFT,
    Recipe,
    check_shift,
    check_text_padding,
    check_timesteps,
)
from vidtrain.forcing.flow import NUM_TRAIN_TIMESTEPS, step_sigmas
from vidtrain.models.text import text_context
from vidtrain.models.wan.attention import AttentionContext
from vidtrain.sample import settings
from vidtrain.sample.kv_cache import KV_DTYPES, KV_SCALE_RULES, KVCache
from vidtrain.tokens import MaskRule, TokenMeta, grid_meta

UPDATES = ("x0", "euler")


@dataclass(frozen=True)
class SamplerConfig:
    """Everything that decides what the sampler computes.

    The defaults are the recipe's (vidtrain/config.py) where training has the same setting, the
    sampler's own otherwise; `from_run` gives a checkpoint the settings it was trained with.
    """

    timesteps: tuple[float, ...] = DENOISING_STEPS  # before the shift, 0..1000
    shift: float = TIMESTEP_SHIFT  # Wan/SD3 timestep shift applied to `timesteps` (1 = as listed)
    update: str = "x0"  # "x0" (predict x0, re-noise with fresh noise) or "euler"
    frames_per_chunk: int = FRAMES_PER_CHUNK
    window_frames: int | None = None  # None = all history (no eviction)
    sink_frames: int = 0  # global sink: first G latent frames of the video
    shot_sink: bool = (
        False  # keep the first chunk of the current shot (from_run: as trained, else on when windowed)
    )
    kv_cache: str = "bf16"  # fp32 | bf16 | fp16 | nvfp4
    # the NVFP4 cache's block-scale rule: amax (the chain) | mse (per 16 elements the E4M3 scale
    # of least squared error among 8 candidates; same bytes); as trained (quant.kv_scale_rule)
    kv_scale_rule: str = "amax"
    shot_rope_offset: int = 0  # temporal RoPE offset added per shot (shot s: s * offset)
    recache_on_cut: bool = False  # LongLive: recompute the kept K/V under the new prompt at a cut
    cross_kv_cache: bool = True  # each layer's cross-attention K/V once per shot (False: every pass)
    # the caption context (`condition`): as the run trained (model.text_padding / text_len)
    text_padding: str = TEXT_PADDING  # wan (fixed text_len tokens, zero pad, no mask) | masked
    text_len: int = TEXT_LEN
    # torch.compile the model's forward ("reduce-overhead": CUDA graphs on CUDA, "default"
    # elsewhere); with a window the KV history is padded to a fixed length (one graph per shape)
    compile: bool = False

    def __post_init__(self) -> None:
        check_timesteps(self.timesteps)
        check_shift(self.shift)
        check_text_padding(self.text_padding, self.text_len)  # a ConfigError is a ValueError
        if self.update not in UPDATES:
            raise ValueError(f"unknown update {self.update!r}; known: {', '.join(UPDATES)}")
        if self.kv_cache not in KV_DTYPES:
            raise ValueError(f"unknown kv_cache {self.kv_cache!r}; known: {', '.join(KV_DTYPES)}")
        if self.kv_scale_rule not in KV_SCALE_RULES:
            raise ValueError(
                f"unknown kv_scale_rule {self.kv_scale_rule!r}; known: {', '.join(KV_SCALE_RULES)}"
            )
        if self.frames_per_chunk < 1 or self.sink_frames < 0:
            raise ValueError("frames_per_chunk must be >= 1, sink_frames >= 0")
        self.rule()  # validates window_frames

    @classmethod
    def from_run(
        cls,
        run: str | Path | Recipe | None,
        lora: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        bounded: bool = False,
    ) -> SamplerConfig:
        """The settings a checkpoint was trained with: `overrides` (flags) > the LoRA record >
        the run (a run / step / model folder's recipe.yaml and quant.json, or a Recipe in memory)
        > `defaults` > this dataclass's defaults (vidtrain/sample/settings.py). `log` gets a
        line per source naming the settings it decided. `bounded`: a window unless a flag asks
        for all history (what `vidtrain sample` and `vidtrain eval` use: constant memory)."""
        resolved = settings.resolve(cls, run, lora, overrides, defaults, bounded)
        if log is not None:
            settings.describe(resolved, log)
        return cls(**{name: s.value for name, s in resolved.items()})

    def rule(self) -> MaskRule:
        """The training mask rule this cache mirrors (use the same in teacher forcing)."""
        return MaskRule.of("causal", self)

    def sigmas(self) -> list[float]:
        """Shifted sigmas of the denoising steps (the model sees t = 1000 * sigma)."""
        return step_sigmas(self.timesteps, self.shift)

    def condition(self, context_BST: torch.Tensor, mask_BS: torch.Tensor | None = None) -> Conditioning:
        """A shot's Conditioning from encoder states (and their token mask) in this config's
        `text_padding` and `text_len` (`vidtrain.models.text.text_context`, as training pads)."""
        return Conditioning(*text_context(context_BST, mask_BS, self.text_padding, self.text_len))


@dataclass
class Conditioning:
    """Text context of one shot for the whole batch, as the model takes it: [B, S, T] encoder
    states and the optional cross-attention mask (`SamplerConfig.condition` pads as the run did).
    `image_latent` [B, C, H, W] (first shot only): the encoded first frame of image-to-video."""

    context_BST: torch.Tensor
    mask_BS: torch.Tensor | None = None
    image_latent: torch.Tensor | None = None


@dataclass
class ChunkOut:
    index: int
    shot: int
    x0_BCFHW: torch.Tensor
    gen_start: float  # perf_counter seconds
    gen_end: float
    kv_bytes: int  # cache bytes the chunk attended to (after eviction)
    trace: list[dict] | None = None  # per step: t, x_t, v (and t_F under I2V) (when asked for)
    prefix: bool = False  # a continuation prefix chunk (given, not generated)


@dataclass
class SampleResult:
    latents_BCFHW: torch.Tensor
    chunks: list[ChunkOut] = field(default_factory=list)

    @property
    def kv_bytes_per_chunk(self) -> list[int]:
        return [c.kv_bytes for c in self.chunks]


def debug_text_context(prompts: Sequence[str], text_dim: int, length: int = 16) -> Conditioning:
    """Stand-in text states when no text encoder is given: a fixed random vector per prompt.

    Seeded by the prompt's sha256, so a prompt always maps to the same context; it carries no
    meaning (a real run passes `--text-encoder`).
    """
    rows = []
    for p in prompts:
        seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little") & (2**63 - 1)
        rows.append(torch.randn(1, length, text_dim, generator=torch.Generator().manual_seed(seed)))
    return Conditioning(torch.cat(rows))


def shot_of_chunks(chunks_per_shot: Sequence[int]) -> list[int]:
    if not chunks_per_shot or any(n < 1 for n in chunks_per_shot):
        raise ValueError(f"every shot needs >= 1 chunk, got {list(chunks_per_shot)}")
    return [s for s, n in enumerate(chunks_per_shot) for _ in range(n)]


class StreamingSampler:
    """Streams latent chunks from a CausalWanDiT with a KV cache (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, config: SamplerConfig | None = None) -> None:
        self.model = model
        self.config = config or SamplerConfig()
        self._text_cache: dict[int, tuple[torch.Tensor, list | None]] = {}
        self._compiled: Callable | None = None  # the compiled model forward (config.compile)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_cache(self, tokens_per_frame: int) -> KVCache:
        n = len(self.model.blocks)
        return KVCache(
            n,
            self.config.rule(),
            tokens_per_frame,
            self.config.kv_cache,
            static=self.config.compile,
            scale_rule=self.config.kv_scale_rule,
        )

    def compiled_forward(self) -> Callable:
        """The model's forward under torch.compile (built once): mode "reduce-overhead" (CUDA
        graphs) on CUDA, "default" elsewhere. The KV hook runs outside the graphs (it keeps the
        cache's bookkeeping in Python), so each layer's attention input is a graph input, of one
        shape per chunk shape once the cache pads its history (`KVCache(static=True)`)."""
        if self._compiled is None:
            if self.device.type == "cpu" and not any(
                shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")
            ):
                raise RuntimeError(
                    "--compile on CPU needs a C++ compiler (torch.compile's CPU backend builds C++); "
                    "none found (g++, c++, clang++ or $CXX): install one or sample without --compile"
                )
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            self._compiled = torch.compile(self.model.forward, mode=mode)
        return self._compiled

    # ---- one model pass ------------------------------------------------------------------------
    def _text(self, shot: int, cond: Conditioning) -> tuple[torch.Tensor, list | None]:
        """Embedded text context [B, S, D] and each layer's cross-attention K/V of it, computed
        once per shot (the current shot's only) and reused by every chunk and step.

        A pass with gradients (the exit step of `grad_exit`) gets no cached K/V: the model
        recomputes them from the context (same values) so that LoRA on the cross-attention k/v
        gets its gradient and each chunk's graph stays its own."""
        if shot not in self._text_cache:
            with torch.no_grad():
                ctx_BSD = self.model.embed_text(cond.context_BST.to(self.device))
                kv = None
                if self.config.cross_kv_cache:
                    kv = [blk.cross_attn.kv(ctx_BSD) for blk in self.model.blocks]  # per layer, [B, H, S, D]
            self._text_cache = {shot: (ctx_BSD, kv)}
        ctx_BSD, kv = self._text_cache[shot]
        return ctx_BSD, None if torch.is_grad_enabled() else kv

    def _forward(self, x_BCFHW, t, meta: TokenMeta, shot: int, cond: Conditioning, cache: KVCache):
        """Velocity prediction [B, C, F, H, W] for one chunk at timestep t (0..1000): one number,
        or per frame [B, F] (I2V: the image frame at 0)."""
        model = self.model
        b, _, f, h, w = x_BCFHW.shape
        if isinstance(t, torch.Tensor):
            t_BL = t.to(x_BCFHW.device, torch.float32).repeat_interleave(len(meta) // f, dim=1)
        else:
            t_BL = torch.full((b, len(meta)), float(t), device=x_BCFHW.device)
        # a pass with gradients (DMD's rollouts) may be recomputed in the backward (activation
        # checkpointing) after later chunks changed the cache: it reads the history it first read
        hook = _HistoryAsRead(cache.hook) if torch.is_grad_enabled() else cache.hook
        if self.config.compile:
            hook = _EagerHook(hook)
        attn = AttentionContext(rule=MaskRule("full"), meta=meta, kv_hook=hook)
        ctx_BSD, cross_kv = self._text(shot, cond)
        mask = None if cond.mask_BS is None else cond.mask_BS.to(x_BCFHW.device)
        out_BLP = self._run_model(
            model.patchify(x_BCFHW),
            t_BL,
            meta,
            attn,
            context_BSD=ctx_BSD,
            context_mask_BS=mask,
            cross_kv=cross_kv,
        )
        return model.unpatchify(out_BLP, f, h, w).float()

    def _run_model(self, x_BLP, t_BL, meta: TokenMeta, attn: AttentionContext, **kw) -> torch.Tensor:
        """The model on one chunk's tokens [B, L, P] -> [B, L, P]: here all of them in one process;
        the multi-rank sampler (parallel_sample.UlyssesSampler) runs this rank's share and gathers."""
        if not self.config.compile:
            return self.model(x_BLP, t_BL, None, meta=meta, attn=attn, **kw)
        # each attention core's integer `layer_idx` is an input, not a constant to guard per layer
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return self.compiled_forward()(x_BLP, t_BL, None, meta=meta, attn=attn, **kw)

    # ---- one chunk -----------------------------------------------------------------------------
    @staticmethod
    def _noise(gens: Sequence[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
        return torch.cat([torch.randn(shape, generator=g, device=g.device).to(device) for g in gens])

    def denoise_chunk(
        self, meta, shot, cond, cache, gens, shape, *, grad_exit: int | None = None, with_grad: bool = False,
        trace: bool = False, image_BCHW: torch.Tensor | None = None, renoise: bool = False,
    ) -> tuple[torch.Tensor, list[dict] | None]:  # fmt: skip
        """Few-step denoising of one chunk; returns its x0 [B, C, F, H, W] (and the step trace).
        `image_BCHW`: I2V, latent frame 0 pinned to it at timestep 0 in every pass and step.
        `renoise` (Self-Forcing++'s backward noise initialisation): the chunk is first generated
        with the whole schedule (no graph), x_roll, then re-noised to the exit step's sigma s_k,
        x = (1 - s_k) x_roll + s_k eps (eps the samples' next draws), and one pass at s_k (with the
        graph when `with_grad`) gives x0."""
        sigmas = self.config.sigmas()
        last = len(sigmas) - 1 if grad_exit is None else grad_exit
        if renoise:
            if image_BCHW is not None or trace:
                raise ValueError("renoise does not combine with an image latent or a trace")
            with torch.no_grad():
                x_roll, _ = self.denoise_chunk(meta, shot, cond, cache, gens, shape)
            s = sigmas[last]
            x = (1 - s) * x_roll + s * self._noise(gens, shape, self.device)
            with torch.set_grad_enabled(with_grad):
                return x - s * self._forward(x, s * NUM_TRAIN_TIMESTEPS, meta, shot, cond, cache), None
        steps: list[dict] | None = [] if trace else None
        x = self._noise(gens, shape, self.device)  # pure noise, whatever the first timestep
        pin = None if image_BCHW is None else image_BCHW.to(self.device, x.dtype)[:, :, None]
        if pin is not None:
            x = _pin_first(x, pin)
        x0 = x
        for i, s in enumerate(sigmas[: last + 1]):
            grad = with_grad and i == last
            t = s * NUM_TRAIN_TIMESTEPS
            if pin is not None:  # per-frame timesteps: the image frame at 0
                t = torch.full((x.shape[0], x.shape[2]), t, device=self.device)
                t[:, 0] = 0.0
            with torch.set_grad_enabled(grad):
                v = self._forward(x, t, meta, shot, cond, cache)
                x0 = x - s * v
                if pin is not None:
                    x0 = _pin_first(x0, pin)  # the image frame's x0 is the image, bit-exactly
            if steps is not None:
                steps.append({"t": s * NUM_TRAIN_TIMESTEPS, "x_t": x.detach(), "v": v.detach()})
                if pin is not None:
                    steps[-1]["t_F"] = t.detach().cpu()
            if i == last:
                break
            s_next = sigmas[i + 1]
            if self.config.update == "x0":
                x = (1 - s_next) * x0.detach() + s_next * self._noise(gens, shape, self.device)
            else:
                x = x + (s_next - s) * v.detach()
            if pin is not None:
                x = _pin_first(x, pin)
        return x0, steps

    # ---- the chunk loop ------------------------------------------------------------------------
    def stream(
        self,
        conds: Sequence[Conditioning],
        chunks_per_shot: Sequence[int],
        latent_hw: tuple[int, int],
        seeds: Sequence[int],
        *,
        grad_exit: int | Sequence[int] | None = None,
        grad_chunks: Sequence[int] | None = None,
        trace: bool = False,
        prefix_latents: torch.Tensor | None = None,
        stop_after: int | None = None,
        renoise_chunks: Collection[int] = (),
    ) -> Iterator[ChunkOut]:
        """Yield each chunk's clean latents as soon as they exist (the one chunk loop).

        conds: one Conditioning per shot ([B, S, T], row b = sample b's prompt for that shot).
        chunks_per_shot: chunks of each shot. seeds: one per sample (B = len(seeds)).
        grad_exit: stop each chunk's denoising at this step index (an int for every chunk, or one
        per chunk) and keep the graph of that x0 prediction (for the chunks in `grad_chunks`,
        default all); None = inference.
        prefix_latents: continuation, [B, C, k*frames_per_chunk, H, W] clean latents of the first
        k chunks (k < all chunks): cached by clean passes and yielded as given (`ChunkOut.prefix`).
        conds[0].image_latent: image-to-video (see the module docstring); not with a prefix.
        stop_after: generate only the first `stop_after` chunks of the video (its shots and
        exits laid out as for all of them): DMD's long rollouts stop after their last window.
        renoise_chunks: chunks denoised with backward noise initialisation (`denoise_chunk`).
        """
        cfg, model = self.config, self.model
        shots = shot_of_chunks(chunks_per_shot)
        if len(conds) != len(chunks_per_shot):
            raise ValueError(f"{len(conds)} conditionings for {len(chunks_per_shot)} shots")
        exits = self._exits(grad_exit, len(shots))
        h, w = latent_hw
        if h % 2 or w % 2:
            raise ValueError(f"latent height and width must be even (patch 1x2x2), got {h}x{w}")
        for cond in conds:
            if cond.context_BST.shape[0] != len(seeds):
                raise ValueError(f"context batch {cond.context_BST.shape[0]} != {len(seeds)} seeds")
        self._text_cache = {}
        gens = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        c, hp, wp = cfg.frames_per_chunk, h // 2, w // 2
        cache = self.new_cache(hp * wp)
        shape = (1, model.cfg.in_channels, c, h, w)
        n_prefix = self._check_prefix(prefix_latents, len(shots), (len(seeds), shape[1], h, w))
        image = conds[0].image_latent
        if image is not None:
            want = (len(seeds), shape[1], h, w)
            if tuple(image.shape) != want:
                raise ValueError(f"image_latent must be [B, C, H, W] = {list(want)}, got {list(image.shape)}")
            if n_prefix:
                raise ValueError(
                    "image_latent and prefix_latents exclude each other (a prefix has its first frame)"
                )
        stop = len(shots) if stop_after is None else stop_after
        if not 0 < stop <= len(shots):
            raise ValueError(
                f"stop_after must be in [1, {len(shots)}] (the video's chunks), got {stop_after}"
            )
        kept: dict[int, tuple[torch.Tensor, TokenMeta]] = {}  # clean latents for LongLive re-cache
        for idx, shot in enumerate(shots[:stop]):
            sync(self.device)
            start = time.perf_counter()
            meta = grid_meta(
                c, hp, wp, c, frame_offset=idx * c, shot=shot, rope_offset=shot * cfg.shot_rope_offset,
                device=self.device,
            )  # fmt: skip
            if cfg.recache_on_cut and idx > 0 and shot != shots[idx - 1]:
                self._recache(cache, kept, shots, shot, conds[shot])
            cache.begin(idx, shot, write=False)
            kv_bytes = cache.nbytes()
            if idx < n_prefix:  # continuation: the given chunk's clean pass writes its K/V
                x0 = prefix_latents[:, :, idx * c : (idx + 1) * c].to(self.device, torch.float32)
                cache.begin(idx, shot, write=True)
                with torch.no_grad():
                    self._forward(x0, 0.0, meta, shot, conds[shot], cache)
                if cfg.recache_on_cut:
                    kept[idx] = (x0, meta)
                    kept = {j: kept[j] for j in [*cache.chunks, idx] if j in kept}
                sync(self.device)
                yield ChunkOut(idx, shot, x0, start, time.perf_counter(), kv_bytes, None, prefix=True)
                continue
            with_grad = exits is not None and (grad_chunks is None or idx in grad_chunks)
            with torch.no_grad():
                x0, steps = self.denoise_chunk(
                    meta, shot, conds[shot], cache, gens, shape, grad_exit=None if exits is None else exits[idx],
                    with_grad=with_grad, trace=trace, image_BCHW=image if idx == 0 else None,
                    renoise=idx in renoise_chunks,
                )  # fmt: skip
                if idx + 1 < stop:  # the clean pass at t=0 writes this chunk's K/V
                    cache.begin(idx, shot, write=True)
                    self._forward(x0.detach(), 0.0, meta, shot, conds[shot], cache)
            if cfg.recache_on_cut:
                kept[idx] = (x0.detach(), meta)
                kept = {j: kept[j] for j in [*cache.chunks, idx] if j in kept}
            sync(self.device)
            yield ChunkOut(idx, shot, x0, start, time.perf_counter(), kv_bytes, steps)

    def _check_prefix(self, prefix: torch.Tensor | None, num_chunks: int, bchw: tuple[int, ...]) -> int:
        """Chunks of a continuation prefix (0: none): whole chunks, fewer than the video's."""
        if prefix is None:
            return 0
        c = self.config.frames_per_chunk
        b, ch, h, w = bchw
        f = prefix.shape[2] if prefix.dim() == 5 else 0
        if (
            prefix.dim() != 5
            or (prefix.shape[0], prefix.shape[1], *prefix.shape[3:]) != (b, ch, h, w)
            or f % c
        ):
            raise ValueError(
                f"prefix_latents must be [B, C, k*{c}, H, W] with [B, C, H, W] = {[b, ch, h, w]}, "
                f"got {list(prefix.shape)}"
            )
        if not 0 < f // c < num_chunks:
            raise ValueError(
                f"a prefix of {f // c} chunk(s) needs 1 <= k < {num_chunks} (the video's chunks)"
            )
        return f // c

    def _exits(self, grad_exit: int | Sequence[int] | None, num_chunks: int) -> list[int] | None:
        """Per-chunk exit step indices (None: inference, every step of every chunk)."""
        if grad_exit is None:
            return None
        exits = [grad_exit] * num_chunks if isinstance(grad_exit, int) else [int(k) for k in grad_exit]
        n = len(self.config.timesteps)
        if len(exits) != num_chunks or any(not 0 <= k < n for k in exits):
            raise ValueError(
                f"grad_exit must be one step index in [0, {n}) or one per chunk ({num_chunks}), got {grad_exit}"
            )
        return exits

    def _recache(self, cache: KVCache, kept: dict, shots: list[int], shot: int, cond: Conditioning) -> None:
        """LongLive: recompute the kept chunks' K/V under the new shot's prompt, oldest first."""
        chunks = cache.chunks
        cache.clear()
        for j in chunks:
            x0, meta = kept[j]
            cache.begin(j, shots[j], write=True)
            with torch.no_grad():
                self._forward(x0, 0.0, meta, shot, cond, cache)

    def generate_latents(
        self,
        conds: Conditioning | Sequence[Conditioning],
        chunks_per_shot: int | Sequence[int],
        latent_hw: tuple[int, int],
        seeds: Sequence[int],
        **kw,
    ) -> SampleResult:
        """Run the whole chunk loop; latents [B, C, F, H, W] (F = chunks * frames_per_chunk)."""
        if isinstance(conds, Conditioning):
            conds = [conds]
        if isinstance(chunks_per_shot, int):
            chunks_per_shot = [chunks_per_shot]
        chunks = list(self.stream(conds, chunks_per_shot, latent_hw, seeds, **kw))
        return SampleResult(torch.cat([ch.x0_BCFHW for ch in chunks], dim=2), chunks)


class _HistoryAsRead:
    """A KV hook for one pass with gradients: the first call per layer goes to the cache, and
    keeps (a copy of) the history it returned; a second call for that layer (activation
    checkpointing recomputing the layer in the backward, when later chunks have grown or
    overwritten the cache in place) gets that same history before its own K/V, and writes
    nothing. The history carries no gradient (the cache stores detached K/V), so the backward is
    the one of the forward that ran."""

    def __init__(self, hook) -> None:
        self.hook = hook
        self.history: dict[int, tuple[torch.Tensor, torch.Tensor, object]] = {}

    def __call__(self, layer_idx: int, q_BHLD, k_BHLD, v_BHLD, ctx) -> tuple:
        kept = self.history.get(layer_idx)
        if kept is not None:
            hk, hv, mask = kept
            return torch.cat([hk, k_BHLD], dim=2), torch.cat([hv, v_BHLD], dim=2), mask
        k_out, v_out, mask = self.hook(layer_idx, q_BHLD, k_BHLD, v_BHLD, ctx)
        n = k_out.shape[2] - k_BHLD.shape[2]  # [history | this chunk's] along L
        self.history[layer_idx] = (
            k_out[:, :, :n].detach().clone(), v_out[:, :, :n].detach().clone(), mask
        )  # fmt: skip
        return k_out, v_out, mask


class _EagerHook:
    """A KV hook that torch.compile runs eagerly (a graph break at the call): the cache keeps its
    bookkeeping in Python, and no argument (the layer index, the cache) is traced or guarded,
    so neither another layer nor a new cache per video compiles anything again."""

    def __init__(self, hook) -> None:
        self.hook = hook

    @torch.compiler.disable
    def __call__(self, layer_idx: int, q_BHLD, k_BHLD, v_BHLD, ctx) -> tuple:
        return self.hook(layer_idx, q_BHLD, k_BHLD, v_BHLD, ctx)


def _pin_first(x_BCFHW: torch.Tensor, first_BC1HW: torch.Tensor) -> torch.Tensor:
    """`x` with latent frame 0 replaced by `first` (I2V's image latent)."""
    return torch.cat([first_BC1HW, x_BCFHW[:, :, 1:]], dim=2)


def sync(device: torch.device) -> None:
    """Wait for this thread's stream only (a side decode stream keeps running)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
