"""bench/gpu_suite.sh before its one run on a GPU: the report, the provenance, and the smoke mode
under the GPU machine's versions.

The GPU machine runs Python 3.12, torch 2.11.0 and triton 3.6.0, with no DeepSpeed, diffusers,
omegaconf or wandb, and nothing can be installed there. `bench/gpu_env_venv.sh` builds that
software set once in a side venv (~/.cache/vidtrain-gpu-venv; PyPI's CUDA build of torch 2.11.0,
which runs on CPU; about 3 GB downloaded, 5 GB on disk, 1.5-2 minutes), and the slow tests here
run the suite's `--cpu-smoke` mode and the Triton-interpreter kernel tests under it, so an
import or API drift between torch 2.11 and this repo's 2.13 shows up here, not there. They skip,
saying why, only when the venv cannot be built for want of a package index (or when
VIDTRAIN_SKIP_GPU_VENV=1 is set); any other build failure fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import provenance  # noqa: E402
import suite_report  # noqa: E402

GPU_VERSIONS = {"torch": "2.11.0", "triton": "3.6.0"}
ABSENT = ("deepspeed", "diffusers", "omegaconf", "wandb")
REPLY_CHARS = 12_000  # what a device run's reply keeps of the output


# ---- the report: sections stand alone, the summary fits ----------------------------------------


def _write(work: Path, name: str, obj) -> None:
    (work / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _fake_work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "status").mkdir(parents=True)
    for i, name in enumerate(("env", "peaks", "nvfp4", "sample", "train")):
        _write(
            work / "status",
            f"{11 + i}_{name}.json",
            {"stage": name, "status": "ok", "rc": 0, "seconds": 3, "timeout_s": 60},
        )
    _write(
        work,
        "env.json",
        {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.3"},
    )
    _write(
        work,
        "provenance.json",
        {"commit": None, "dirty": None, "tree_hash": "ab" * 20, "tree_hash_method": "file walk"},
    )
    _write(work, "peaks.json", {"device": "NVIDIA H200", "gemm_flops": 800e12, "copy_bytes_per_s": 4.0e12,
                                "method": {"gemm_dtype": "bfloat16"},
                                "datasheet": {"bf16_flops": 989e12, "hbm_bytes_per_s": 4.8e12}})  # fmt: skip
    _write(work, "nvfp4.json", {"hbm_peak_datasheet_bytes_per_s": 4.8e12, "rows": [
        {"op": "dequantize (nvfp4 -> bf16)", "GB_per_s": 2000.0, "bytes_per_element": 2.5625, "error": None},
        {"op": "quantize (bf16 -> nvfp4, amax pass incl.)", "error": "RuntimeError: boom", "bytes_per_element": 4.5625}]})  # fmt: skip
    _write(work, "train.json", {"device": "NVIDIA H200", "config": {"flavor": "1.3B", "height": 480, "width": 832,
            "frames": 21, "frames_per_chunk": 3}, "seq_len": 65520, "flops_per_step": {"total": 1e15},
            "peak_bf16_flops": 989e12, "rows": [
                {"checkpointing": True, "step_s": 4.0, "mask_build_s": 0.1, "tokens_per_s": 16380.0,
                 "tflops_per_s": 250.0, "mfu": 250 / 989, "peak_memory_bytes": 60 * 2**30, "precision": "bf16", "error": None},
                {"checkpointing": False, "error": "out of memory: CUDA out of memory." + " x" * 500}]})  # fmt: skip
    _write(work, "sample.json", '{"summary": {"flavor": "1.3B", "rows": [')  # cut mid-write
    return work


def _fp8_rows(k: int, n: int, rowwise_error: str | None = None) -> list[dict]:
    shape = {"shape": f"{k}->{n}", "M": 32760, "K": k, "N": n}
    rows = [{**shape, "kind": "bf16", "tflops": 600.0, "tflops_incl_cast": 600.0, "cast_s": 0.0,
             "speedup_over_bf16": 1.0, "speedup_incl_cast": 1.0, "error": None},
            {**shape, "kind": "fp8 tensorwise", "tflops": 1200.0, "tflops_incl_cast": 900.0, "cast_s": 1e-4,
             "speedup_over_bf16": 2.0, "speedup_incl_cast": 1.5, "error": None}]  # fmt: skip
    if rowwise_error:
        rows.append({**shape, "kind": "fp8 rowwise", "error": rowwise_error})
    else:
        rows.append({**shape, "kind": "fp8 rowwise", "tflops": 1100.0, "tflops_incl_cast": 800.0,
                     "cast_s": 1e-4, "speedup_over_bf16": 1100 / 600, "speedup_incl_cast": 800 / 600, "error": None})  # fmt: skip
    return rows


def test_summary_reports_fp8_and_compile_with_partial_and_failed_rows(tmp_path):
    work = _fake_work(tmp_path)
    for i, name in enumerate(("fp8", "compile")):
        _write(work / "status", f"{16 + i}_{name}.json",
               {"stage": name, "status": "timeout" if name == "compile" else "ok", "rc": 0, "seconds": 3, "timeout_s": 60})  # fmt: skip
    rows = _fp8_rows(1536, 1536) + _fp8_rows(1536, 8960, "RuntimeError: rowwise scaling unsupported")
    # 8960->1536: never reached (a kill)
    _write(work, "fp8.json", {"tokens": 32760, "fp8_supported": True, "rows": rows})
    _write(work, "compile.json", {
        "summary": {"flavor": "1.3B", "vae": "debug", "height": 240, "width": 416, "chunks": 4,
                    "compiled_over_eager_fps": {}},
        "rows": [{"kv_cache": "bf16", "decode": "sync", "compile": False, "fps_end_to_end": 30.0,
                  "first_chunk_latency_s": 0.4, "cold_first_chunk_latency_s": 3.0, "steady_chunk_s": 0.35,
                  "peak_memory_bytes": 2**33, "error": None},
                 {"kv_cache": "bf16", "decode": "sync", "compile": True, "error": "timed out after 70 s"}]})  # fmt: skip
    res = suite_report.collect(str(work), smoke=False)
    figs = res["figures"]
    assert figs["fp8"]["shapes"]["1536->1536"]["fp8 tensorwise"]["speedup_over_bf16"] == 2.0
    assert figs["fp8"]["shapes"]["1536->1536"]["bf16"]["of_measured_bf16_peak"] == pytest.approx(0.75)
    assert figs["compile"]["rows"][1]["mode"] == "compile"
    text = suite_report.summary(res, "/out/gpu_figures.json")
    lines = text.splitlines()
    fp8_lines = [ln for ln in lines if ln.startswith("  1536->")]
    assert len(fp8_lines) == 2 and "fp8 tensorwise 1200 (2.00x; 900, 1.50x)" in fp8_lines[0]
    assert "fp8 rowwise FAILED RuntimeError: rowwise scaling unsupported" in fp8_lines[1]
    assert "8960->1536" not in text  # never measured: no line
    assert any("eager" in ln and "30.00 frames/s" in ln and "steady chunk 0.350 s" in ln for ln in lines)
    assert any(ln.startswith("  compile") and "FAILED timed out after 70 s" in ln for ln in lines)
    assert "compile timeout 3s" in text and "compiled/eager frames/s n/a" in text
    assert len(text) < suite_report.MAX_SUMMARY and max(map(len, lines)) <= suite_report.MAX_LINE

    full = _fp8_rows(1536, 1536) + _fp8_rows(1536, 8960) + _fp8_rows(8960, 1536)
    _write(work, "fp8.json", {"tokens": 32760, "fp8_supported": True, "rows": full})
    comp = json.loads((work / "compile.json").read_text())
    comp["rows"][1] = {
        **comp["rows"][0],
        "compile": True,
        "fps_end_to_end": 45.0,
        "cold_first_chunk_latency_s": 60.0,
    }
    comp["summary"]["compiled_over_eager_fps"] = {"bf16/sync": 1.5}
    _write(work, "compile.json", comp)
    text = suite_report.summary(suite_report.collect(str(work), smoke=False))
    assert (
        "compiled/eager frames/s bf16/sync 1.50x" in text
        and "cold first chunk 60.00 s (compile incl.)" in text
    )
    assert "cold first chunk 3.00 s," in text  # the eager row: no compile to include
    assert len([ln for ln in text.splitlines() if "fp8 rowwise 1100" in ln]) == 3


def test_fp8_bench_on_cpu_keeps_bf16_rows_and_skips_fp8(tmp_path):
    import fp8_bench

    out = tmp_path / "fp8.json"
    assert (
        fp8_bench.main(["--tokens", "32", "--shapes", "32x32,32x64", "--iters", "1", "--out", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["bf16", "fp8 tensorwise", "fp8 rowwise"] * 2
    assert all(r["tflops"] > 0 for r in rows if r["kind"] == "bf16")
    if not fp8_bench.fp8_supported(fp8_bench.torch.device("cpu")):
        assert all(r["error"] == fp8_bench.SKIP for r in rows if r["kind"] != "bf16")
        text = suite_report.summary({"figures": {"fp8": suite_report._fp8(str(tmp_path), None)[1]}})
        assert "fp8 rowwise skipped: needs CUDA (sm_89+)" in text and "FAILED" not in text


def test_report_keeps_every_readable_section_and_names_the_broken_one(tmp_path):
    work = _fake_work(tmp_path)
    res = suite_report.collect(str(work), smoke=False)
    figs = res["figures"]
    assert "sample" in figs["errors"] and "sample" not in figs  # the broken file costs its own section
    assert figs["peaks"]["gemm_flops"] == 800e12
    train = figs["train"]["rows"][0]
    assert train["mfu_datasheet"] == pytest.approx(250 / 989)
    assert train["mfu_measured_peak"] == pytest.approx(250 / 800)  # quoted against both peaks
    deq = figs["nvfp4"]["dequantize (nvfp4 -> bf16)"]
    assert deq["of_measured_copy"] == pytest.approx(0.5) and deq["of_datasheet_hbm"] == pytest.approx(
        2000 / 4800
    )
    assert figs["nvfp4"]["quantize (bf16 -> nvfp4, amax pass incl.)"]["error"] == "RuntimeError: boom"
    text = suite_report.summary(res, "/out/gpu_figures.json")
    assert (
        "torchtitan 33-39% MFU" in text and "31.2% of measured GEMM" in text and "25.3% of datasheet" in text
    )
    assert "section sample unreadable" in text and "FAILED RuntimeError: boom" in text
    assert len(text) < suite_report.MAX_SUMMARY and max(map(len, text.splitlines())) <= suite_report.MAX_LINE
    suite_report.main([str(work), str(tmp_path), "--summary"])
    assert json.loads((tmp_path / "gpu_figures.json").read_text())["figures"]["train"]["seq_len"] == 65520


def test_summary_lists_the_sampler_figures_beside_their_anchors(tmp_path):
    work = _fake_work(tmp_path)
    rows = [{"kv_cache": kv, "decode": d, "fps_end_to_end": 18.5, "first_chunk_latency_s": 0.8,
             "peak_memory_bytes": 2**34, "kv_cache_bytes": 2**30, "error": None}
            for kv in ("bf16", "nvfp4") for d in ("sync", "async")]  # fmt: skip
    rows.append({"kv_cache": "nvfp4", "decode": "async", "error": "timed out after 75 s"})
    _write(
        work,
        "sample.json",
        {"summary": {"flavor": "1.3B", "vae": "wan2.1", "height": 480, "width": 832}, "rows": rows},
    )
    text = suite_report.summary(suite_report.collect(str(work), smoke=False))
    fps_lines = [ln for ln in text.splitlines() if "frames/s" in ln]
    assert len(fps_lines) == 4 and all("LongLive 20.7 FPS, Self-Forcing 17 FPS" in ln for ln in fps_lines)
    assert "FAILED timed out after 75 s" in text


def test_summary_lists_the_5b_stages_with_every_cache_format(tmp_path):
    work = _fake_work(tmp_path)
    rows = [{"kv_cache": kv, "decode": "sync", "fps_end_to_end": fps, "first_chunk_latency_s": 1.2,
             "peak_memory_bytes": 2**35, "kv_cache_bytes": b, "error": None}
            for kv, fps, b in (("bf16", 9.0, 2**30), ("nvfp4", 8.5, 0.28 * 2**30))]  # fmt: skip
    rows.append({"kv_cache": "fp8", "decode": "sync", "error": "timed out after 40 s"})
    _write(work, "sample5b.json", {"summary": {
        "flavor": "5B", "vae": "wan2.2", "height": 704, "width": 1280, "chunks": 3, "window_frames": 6,
        "sink_frames": 3, "kv_bytes_ratio_nvfp4_over_bf16": 0.28, "latent_rel_l2_nvfp4_vs_bf16": 0.05,
        "kv_bytes_ratio_over_bf16": {"nvfp4": 0.28}, "latent_rel_l2_vs_bf16": {"nvfp4": 0.05}}, "rows": rows})  # fmt: skip
    _write(work, "train5b.json", {"device": "NVIDIA H100", "config": {"flavor": "5B", "height": 704, "width": 1280,
            "frames": 24, "frames_per_chunk": 3}, "seq_len": 42240, "flops_per_step": {"total": 2e15},
            "rows": [{"checkpointing": True, "error": "out of memory: CUDA out of memory."}]})  # fmt: skip
    res = suite_report.collect(str(work), smoke=False)
    assert res["figures"]["train"]["shape"]["flavor"] == "1.3B"  # the 1.3B's sections stay their own
    text = suite_report.summary(res)
    lines = text.splitlines()
    head = next(ln for ln in lines if ln.startswith("sample5b: "))
    assert (
        "5B + wan2.2 VAE, 704x1280, 3 chunks" in head
        and "nvfp4 0.280 of the bytes, latent rel L2 0.05" in head
    )
    assert any("kv=fp8" in ln and "FAILED timed out after 40 s" in ln for ln in lines)
    assert sum("9.00 frames/s" in ln for ln in lines) == 1
    assert any(
        ln.startswith("train5b: 5B, 704x1280, 24 latent frames") and "42,240 tokens" in ln for ln in lines
    )
    assert any("out of memory" in ln for ln in lines)
    assert max(map(len, lines)) <= suite_report.MAX_LINE


# ---- provenance: git's tree id, with or without .git ----------------------------------------------


def test_tree_hash_is_gits_tree_id_with_and_without_git(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "r"
    (repo / "a" / "b").mkdir(parents=True)
    (repo / "a" / "b" / "x.py").write_text("print(1)\n")
    (repo / "a-b").mkdir()
    (repo / "a-b" / "y").write_text("y\n")  # sorts between "a" (a folder: "a/") and "a.txt"
    (repo / "a.txt").write_text("t\n")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    (repo / "link").symlink_to("a.txt")
    (repo / ".gitignore").write_text("runs/\n*.pyc\n/.whl/\n")
    (repo / "cache").mkdir()  # a tool's cache folder ignoring itself (.import_linter_cache, say)
    (repo / "cache" / ".gitignore").write_text("*\n")
    (repo / "a" / ".gitignore").write_text("/local.txt\n")  # anchored to its own folder
    (repo / "a" / "b" / "local.txt").write_text("kept: not a/local.txt\n")
    for ignored in ("runs/r.json", "a/c.pyc", ".whl/w.whl", "cache/c.bin", "a/local.txt"):
        (repo / ignored).parent.mkdir(parents=True, exist_ok=True)
        (repo / ignored).write_text("ignored\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "m"], check=True)
    want = subprocess.run(
        [*git, "rev-parse", "HEAD^{tree}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with_git = provenance.provenance(repo)
    assert with_git["tree_hash"] == want and with_git["dirty"] is False and len(with_git["commit"]) == 40
    assert with_git["tree_hash_method"].startswith("git ls-files")
    shutil.rmtree(repo / ".git")  # the GPU machine's copy of the working tree
    walked = provenance.provenance(repo)
    assert walked["tree_hash"] == want and walked["commit"] is None
    assert walked["tree_hash_method"].startswith("file walk")
    (repo / "a.txt").write_text("changed\n")
    assert provenance.provenance(repo)["tree_hash"] != want


def test_this_checkouts_walk_agrees_with_git():
    files = provenance.git_files(REPO)
    if files is None:
        pytest.skip("this checkout has no .git")
    assert provenance.walk_files(REPO) == files


# ---- the smoke mode under the GPU machine's versions (side venv) --------------------------------


@pytest.fixture(scope="module")
def gpu_python() -> str:
    if os.environ.get("VIDTRAIN_SKIP_GPU_VENV") == "1":
        pytest.skip("VIDTRAIN_SKIP_GPU_VENV=1: the GPU-version side venv is not built")
    r = subprocess.run(
        ["bash", str(BENCH / "gpu_env_venv.sh")], capture_output=True, text=True, timeout=1500, check=False
    )
    if r.returncode == 3:
        pytest.skip("the side venv of the GPU machine's versions cannot be built: " + r.stderr.strip()[-300:])
    assert r.returncode == 0, f"bench/gpu_env_venv.sh failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout.strip().splitlines()[-1]


def _versions(python: str) -> dict:
    code = (
        "import importlib.util, json, platform, torch, triton; print(json.dumps({'torch': torch.__version__, "
        "'triton': triton.__version__, 'python': platform.python_version(), "
        f"'present': [m for m in {ABSENT!r} if importlib.util.find_spec(m)]}}))"
    )
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.slow
def test_side_venv_has_the_gpu_machines_versions(gpu_python):
    v = _versions(gpu_python)
    assert v["torch"].split("+")[0] == GPU_VERSIONS["torch"] and v["triton"] == GPU_VERSIONS["triton"]
    assert v["present"] == []


@pytest.mark.slow
def test_cpu_smoke_passes_under_the_gpu_machines_versions(gpu_python, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BENCH_DEADLINE")}
    env.update(PYTHON=gpu_python, OUT=str(out), SUITE_BUDGET_S="500")
    r = subprocess.run(
        ["bash", str(BENCH / "gpu_suite.sh"), "--cpu-smoke"],
        capture_output=True, text=True, timeout=600, env=env, check=False, cwd=tmp_path,
    )  # fmt: skip
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-6000:]
    assert len(output) < REPLY_CHARS, f"{len(output)} characters: the reply would cut the summary"
    res = json.loads((out / "gpu_figures.json").read_text())
    assert (
        res["env"]["torch"].split("+")[0] == GPU_VERSIONS["torch"]
        and res["env"]["triton"] == GPU_VERSIONS["triton"]
    )
    order = [
        "env",
        "peaks",
        "nvfp4",
        "sample",
        "train",
        "sample5b",
        "train5b",
        "fp8",
        "compile",
        "pytest",
        "dmd",
    ]
    assert list(res["stages"]) == order and all(s["status"] == "ok" for s in res["stages"].values())
    figs = res["figures"]
    assert figs["errors"] == {}
    assert figs["peaks"]["gemm_flops"] > 0 and figs["peaks"]["copy_bytes_per_s"] > 0
    order = [("bf16", "sync"), ("nvfp4", "sync"), ("bf16", "async"), ("nvfp4", "async")]  # headline first
    assert [(x["kv_cache"], x["decode"]) for x in figs["sample"]["rows"]] == order
    assert all(x["fps_end_to_end"] > 0 for x in figs["sample"]["rows"])
    assert all(x["GB_per_s"] > 0 and x["of_measured_copy"] > 0 for x in figs["nvfp4"].values())
    assert figs["nvfp4"]["quantize (bf16 -> nvfp4, amax pass incl.)"]["bytes_per_element"] == 4.5625
    assert all(x["step_s"] > 0 and x["mfu_measured_peak"] > 0 for x in figs["train"]["rows"])
    # the 5B's stages (a 48-channel Wan2.2-shaped DiT and VAE at smoke size): bf16, NVFP4, FP8 KV
    assert [x["kv_cache"] for x in figs["sample5b"]["rows"]] == ["bf16", "nvfp4", "fp8"]
    assert all(x["fps_end_to_end"] > 0 for x in figs["sample5b"]["rows"])
    assert figs["sample5b"]["shape"]["vae"] == "wan2.2-debug"
    ratios = figs["sample5b"]["kv_bytes_ratio_over_bf16"]
    assert set(ratios) == {"nvfp4", "fp8"} and ratios["nvfp4"] < ratios["fp8"] < 1
    assert set(figs["sample5b"]["latent_rel_l2_vs_bf16"]) == {"nvfp4", "fp8"}
    assert [x["act_ckpt"] for x in figs["train5b"]["rows"]] == [True]
    assert figs["train5b"]["rows"][0]["step_s"] > 0 and figs["train5b"]["shape"]["flavor"] == "wan2.2-debug"
    assert figs["pytest_gpu"]["tests"] >= 10 and figs["pytest_gpu"]["failures"] == 0
    assert figs["dmd_memory"]["lora_over_full_peak"] > 0
    fp8_rows = [x for kinds in figs["fp8"]["shapes"].values() for x in kinds.values()]
    assert len(fp8_rows) == 9 and all(x["tflops"] > 0 for x in fp8_rows if x["error"] is None)
    assert [x["mode"] for x in figs["compile"]["rows"]] == ["eager", "compile"]
    assert figs["compile"]["rows"][0]["fps_end_to_end"] > 0  # the compiled row: figures, or why not
    assert all(x["error"] or x["steady_chunk_s"] > 0 for x in figs["compile"]["rows"])
    assert len(res["provenance"]["tree_hash"]) == 40
    summary = r.stdout[r.stdout.index("== gpu_suite summary") :]
    assert "LongLive 20.7 FPS, Self-Forcing 17 FPS" in summary and "torchtitan 33-39% MFU" in summary
    assert "fp8 GEMM (_scaled_mm" in summary and "compile: debug" in summary
    assert "sample5b: wan2.2-debug + wan2.2-debug VAE" in summary and "train5b: wan2.2-debug" in summary
    assert summary.rstrip().splitlines()[-1].startswith("JSON: ")


@pytest.mark.slow
def test_interpreter_kernel_tests_pass_under_triton_36(gpu_python, tmp_path):
    """E2M1 decode sign, KV cache kernels, q/k dtype: the Triton 3.6 interpreter, torch 2.11."""
    pkg = tmp_path / "pkg"
    # a copy of the package as installed (vidtrain/kernels etc. are links to the top-level folders)
    shutil.copytree(REPO / "vidtrain", pkg / "vidtrain", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(pkg)
    files = [
        str(REPO / "tests" / f)
        for f in ("test_kernels.py", "test_kv_cache_kernels.py", "test_attention_dtype.py")
    ]
    r = subprocess.run(
        [gpu_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
         "-c", str(REPO / "pyproject.toml"), *files],
        capture_output=True, text=True, timeout=600, env=env, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:]
    assert " passed" in r.stdout and "failed" not in r.stdout.splitlines()[-1]
