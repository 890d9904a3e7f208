"""gpu_figures.json and the closing summary of bench/gpu_suite.sh, from what its stages left.

    python bench/suite_report.py WORK OUT [--smoke] [--summary]

WORK holds the stages' files: status/NN_<stage>.json (run order), env.json, provenance.json,
peaks.json, nvfp4.json, sample.json, train.json, sample5b.json, train5b.json (the same two benches at
the 5B's shape), fp8.json, compile.json, dmd_memory.json, pytest.xml. Each is read on
its own and each figure section is built on its own: a missing, partial or malformed file costs
its own section (named under `figures.errors`), never another's, and the JSON is written through
a rename, so a kill mid-write leaves the previous one. `--summary` prints the figures with their
anchors (published figures to compare with, and this device's measured and datasheet peaks) in
well under the 12,000 characters a device run's reply keeps. Reads JSON only: no torch import.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

from bench_common import write_json

ANCHOR_FPS = "LongLive 20.7 FPS, Self-Forcing 17 FPS"  # published: 1.3B streaming samplers, one H100
ANCHOR_MFU = "torchtitan 33-39% MFU"  # published: bf16 training on H100s
ANCHOR_DMD = "LongLive 0.69x (NVFP4+LoRA)"
ANCHOR_DEQ = "FlashInfer KV dequant ~65% of HBM peak"
MAX_LINE, MAX_SUMMARY = 220, 8000


def _load(work: str, name: str):
    with open(os.path.join(work, name)) as f:
        return json.load(f)


def _ratio(x, peak):
    return x / peak if x is not None and peak else None


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _peaks(work: str) -> dict:
    r = _load(work, "peaks.json")
    d = r.get("datasheet") or {}
    return {
        "device": r["device"],
        "gemm_flops": r["gemm_flops"],
        "gemm_dtype": r["method"]["gemm_dtype"],
        "copy_bytes_per_s": r["copy_bytes_per_s"],
        "datasheet_bf16_flops": d.get("bf16_flops"),
        "datasheet_hbm_bytes_per_s": d.get("hbm_bytes_per_s"),
    }


def _nvfp4(work: str, peaks: dict | None) -> tuple[dict, dict]:
    r = _load(work, "nvfp4.json")
    copy = (peaks or {}).get("copy_bytes_per_s")
    sheet = r.get("hbm_peak_datasheet_bytes_per_s")
    ops = {}
    for x in r.get("rows", []):
        gbs = x.get("GB_per_s")
        b = None if gbs is None else gbs * 1e9
        ops[x["op"]] = {"GB_per_s": gbs, "bytes_per_element": x.get("bytes_per_element"),
                        "of_datasheet_hbm": _ratio(b, sheet), "of_measured_copy": _ratio(b, copy),
                        "error": x.get("error")}  # fmt: skip
    if r.get("error"):
        ops["(setup)"] = {"GB_per_s": None, "error": r["error"]}
    return r, ops


def _sample(work: str, name: str = "sample.json") -> tuple[dict, dict]:
    r = _load(work, name)
    s = r.get("summary", {})
    keys = (
        "fps_end_to_end",
        "first_chunk_latency_s",
        "peak_memory_bytes",
        "kv_cache_bytes",
        "async_over_sync_fps",
    )
    return r, {
        "shape": {k: s.get(k) for k in ("flavor", "vae", "height", "width", "chunks", "window_frames", "sink_frames")},
        "kv_bytes_ratio_nvfp4_over_bf16": s.get("kv_bytes_ratio_nvfp4_over_bf16"),
        "latent_rel_l2_nvfp4_vs_bf16": s.get("latent_rel_l2_nvfp4_vs_bf16"),
        "kv_bytes_ratio_over_bf16": s.get("kv_bytes_ratio_over_bf16") or {},
        "latent_rel_l2_vs_bf16": s.get("latent_rel_l2_vs_bf16") or {},
        "anchors": ANCHOR_FPS,
        "rows": [{"kv_cache": x.get("kv_cache"), "decode": x.get("decode"), "error": x.get("error"),
                  **{k: x.get(k) for k in keys}} for x in r.get("rows", [])],
    }  # fmt: skip


def _train(work: str, peaks: dict | None, name: str = "train.json") -> tuple[dict, dict]:
    r = _load(work, name)
    measured = (peaks or {}).get("gemm_flops")
    rows = []
    for x in r.get("rows", []):
        tf = x.get("tflops_per_s")
        rows.append({"act_ckpt": x.get("checkpointing"), "error": x.get("error"),
                     **{k: x.get(k) for k in ("step_s", "mask_build_s", "tokens_per_s", "tflops_per_s",
                                              "peak_memory_bytes", "precision")},
                     "mfu_datasheet": x.get("mfu"),
                     "mfu_measured_peak": _ratio(None if tf is None else tf * 1e12, measured)})  # fmt: skip
    c = r.get("config", {})
    return r, {
        "device": r.get("device"),
        "shape": {k: c.get(k) for k in ("flavor", "height", "width", "frames", "frames_per_chunk")},
        "seq_len": r.get("seq_len"),
        "model_tflop_per_step": r["flops_per_step"]["total"] / 1e12,
        "peak_bf16_flops_datasheet": r.get("peak_bf16_flops"),
        "peak_bf16_flops_measured": measured,
        "anchors": ANCHOR_MFU,
        "rows": rows,
    }


def _fp8(work: str, peaks: dict | None) -> tuple[dict, dict]:
    r = _load(work, "fp8.json")
    measured = (peaks or {}).get("gemm_flops")
    shapes: dict = {}
    for x in r.get("rows", []):
        tf = x.get("tflops")
        shapes.setdefault(x["shape"], {})[x["kind"]] = {
            "error": x.get("error"), "tflops": tf, "tflops_incl_cast": x.get("tflops_incl_cast"),
            "cast_s": x.get("cast_s"), "speedup_over_bf16": x.get("speedup_over_bf16"),
            "speedup_incl_cast": x.get("speedup_incl_cast"),
            "of_measured_bf16_peak": _ratio(None if tf is None else tf * 1e12, measured)}  # fmt: skip
    return r, {"tokens": r.get("tokens"), "fp8_supported": r.get("fp8_supported"), "shapes": shapes}


def _compile(work: str) -> tuple[dict, dict]:
    r = _load(work, "compile.json")
    s = r.get("summary", {})
    keys = ("fps_end_to_end", "first_chunk_latency_s", "cold_first_chunk_latency_s", "steady_chunk_s",
            "peak_memory_bytes")  # fmt: skip
    return r, {
        "shape": {k: s.get(k) for k in ("flavor", "vae", "height", "width", "chunks")},
        "compiled_over_eager_fps": s.get("compiled_over_eager_fps"),
        "rows": [{"mode": "compile" if x.get("compile") else "eager", "kv_cache": x.get("kv_cache"),
                  "decode": x.get("decode"), "error": x.get("error"), **{k: x.get(k) for k in keys}}
                 for x in r.get("rows", [])],
    }  # fmt: skip


def _pytest(work: str) -> dict:
    t = ET.parse(os.path.join(work, "pytest.xml")).getroot()
    t = t if t.tag == "testsuite" else t.find("testsuite")
    out = {k: int(t.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["failed"] = [
        f"{c.get('classname', '')}::{c.get('name', '')}"
        for c in t.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return out


def _dmd(work: str) -> tuple[dict, dict]:
    r = _load(work, "dmd_memory.json")
    return r, {
        "lora_over_full_peak": r.get("lora_over_full_peak"),
        "lora_peak_bytes": r.get("lora", {}).get("peak_bytes"),
        "full_peak_bytes": r.get("full", {}).get("peak_bytes"),
        "errors": {v: r[v]["error"] for v in ("lora", "full") if "error" in r.get(v, {})},
        "anchors": ANCHOR_DMD,
    }


def collect(work: str, smoke: bool) -> dict:
    stages = {}
    for p in sorted(glob.glob(os.path.join(work, "status", "*.json"))):
        try:
            with open(p) as f:
                s = json.load(f)
            stages[s["stage"]] = s
        except (OSError, ValueError, KeyError):
            continue
    figs: dict = {"errors": {}}
    raw: dict = {}
    present = set(os.listdir(work))

    def section(name: str, fn, needs: str):
        if needs not in present:
            return None
        try:
            return fn()
        except Exception as e:  # one bad file costs its own section only
            figs["errors"][name] = f"{type(e).__name__}: {e}"[:300]
            return None

    env = section("env", lambda: _load(work, "env.json"), "env.json")
    prov = section("provenance", lambda: _load(work, "provenance.json"), "provenance.json")
    peaks = section("peaks", lambda: _peaks(work), "peaks.json")
    if peaks:
        figs["peaks"] = peaks
    for name, fn, needs in (
        ("nvfp4", lambda: _nvfp4(work, peaks), "nvfp4.json"),
        ("sample", lambda: _sample(work), "sample.json"),
        ("train", lambda: _train(work, peaks), "train.json"),
        ("sample5b", lambda: _sample(work, "sample5b.json"), "sample5b.json"),
        ("train5b", lambda: _train(work, peaks, "train5b.json"), "train5b.json"),
        ("fp8", lambda: _fp8(work, peaks), "fp8.json"),
        ("compile", lambda: _compile(work), "compile.json"),
        ("dmd_memory", lambda: _dmd(work), "dmd_memory.json"),
    ):
        got = section(name, fn, needs)
        if got is not None:
            raw[name], figs[name] = got
    if (p := section("pytest_gpu", lambda: _pytest(work), "pytest.xml")) is not None:
        figs["pytest_gpu"] = p
    return {"env": env, "provenance": prov, "cpu_smoke": smoke, "stages": stages, "figures": figs, "raw": raw}


def _fmt(x, spec: str, scale: float = 1.0, none: str = "n/a") -> str:
    return none if x is None else format(x / scale, spec)


def summary(res: dict, out_path: str = "") -> str:
    env, prov, figs = res.get("env") or {}, res.get("provenance") or {}, res.get("figures") or {}
    lines = [
        f"== gpu_suite summary: {env.get('device', '?')}, torch {env.get('torch', '?')}, "
        f"triton {env.get('triton', '?')}, python {env.get('python', '?')}, smoke={res.get('cpu_smoke')} ==",
        f"code: commit {prov.get('commit') or 'n/a'}{' (dirty)' if prov.get('dirty') else ''}, "
        f"tree {prov.get('tree_hash', '?')} ({prov.get('tree_hash_method', '?')})",
        "stages: "
        + " | ".join(f"{n} {s['status']} {s['seconds']}s" for n, s in (res.get("stages") or {}).items()),
    ]

    def peaks_lines(pk):
        lines.append(
            f"peaks measured: {pk['gemm_dtype']} GEMM {_fmt(pk['gemm_flops'], '.4g', 1e12)} TFLOP/s, "
            f"copy {_fmt(pk['copy_bytes_per_s'], '.0f', 1e9)} GB/s | datasheet: "
            f"{_fmt(pk['datasheet_bf16_flops'], '.0f', 1e12)} TFLOP/s, {_fmt(pk['datasheet_hbm_bytes_per_s'], '.0f', 1e9)} GB/s"
        )

    def sample_lines(s, label="sample"):
        sh = s["shape"]
        ratios = s.get("kv_bytes_ratio_over_bf16") or {"nvfp4": s["kv_bytes_ratio_nvfp4_over_bf16"]}
        rel = s.get("latent_rel_l2_vs_bf16") or {"nvfp4": s["latent_rel_l2_nvfp4_vs_bf16"]}
        vs = ", ".join(
            f"{kv} {_fmt(q, '.3f')} of the bytes, latent rel L2 {_fmt(rel.get(kv), '.2g')}"
            for kv, q in ratios.items()
        )
        lines.append(
            f"{label}: {sh['flavor']} + {sh['vae']} VAE, {sh['height']}x{sh['width']}, {sh['chunks']} chunks, window "
            f"{sh['window_frames']} + sink {sh['sink_frames']}; KV vs bf16: {vs or 'n/a'}"
        )
        for x in s["rows"]:
            head = f"  kv={x['kv_cache']:<5} decode={x['decode']:<5}:"
            if x.get("error"):
                lines.append(f"{head} FAILED {x['error']}")
            else:
                lines.append(
                    f"{head} {x['fps_end_to_end']:.2f} frames/s end to end (anchor: {ANCHOR_FPS}), first chunk "
                    f"{x['first_chunk_latency_s']:.2f} s, peak {_fmt(x['peak_memory_bytes'], '.2f', 2**30)} GiB"
                )

    def nvfp4_lines(n):
        for op, x in n.items():
            if x.get("error"):
                lines.append(f"nvfp4 {op}: FAILED {x['error']}")
            else:
                lines.append(
                    f"nvfp4 {op}: {x['GB_per_s']:.1f} GB/s ({x['bytes_per_element']} B/elem); of measured copy "
                    f"{_pct(x['of_measured_copy'])}, of datasheet HBM {_pct(x['of_datasheet_hbm'])}"
                    + (f" (anchor: {ANCHOR_DEQ})" if "dequant" in op else "")
                )

    def train_lines(t, label="train"):
        sh = t["shape"]
        lines.append(
            f"{label}: {sh['flavor']}, {sh['height']}x{sh['width']}, {sh['frames']} latent frames, chunk "
            f"{sh['frames_per_chunk']}, {t['seq_len']:,} tokens, {t['model_tflop_per_step']:.4g} TFLOP/step"
        )
        for x in t["rows"]:
            head = f"  act-ckpt {'on ' if x['act_ckpt'] else 'off'}:"
            if x.get("error"):
                lines.append(f"{head} {x['error']}")
            else:
                lines.append(
                    f"{head} step {x['step_s']:.3f} s (mask {x['mask_build_s']:.3f}), {x['tokens_per_s']:,.0f} tok/s, "
                    f"{x['tflops_per_s']:.4g} TFLOP/s, MFU {_pct(x['mfu_datasheet'])} of datasheet / "
                    f"{_pct(x['mfu_measured_peak'])} of measured GEMM (anchor: {ANCHOR_MFU}), "
                    f"peak {_fmt(x['peak_memory_bytes'], '.1f', 2**30)} GiB, {x['precision']}"
                )

    def fp8_lines(f):
        lines.append(
            f"fp8 GEMM (_scaled_mm, e4m3, out bf16) vs bf16, M={f['tokens']} tokens; TFLOP/s (x bf16; incl. input cast):"
        )
        for shape, kinds in f["shapes"].items():
            parts = []
            for kind, x in kinds.items():
                if x.get("error"):
                    skipped = x["error"].startswith("skipped")
                    parts.append(f"{kind} {'' if skipped else 'FAILED '}{x['error'][:70]}")
                elif kind == "bf16":
                    parts.append(
                        f"bf16 {x['tflops']:.4g} ({_pct(x['of_measured_bf16_peak'])} of measured peak)"
                    )
                else:
                    parts.append(f"{kind} {x['tflops']:.4g} ({_fmt(x['speedup_over_bf16'], '.2f')}x; "
                                 f"{_fmt(x['tflops_incl_cast'], '.4g')}, {_fmt(x['speedup_incl_cast'], '.2f')}x)")  # fmt: skip
            lines.append(f"  {shape}: " + " | ".join(parts))

    def compile_lines(c):
        sh = c["shape"]
        ratio = (
            ", ".join(f"{k} {v:.2f}x" for k, v in (c.get("compiled_over_eager_fps") or {}).items()) or "n/a"
        )
        lines.append(f"compile: {sh['flavor']} + {sh['vae']} VAE, {sh['height']}x{sh['width']}, {sh['chunks']} chunks; "
                     f"compiled/eager frames/s {ratio}")  # fmt: skip
        for x in c["rows"]:
            head = f"  {x['mode']:<7} kv={x['kv_cache']} decode={x['decode']}:"
            if x.get("error"):
                lines.append(f"{head} FAILED {x['error']}")
            else:
                lines.append(
                    f"{head} {x['fps_end_to_end']:.2f} frames/s, steady chunk {_fmt(x['steady_chunk_s'], '.3f')} s, "
                    f"cold first chunk {_fmt(x['cold_first_chunk_latency_s'], '.2f')} s"
                    f"{' (compile incl.)' if x['mode'] == 'compile' else ''}, "
                    f"warm first chunk {_fmt(x['first_chunk_latency_s'], '.2f')} s"
                )

    def pytest_lines(p):
        lines.append(
            f"pytest -m gpu: {p['tests']} tests, {p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped"
        )
        lines.extend(f"  FAILED {f}" for f in p["failed"][:10])

    def dmd_lines(d):
        lines.append(
            f"dmd_memory: lora/full peak {_fmt(d['lora_over_full_peak'], '.2f')}x (anchor: {ANCHOR_DMD})"
        )
        lines.extend(f"  {v}: {e}" for v, e in d["errors"].items())

    for name, fn in (("peaks", peaks_lines), ("sample", sample_lines), ("nvfp4", nvfp4_lines),
                     ("train", train_lines), ("sample5b", sample_lines), ("train5b", train_lines),
                     ("fp8", fp8_lines), ("compile", compile_lines),
                     ("pytest_gpu", pytest_lines), ("dmd_memory", dmd_lines)):  # fmt: skip
        if figs.get(name):
            try:
                fn(figs[name], name) if name in ("sample5b", "train5b") else fn(figs[name])
            except Exception as e:  # a figure of an unexpected shape costs its own lines
                lines.append(f"({name}: cannot print: {type(e).__name__}: {e})")
    for name, e in figs.get("errors", {}).items():
        lines.append(f"(section {name} unreadable: {e})")
    if out_path:
        lines.append(f"JSON: {out_path}")
    lines = [ln if len(ln) <= MAX_LINE else ln[: MAX_LINE - 3] + "..." for ln in lines]
    text = "\n".join(lines)
    if len(text) > MAX_SUMMARY:
        text = text[: MAX_SUMMARY - 40] + "\n... (summary cut; see the JSON)"
    return text


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    flags = {a for a in args if a.startswith("--")}
    work, out = (a for a in args if not a.startswith("--"))
    res = collect(work, "--smoke" in flags)
    path = os.path.join(out, "gpu_figures.json")
    write_json(path, res)
    if "--summary" in flags:
        print("\n" + summary(res, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
