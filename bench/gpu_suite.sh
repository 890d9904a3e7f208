#!/usr/bin/env bash
# The GPU check in one call: the headline benchmarks at GPU sizes first, then the GPU-marked tests.
# Writes ONE JSON of figures ($OUT/gpu_figures.json, rewritten after every stage) and the stage
# logs ($OUT/gpu_suite.log); prints one line per stage (the last lines of a failing stage's
# output too) and a summary last, all well inside the 12,000 characters a device reply keeps.
#
# On the device machine (its image has python3 with torch, triton, peft, pytest, numpy,
# matplotlib: nothing is installed, nothing is fetched, the repo's .venv is not carried):
#   run(command="bash bench/gpu_suite.sh", carry=[], timeout_s=540)
# Dry run on CPU (tiny sizes, the same stages and JSON; writes runs/gpu_suite/ unless $OUT is set):
#   bash bench/gpu_suite.sh --cpu-smoke
# Under the GPU machine's versions on CPU (torch 2.11.0, triton 3.6.0, Python 3.12; see
# bench/gpu_env_venv.sh): PYTHON=~/.cache/vidtrain-gpu-venv/bin/python bash bench/gpu_suite.sh --cpu-smoke
#
# Stages, in this order (the headline figures first, so a later failure or the budget running out
# costs the least): env (device, versions, commit + tree hash), peaks (measured bf16 GEMM and copy
# bandwidth), nvfp4 (quantize / dequant GB/s), sample (sampler frames/s with VAE decode), train
# (train step, MFU), all at Wan2.1-1.3B's 480x832; then the Wan2.2-TI2V-5B recipe's shape at
# 704x1280: sample5b (frames/s with the Wan2.2 VAE's decode, bf16 vs NVFP4 vs FP8 KV) and train5b
# (train step, MFU); then the speed features: fp8 (bf16 vs FP8 _scaled_mm GEMM TFLOP/s at the
# 1.3B's linears, bench/fp8_bench.py), compile (sampler frames/s eager vs torch.compile), then
# pytest (-m gpu), dmd (DMD memory). Each runs under its own `timeout`, capped
# by what is left of the suite's budget (SUITE_BUDGET_S, default 525 s, 15 s kept for the summary),
# and each writes its own JSON after every configuration, so one failure, hang or kill does not
# sink another stage's figures. BENCH_DEADLINE (epoch seconds, a few seconds before the stage's
# kill) lets the benches cap their per-configuration child processes and still write their JSON.
# GPU timeouts: env 25 + peaks 25 + nvfp4 25 + sample 90 + train 95 + sample5b 80 + train5b 75
# + fp8 20 + compile 75 = 510 s = the budget less the reserve, so those stages always get their full
# time; pytest (90) and dmd (45) run on what the earlier stages leave unused (a stage with under
# 20 s left is skipped). The device call: run(command="bash bench/gpu_suite.sh", timeout_s=540).
# vidtrain is imported from a symlink tree that mirrors setup.py's package_dir (vidtrain.kernels
# = kernels/, ...), so no `pip install` is needed. PYTHON picks the interpreter (default python3).
set -u

SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
B="$REPO/bench"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/runs/gpu_suite}"
BUDGET="${SUITE_BUDGET_S:-525}"
RESERVE=15 # seconds kept for the closing report
DEADLINE=$((SECONDS + BUDGET))
NSTAGE=10 # status files sort in run order
WORK="$(mktemp -d /tmp/gpu_suite.XXXXXX)"
LOG="$OUT/gpu_suite.log"
mkdir -p "$OUT" "$WORK/status" "$WORK/logs"
: >"$LOG"
export PYTHONUNBUFFERED=1 WORK OUT SMOKE REPO B PY

# vidtrain as setup.py installs it, without installing: a symlink tree on PYTHONPATH.
mkdir -p "$WORK/pkg"
cp -rs "$REPO/vidtrain" "$WORK/pkg/"
for m in kernels data_tools launch; do ln -sfn "$REPO/$m" "$WORK/pkg/vidtrain/$m"; done
find "$WORK/pkg" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
cd "$WORK" || exit 1 # not the repo root: `python -m` would import ./vidtrain (no kernels) first

REPORT_ARGS=("$WORK" "$OUT")
((SMOKE)) && REPORT_ARGS+=(--smoke)
report() { "$PY" "$B/suite_report.py" "${REPORT_ARGS[@]}" "$@" 2>>"$LOG"; }

FAILED=0
stage() { # stage NAME MAX_SECONDS CMD...: run under timeout, log, record status, rewrite the JSON
	local name="$1" max="$2" left t0 rc status slog="$WORK/logs/$1.log"
	shift 2
	left=$((DEADLINE - SECONDS - RESERVE))
	t0=$SECONDS
	if ((left < 20)); then
		rc=-1 status=skipped FAILED=1
		echo "== $name: skipped (budget spent)" | tee -a "$LOG"
	else
		((max > left)) && max=$left
		echo "== $name (timeout ${max}s): $*" >>"$LOG"
		export BENCH_DEADLINE=$(($(date +%s) + max - 5))
		timeout -k 10 "$max" "$@" >"$slog" 2>&1
		rc=$?
		cat "$slog" >>"$LOG"
		case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
		echo "== $name: $status (rc $rc, $((SECONDS - t0)) s of ${max} s)" | tee -a "$LOG"
		if [[ $status != ok ]]; then
			FAILED=1
			tail -n 6 "$slog" | cut -c1-160 | sed "s/^/   | /"
		fi
	fi
	printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' \
		"$name" "$status" "$rc" $((SECONDS - t0)) "$max" >"$WORK/status/$((++NSTAGE))_$name.json"
	report
}

env_facts() {
	command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
	"$PY" "$B/provenance.py" "$REPO" --out "$WORK/provenance.json" || echo "provenance: failed (figures kept)"
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
       "cuda_version": torch.version.cuda, "torch": torch.__version__, "triton": tv,
       "python": platform.python_version(), "vidtrain": os.path.dirname(vidtrain.__file__)}
print(json.dumps(env))
json.dump(env, open(os.path.join(os.environ["WORK"], "env.json"), "w"))
if not cuda and os.environ["SMOKE"] != "1":
    raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU dry run")
EOF
}
export -f env_facts

((SMOKE)) && ENV_MAX=40 || ENV_MAX=25 # a fresh machine's first torch + CUDA import reads GBs from a cold disk
stage env $ENV_MAX bash -c env_facts
if [[ "$(cat "$WORK"/status/*_env.json)" != *'"ok"'* ]]; then
	echo "environment stage failed; see $LOG" && report --summary && exit 1
fi

PYTEST_FILES=$(grep -l "mark.gpu" "$REPO"/tests/test_*.py)
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=100)
run_pytest() {
	stage pytest "$1" "$PY" -m pytest -m gpu -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
		--junitxml "$WORK/pytest.xml" "${PYTEST_TIMEOUT[@]}" $PYTEST_FILES
}

if ((SMOKE)); then
	stage peaks 60 "$PY" "$B/peaks.py" --gemm-n 256 --copy-mib 16 --iters 3 --reps 3 --warmup-s 0.1 --out "$WORK/peaks.json"
	stage nvfp4 60 "$PY" "$B/nvfp4_bench.py" --numel 65536 --iters 2 --out "$WORK/nvfp4.json"
	stage sample 240 "$PY" "$B/sample_bench.py" --height 64 --width 64 --chunks 3 --timeout 60 --out "$WORK/sample.json"
	stage train 150 "$PY" "$B/train_bench.py" --iters 3 --timeout 60 --out "$WORK/train.json"
	stage sample5b 150 "$PY" "$B/sample_bench.py" --flavor wan2.2-debug --vae wan2.2-debug --height 64 --width 64 \
		--chunks 2 --configs bf16/sync,nvfp4/sync,fp8/sync --timeout 60 --out "$WORK/sample5b.json"
	stage train5b 90 "$PY" "$B/train_bench.py" --flavor wan2.2-debug --height 128 --width 128 --iters 2 \
		--checkpointing on --timeout 60 --out "$WORK/train5b.json"
	stage fp8 60 "$PY" "$B/fp8_bench.py" --tokens 128 --shapes 64x64,64x128,128x64 --iters 2 --out "$WORK/fp8.json"
	stage compile 150 "$PY" "$B/sample_bench.py" --height 32 --width 32 --chunks 3 --configs bf16/sync/eager,bf16/sync/compile \
		--timeout 100 --tolerate-failures --out "$WORK/compile.json"
	run_pytest 120
	stage dmd 120 "$PY" "$B/dmd_memory.py" --dim 64 --layers 1 --rank 4 --timeout 60 --out "$WORK/dmd_memory.json"
else
	# 8192^3 bf16 GEMM on random data, a 2 GiB device-to-device copy: the achievable ceilings
	stage peaks 25 "$PY" "$B/peaks.py" --out "$WORK/peaks.json"
	# 2^27 elements: 256 MiB of bf16, several times the L2, well past launch overhead
	stage nvfp4 25 "$PY" "$B/nvfp4_bench.py" --numel 134217728 --iters 20 --out "$WORK/nvfp4.json"
	# 4 steps (SamplerConfig default), window 6 + global sink 3 + shot sink, Wan2.1 VAE (random);
	# bf16 KV + sync decode first (the headline), then nvfp4, then async decode
	stage sample 90 "$PY" "$B/sample_bench.py" --flavor 1.3B --vae wan2.1 --height 480 --width 832 \
		--chunks 6 --window-frames 6 --sink-frames 3 --timeout 60 --out "$WORK/sample.json"
	# Wan2.1 1.3B, 480x832 px (60x104 latents), 21 latent frames = 65,520 TF tokens, bf16 autocast;
	# act. ckpt on first; off is expected to run out of memory at this length (recorded, not fatal)
	stage train 95 "$PY" "$B/train_bench.py" --flavor 1.3B --height 480 --width 832 --frames 21 \
		--frames-per-chunk 3 --warmup 1 --iters 3 --timeout 60 --out "$WORK/train.json"
	# Wan2.2-TI2V-5B + the Wan2.2 VAE (random), 704x1280 px (44x80 latents, 880 tokens a frame), the
	# shipped 5B recipes' shape: the bf16 KV cache (headline), NVFP4, FP8 (e4m3, per-head scale)
	stage sample5b 80 "$PY" "$B/sample_bench.py" --flavor 5B --vae wan2.2 --height 704 --width 1280 \
		--chunks 3 --window-frames 6 --sink-frames 3 --configs bf16/sync,nvfp4/sync,fp8/sync --timeout 40 \
		--out "$WORK/sample5b.json"
	# 5B, 24 latent frames (recipes/tf_5B.yaml) = 42,240 TF tokens, act. ckpt on, AdamW on one device
	# (fp32 params + grads + moments ~80 GB: an 80 GB H100 runs out of memory, recorded; an H200 fits)
	stage train5b 75 "$PY" "$B/train_bench.py" --flavor 5B --height 704 --width 1280 --frames 24 \
		--frames-per-chunk 3 --warmup 1 --iters 1 --checkpointing on --timeout 70 --out "$WORK/train5b.json"
	# bf16 GEMM vs FP8 (e4m3, tensorwise / rowwise) at 32,760 tokens a rank: 1536->1536, 1536->8960, 8960->1536
	stage fp8 20 "$PY" "$B/fp8_bench.py" --tokens 32760 --iters 20 --out "$WORK/fp8.json"
	# 1.3B, 240x416 px (30x52 latents), debug VAE (the model's speed): eager, then compiled
	# ("reduce-overhead", CUDA graphs); the compiled row's cold first chunk includes the compile
	stage compile 75 "$PY" "$B/sample_bench.py" --flavor 1.3B --height 240 --width 416 --chunks 4 \
		--window-frames 6 --sink-frames 3 --configs bf16/sync/eager,bf16/sync/compile --timeout 65 \
		--tolerate-failures --out "$WORK/compile.json"
	run_pytest 90
	stage dmd 45 "$PY" "$B/dmd_memory.py" --timeout 40 --out "$WORK/dmd_memory.json"
fi
report --summary
rm -rf "$WORK"
exit $FAILED
