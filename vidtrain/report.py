"""A Markdown report of a pipeline run folder: what ran, where each artefact is, the plots."""

from __future__ import annotations

import json
from pathlib import Path


def plot_kv_bytes(metrics_json: Path, out_png: Path) -> Path | None:
    """KV-cache bytes per generated chunk (flat once the window fills: constant memory)."""
    if not metrics_json.exists():
        return None
    rows = json.loads(metrics_json.read_text()).get("timeline", [])
    if not rows or "kv_bytes" not in rows[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([r.get("chunk", i) for i, r in enumerate(rows)], [r["kv_bytes"] / 1024 for r in rows], marker="o")
    ax.set_xlabel("chunk")
    ax.set_ylabel("KV cache (KiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _last_metrics(run: Path) -> dict:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def _img(out: Path, path: Path, title: str) -> str:
    return f"### {title}\n\n![{title}]({path.relative_to(out)})\n" if path.exists() else ""


def write_report(out: Path, seconds: dict[str, float]) -> Path:
    """`out/report.md` with the stage table, the figures, and links to every artefact."""
    lines = ["# vidtrain pipeline report", "", "| stage | seconds | last metrics |", "|---|---:|---|"]
    run_of = {"train": "tf", "qat": "qat", "dmd": "dmd"}
    for stage, secs in seconds.items():
        m = _last_metrics(out / run_of[stage]) if stage in run_of else {}
        shown = ", ".join(
            f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float) and k in ("loss", "samples_per_s")
        )
        lines.append(f"| {stage} | {secs:.1f} | {shown} |")
    video = out / "video.mp4"
    metrics = out / "video.metrics.json"
    lines += ["", "## Video", ""]
    if video.exists():
        lines.append("[video.mp4](video.mp4) — metrics in [video.metrics.json](video.metrics.json)")
    if metrics.exists():
        m = json.loads(metrics.read_text())
        for key in ("fps_end_to_end", "first_chunk_latency_s", "peak_memory_bytes", "kv_cache_bytes"):
            if key in m:
                lines.append(f"- `{key}`: {m[key]:.4g}")
    kv_png = plot_kv_bytes(metrics, out / "kv_bytes.png")
    lines += ["", "## Figures", ""]
    for run in ("tf", "qat", "dmd"):
        lines.append(_img(out, out / run / "loss.png", f"{run}: loss"))
    lines.append(_img(out, out / "tf" / "balance.png", "teacher forcing: per-rank balance"))
    if kv_png:
        lines.append(_img(out, kv_png, "KV cache bytes over time"))
    lines.append(_img(out, out / "video.timeline.png", "generation and decoding timeline"))
    lines += ["", "## Artefacts", ""]
    for name, rel in (
        ("video shards", "video_shards/manifest.json"), ("latent shards", "latent_shards/manifest.json"),
        ("teacher forcing run", "tf"), ("QAT run", "qat"), ("DMD run", "dmd"), ("DMD LoRA", "dmd/lora"),
        ("logs", "logs"),
    ):  # fmt: skip
        if (out / rel).exists():
            lines.append(f"- {name}: `{out / rel}`")
    path = out / "report.md"
    path.write_text("\n".join(ln for ln in lines if ln is not None) + "\n")
    return path
