#!/usr/bin/env bash
# The GPU check in one call: the GPU-marked tests, then the benchmarks at GPU sizes. Writes ONE
# JSON of figures ($OUT/gpu_figures.json) and the stage logs ($OUT/gpu_suite.log); prints a
# summary last (the device reply keeps the end of the output).
#
# On the device machine (its image has python3 with torch, triton, peft, pytest, numpy,
# matplotlib: nothing is installed, nothing is fetched, the repo's .venv is not carried):
#   run(command="bash bench/gpu_suite.sh", carry=[], timeout_s=540)
# Dry run on CPU (tiny sizes, the same stages and JSON; writes runs/gpu_suite/ unless $OUT is set):
#   bash bench/gpu_suite.sh --cpu-smoke
#
# Stages: env, pytest -m gpu, nvfp4_bench, dmd_memory, train_bench, sample_bench. Each runs under
# its own `timeout`, capped by what is left of the suite's budget (SUITE_BUDGET_S, default 450 s),
# so one failure or hang does not sink the rest; the JSON is rewritten after every stage.
# vidtrain is imported from a symlink tree that mirrors setup.py's package_dir (vidtrain.kernels
# = kernels/, ...), so no `pip install` is needed. PYTHON picks the interpreter (default python3).
set -u

SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/runs/gpu_suite}"
BUDGET="${SUITE_BUDGET_S:-450}"
DEADLINE=$((SECONDS + BUDGET))
NSTAGE=10 # status files sort in run order
WORK="$(mktemp -d /tmp/gpu_suite.XXXXXX)"
LOG="$OUT/gpu_suite.log"
mkdir -p "$OUT" "$WORK/status"
: >"$LOG"
export PYTHONUNBUFFERED=1 WORK OUT SMOKE

# vidtrain as setup.py installs it, without installing: a symlink tree on PYTHONPATH.
mkdir -p "$WORK/pkg"
cp -rs "$REPO/vidtrain" "$WORK/pkg/"
for m in kernels data_tools launch; do ln -sfn "$REPO/$m" "$WORK/pkg/vidtrain/$m"; done
find "$WORK/pkg" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK" || exit 1 # not the repo root: `python -m` would import ./vidtrain (no kernels) first

combine() { # gpu_figures.json from whatever the stages left in $WORK; --summary prints a table
	"$PY" - "$@" <<'EOF'
import glob, json, os, sys, xml.etree.ElementTree as ET

work, out = os.environ["WORK"], os.environ["OUT"]

def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

stages = {}
for p in sorted(glob.glob(os.path.join(work, "status", "*.json"))):  # NN_stage.json, run order
    s = json.load(open(p))
    stages[s["stage"]] = s
figs, raw = {}, {}
try:
    t = ET.parse(os.path.join(work, "pytest.xml")).getroot()
    t = t if t.tag == "testsuite" else t.find("testsuite")
    figs["pytest_gpu"] = {k: int(t.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError):
    pass
if (r := load("train.json")) is not None:
    raw["train_bench"] = r
    figs["train"] = {"device": r["device"],
        "shape": {k: r["config"][k] for k in ("flavor", "height", "width", "frames", "frames_per_chunk")},
        "seq_len": r["seq_len"], "model_tflop_per_step": r["flops_per_step"]["total"] / 1e12,
        "rows": [{"act_ckpt": x["checkpointing"], "error": x.get("error"), **{k: x.get(k) for k in
                  ("step_s", "mask_build_s", "tokens_per_s", "tflops_per_s", "mfu", "peak_memory_bytes", "precision")}}
                 for x in r["rows"]],
    }
if (r := load("nvfp4.json")) is not None:
    raw["nvfp4_bench"] = r
    figs["nvfp4"] = {x["op"]: {"GB_per_s": x["GB_per_s"], "fraction_of_hbm_peak": x["fraction_of_hbm_peak"]}
                     for x in r["rows"]}
if (r := load("sample.json")) is not None:
    raw["sample_bench"] = r
    figs["sample"] = {
        "shape": {k: r["summary"][k] for k in ("flavor", "vae", "height", "width", "chunks",
                                               "window_frames", "sink_frames")},
        "kv_bytes_ratio_nvfp4_over_bf16": r["summary"]["kv_bytes_ratio_nvfp4_over_bf16"],
        "rows": [{k: x[k] for k in ("kv_cache", "decode", "fps_end_to_end", "first_chunk_latency_s",
                                    "peak_memory_bytes", "kv_cache_bytes")} for x in r["rows"]],
    }
if (r := load("dmd_memory.json")) is not None:
    raw["dmd_memory"] = r
    figs["dmd_memory"] = {"lora_over_full_peak": r["lora_over_full_peak"],
                          "lora_peak_bytes": r["lora"]["peak_bytes"], "full_peak_bytes": r["full"]["peak_bytes"]}
res = {"env": load("env.json"), "cpu_smoke": os.environ["SMOKE"] == "1", "stages": stages,
       "figures": figs, "raw": raw}
with open(os.path.join(out, "gpu_figures.json"), "w") as f:
    json.dump(res, f, indent=1)
if "--summary" not in sys.argv:
    sys.exit(0)
env = res["env"] or {}
print(f"\n== gpu_suite summary: {env.get('device', '?')}, torch {env.get('torch', '?')}, "
      f"smoke={res['cpu_smoke']} ==")
for name, s in stages.items():
    print(f"  {name:<8} {s['status']:<8} rc={s['rc']:<4} {s['seconds']:>4} s")
if p := figs.get("pytest_gpu"):
    print(f"pytest -m gpu: {p['tests']} tests, {p['failures']} failed, {p['errors']} errors, {p['skipped']} skipped")
for x in figs.get("train", {}).get("rows", []):
    ck = "on " if x["act_ckpt"] else "off"
    if x["error"]:
        print(f"train act-ckpt {ck}: {x['error'][:100]}")
    else:
        mfu = f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a"
        print(f"train act-ckpt {ck}: step {x['step_s']:.3f} s (mask {x['mask_build_s']:.3f}), {x['tokens_per_s']:,.0f} tok/s, "
              f"{x['tflops_per_s']:.1f} TFLOP/s, MFU {mfu}, peak {x['peak_memory_bytes'] / 2**30:.1f} GiB")
for op, x in figs.get("nvfp4", {}).items():
    frac = f"{x['fraction_of_hbm_peak']:.1%}" if x["fraction_of_hbm_peak"] is not None else "n/a"
    print(f"nvfp4 {op}: {x['GB_per_s']:.1f} GB/s, {frac} of HBM peak")
for x in figs.get("sample", {}).get("rows", []):
    print(f"sample kv={x['kv_cache']:<5} decode={x['decode']:<5}: {x['fps_end_to_end']:.2f} frames/s, "
          f"first chunk {x['first_chunk_latency_s']:.2f} s, peak {x['peak_memory_bytes'] / 2**30:.2f} GiB")
if d := figs.get("dmd_memory"):
    print(f"dmd_memory: lora/full peak {d['lora_over_full_peak']:.2f}x")
print(f"JSON: {os.path.join(out, 'gpu_figures.json')}")
EOF
}

stage() { # stage NAME MAX_SECONDS CMD...: run under timeout, log, record status, rewrite the JSON
	local name="$1" max="$2" left t0 rc status
	shift 2
	left=$((DEADLINE - SECONDS - 10))
	t0=$SECONDS
	if ((left < 20)); then
		rc=-1 status=skipped
		echo "== $name: skipped (budget spent)" | tee -a "$LOG"
	else
		((max > left)) && max=$left
		echo "== $name (timeout ${max}s): $*" | tee -a "$LOG"
		timeout -k 10 "$max" "$@" 2>&1 | tee -a "$LOG"
		rc=${PIPESTATUS[0]}
		case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
	fi
	printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' \
		"$name" "$status" "$rc" $((SECONDS - t0)) "$max" >"$WORK/status/$((++NSTAGE))_$name.json"
	combine
}

env_facts() {
	command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
	"$PY" - <<'EOF'
import json, os, platform, torch
import vidtrain, vidtrain.kernels
cuda = torch.cuda.is_available()
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
env = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)", "cuda": cuda,
       "torch": torch.__version__, "triton": tv, "python": platform.python_version(),
       "vidtrain": os.path.dirname(vidtrain.__file__)}
print(json.dumps(env))
json.dump(env, open(os.path.join(os.environ["WORK"], "env.json"), "w"))
if not cuda and os.environ["SMOKE"] != "1":
    raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU dry run")
EOF
}

export -f env_facts
export PY
stage env 60 bash -c env_facts
if [[ "$(cat "$WORK"/status/*_env.json)" != *'"ok"'* ]]; then
	echo "environment stage failed; see $LOG" && combine --summary && exit 1
fi

B="$REPO/bench"
PYTEST_FILES=$(grep -l "mark.gpu" "$REPO"/tests/test_*.py)
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=60)
stage pytest 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
	--junitxml "$WORK/pytest.xml" "${PYTEST_TIMEOUT[@]}" $PYTEST_FILES

if ((SMOKE)); then
	stage nvfp4 60 "$PY" "$B/nvfp4_bench.py" --numel 65536 --iters 2 --out "$WORK/nvfp4.json"
	stage dmd 120 "$PY" "$B/dmd_memory.py" --dim 64 --layers 1 --rank 4 --out "$WORK/dmd_memory.json"
	stage train 120 "$PY" "$B/train_bench.py" --iters 3 --timeout 60 --out "$WORK/train.json"
	stage sample 240 "$PY" "$B/sample_bench.py" --height 64 --width 64 --chunks 3 --out "$WORK/sample.json"
else
	# 2^27 elements: 256 MiB of bf16, several times the L2, well past launch overhead
	stage nvfp4 60 "$PY" "$B/nvfp4_bench.py" --numel 134217728 --iters 20 --out "$WORK/nvfp4.json"
	stage dmd 60 "$PY" "$B/dmd_memory.py" --out "$WORK/dmd_memory.json"
	# Wan2.1 1.3B, 480x832 px (60x104 latents), 21 latent frames = 65,520 TF tokens, bf16 autocast;
	# act. ckpt off is expected to run out of memory at this length (recorded, not fatal)
	stage train 230 "$PY" "$B/train_bench.py" --flavor 1.3B --height 480 --width 832 --frames 21 \
		--frames-per-chunk 3 --warmup 2 --iters 3 --timeout 140 --out "$WORK/train.json"
	# 4 steps (SamplerConfig default), window 6 + global sink 3 + shot sink, Wan2.1 VAE (random)
	stage sample 200 "$PY" "$B/sample_bench.py" --flavor 1.3B --vae wan2.1 --height 480 --width 832 \
		--chunks 6 --window-frames 6 --sink-frames 3 --out "$WORK/sample.json"
fi
combine --summary
rm -rf "$WORK"
