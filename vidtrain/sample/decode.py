"""VAE decode beside generation, the per-chunk timeline, the mp4 writer and the metrics.

Async decode: a worker thread owns the streaming VAE decoder; the chunk loop hands it each
chunk's latents and goes on with the next chunk. On CUDA the worker runs on a side stream that
first waits on an event recorded after the chunk's latents were produced. The decoder sees the
same latents in the same order either way, so async frames equal sync frames (tested).

Each chunk is one decoder call, run as one pass over all its latent frames with the causal caches
carried from the previous chunk (split only where memory is short: `latents_per_pass="auto"`);
this equals Wan's one-latent-frame-at-a-time schedule (tests/test_vae_chunkwise.py) and is several
times faster on CPU.

The VAE may sit on another device than the DiT (`vidtrain sample --decode-device`: a second GPU,
or the CPU): each chunk's latents move to it when submitted, and the decoder works there, beside
generation; on a multi-rank run rank 0 decodes while all ranks generate.

Legend: B batch, C channels, T pixel frames, F latent frames, H/W height/width.
"""

from __future__ import annotations

import json
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vidtrain.utils.progress import StepProgress

DECODE_MODES = ("sync", "async")


def to_uint8_frames(x_BCTHW: torch.Tensor, sample: int = 0):
    """Pixels in [-1, 1] -> numpy uint8 [T, H, W, 3] of one sample."""
    x = ((x_BCTHW[sample].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


class VideoWriter:
    """mp4 (libx264, yuv420p) through imageio-ffmpeg; frames appended as they are decoded."""

    def __init__(self, path: str | Path, fps: float) -> None:
        import imageio.v2 as imageio

        self.frames = 0
        self._w = imageio.get_writer(
            str(path), fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=16, quality=8
        )

    def __call__(self, x_BCTHW: torch.Tensor) -> None:
        for frame in to_uint8_frames(x_BCTHW):
            self._w.append_data(frame)
            self.frames += 1

    def close(self) -> None:
        self._w.close()


class ChunkDecoder:
    """Feeds latent chunks to a streaming VAE decoder, in this thread (sync) or a worker (async).

    `sink(frames_BCTHW)` receives each chunk's pixel frames in order; `times[i]` holds the
    decode start/end (perf_counter seconds) of chunk i. `latents_per_pass`: see
    `CausalVideoVAE.stream_decoder` ("auto": the whole chunk in one pass when it fits in memory).
    """

    def __init__(
        self,
        vae,
        mode: str,
        sink: Callable[[torch.Tensor], None],
        latents_per_pass: int | str | None = "auto",
    ) -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {mode!r}; known: {', '.join(DECODE_MODES)}")
        self.vae, self.mode, self.sink = vae, mode, sink
        self.decoder = vae.stream_decoder(latents_per_pass)
        self.times: dict[int, tuple[float, float]] = {}
        self.device = next(vae.parameters()).device
        self._error: BaseException | None = None
        if mode == "async":
            self._q: queue.Queue = queue.Queue()
            self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            self._thread = threading.Thread(target=self._work, name="vae-decode", daemon=True)
            self._thread.start()

    def _decode(self, idx: int, z_BCFHW: torch.Tensor) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            frames = self.decoder.feed(z_BCFHW.to(self.device, next(self.vae.parameters()).dtype))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.sink(frames)
        self.times[idx] = (start, time.perf_counter())

    def _work(self) -> None:
        while (item := self._q.get()) is not None:
            idx, z, event = item
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        self._stream.wait_event(event)
                        z.record_stream(self._stream)
                        self._decode(idx, z)
                else:
                    self._decode(idx, z)
            except BaseException as e:  # re-raised in the caller's thread by close()
                self._error = e
                return

    def submit(self, idx: int, z_BCFHW: torch.Tensor) -> None:
        z = z_BCFHW.detach()
        if self.mode == "sync":
            self._decode(idx, z)
            return
        if self._error is not None:
            raise self._error
        if z.device != self.device:
            # --decode-device: the VAE on another device (a second GPU, the CPU) than the
            # generation; the chunk's latents (small) cross here, in the generating thread, so the
            # worker only ever sees tensors of its own device
            z = z.to(self.device)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._q.put((idx, z, event))

    def close(self) -> None:
        if self.mode == "async":
            self._q.put(None)
            self._thread.join()
            if self._error is not None:
                raise self._error


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated by torch since the last reset; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def stream_video(
    sampler, conds, chunks_per_shot, latent_hw, seeds, vae, decode: str, sink, keep_latents: bool = False,
    progress: bool = False,
) -> dict:  # fmt: skip
    """Generate chunk by chunk, decoding each chunk (sync or async); return metrics + timeline.

    Memory stays constant in video length: decoded chunks go to `sink`, latents are dropped
    unless `keep_latents` (tests, benches) asks for them (then under "_latents"). `progress`:
    one line per ~10% of the chunks generated (a bar on a terminal), with the chunk's generate
    time and the last decode time.
    """
    device = sampler.device
    dec = ChunkDecoder(vae, decode, sink)
    for d in {device, dec.device}:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    t0 = time.perf_counter()
    rows, latents, latent_frames = [], [], 0
    bar = StepProgress(
        sum(chunks_per_shot), 0, "sample", progress, unit="chunk", keys=("generate_s", "decode_s")
    )
    try:
        for ch in sampler.stream(conds, chunks_per_shot, latent_hw, seeds):
            dec.submit(ch.index, ch.x0_BCFHW)
            latent_frames += ch.x0_BCFHW.shape[2]
            if keep_latents:
                latents.append(ch.x0_BCFHW)
            rows.append({"chunk": ch.index, "shot": ch.shot, "gen_start": ch.gen_start, "gen_end": ch.gen_end,
                         "kv_bytes": ch.kv_bytes})  # fmt: skip
            done = list(dec.times.values())  # decodes finished so far (async: may lag)
            figures = {"generate_s": ch.gen_end - ch.gen_start}
            if done:
                figures["decode_s"] = done[-1][1] - done[-1][0]
            bar.update(figures)
    finally:
        dec.close()
        bar.close()
    t_end = time.perf_counter()
    for r in rows:
        r["dec_start"], r["dec_end"] = dec.times[r["chunk"]]
        for k in ("gen_start", "gen_end", "dec_start", "dec_end"):
            r[k] = round(r[k] - t0, 6)
    pixel_frames = 1 + vae.temporal_compression * (latent_frames - 1)
    metrics = {
        "decode": decode,
        "kv_cache": sampler.config.kv_cache,
        "latent_frames": int(latent_frames),
        "pixel_frames": int(pixel_frames),
        "seconds_total": round(t_end - t0, 6),
        "fps_end_to_end": pixel_frames / (t_end - t0),
        "first_chunk_latency_s": rows[0]["dec_end"],
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "kv_cache_bytes": max(r["kv_bytes"] for r in rows),
        "decode_device": str(dec.device),
        "timeline": rows,
    }
    if dec.device != device:  # --decode-device: the decoder's own peak
        metrics["decode_peak_memory_bytes"] = peak_memory_bytes(dec.device)
    if keep_latents:
        metrics["_latents"] = torch.cat(latents, dim=2)
    return metrics


def plot_timeline(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Two lanes (generate, decode), one bar per chunk: overlap shows async decode at work."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 2.6))
    for r in rows:
        color = f"C{r['chunk'] % 10}"
        ax.broken_barh([(r["gen_start"], r["gen_end"] - r["gen_start"])], (10, 8), color=color)
        ax.broken_barh([(r["dec_start"], r["dec_end"] - r["dec_start"])], (0, 8), color=color, alpha=0.7)
        ax.text(r["gen_start"], 19, str(r["chunk"]), fontsize=7)
    ax.set_yticks([4, 14], ["decode", "generate"])
    ax.set_xlabel("seconds since start")
    ax.set_title(title or "per-chunk timeline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_metrics(metrics: dict, path: str | Path) -> None:
    clean = {k: v for k, v in metrics.items() if not k.startswith("_")}
    Path(path).write_text(json.dumps(clean, indent=2) + "\n")
