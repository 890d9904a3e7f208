#!/usr/bin/env bash
# A side virtual environment with the GPU machine's software, for CPU checks of bench/gpu_suite.sh:
# Python 3.12 (where this machine has it), torch 2.11.0, triton 3.6.0, peft, pytest; no DeepSpeed,
# diffusers, omegaconf or wandb (the GPU machine has none of them). Built once under a cache
# folder and reused while its spec is unchanged; prints the venv's python as its last line.
#
#   bash bench/gpu_env_venv.sh            # -> ~/.cache/vidtrain-gpu-venv/bin/python
#   VIDTRAIN_GPU_VENV=/path bash bench/gpu_env_venv.sh
#
# PyPI's torch 2.11.0 Linux x86_64 wheel is a CUDA 13.0 build (a CPU-only build is not on PyPI);
# it imports and runs on a CPU machine with its nvidia-* wheels installed (without them the import
# fails on libcudnn.so.9). Measured here (2 cores, 2026-12): about 3 GB downloaded, 4.9 GB on
# disk, about 2 minutes. pip's cache is not used (it would double the disk for no reuse on a
# clean CI machine). Exit status: 0 built or reused; 3 the package index cannot be reached (no
# network: callers skip, saying so); anything else a real build failure.
set -euo pipefail

VENV="${VIDTRAIN_GPU_VENV:-$HOME/.cache/vidtrain-gpu-venv}"
# The GPU machine's versions (KINDS.md's pip list for nvidia-h200): the ones the suite touches.
SPEC=(torch==2.11.0 triton==3.6.0 numpy==2.5.2 peft safetensors==0.8.0 pyyaml pytest pytest-timeout)
ABSENT=(deepspeed diffusers omegaconf wandb)

pick_python() {
	local p
	for p in "${VIDTRAIN_GPU_PYTHON:-}" python3.12 "$HOME/.pyenv/versions/3.12"*/bin/python3.12 \
		/root/.pyenv/versions/3.12*/bin/python3.12; do
		[[ -n "$p" ]] && command -v "$p" >/dev/null 2>&1 && "$p" -c 'import venv' 2>/dev/null && {
			command -v "$p"
			return
		}
	done
	command -v python3 # not 3.12: the stamp and the smoke test say which Python was used
}

BASE="$(pick_python)"
STAMP="$VENV/.vidtrain-gpu-env"
WANT="$("$BASE" -c 'import platform; print(platform.python_version())') ${SPEC[*]} | absent: ${ABSENT[*]}"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9 # one build at a time (two test sessions, say)

if [[ -f "$STAMP" && "$(head -n1 "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
	echo "reusing $VENV ($(tail -n +2 "$STAMP" | tr '\n' ' '))" >&2
	echo "$VENV/bin/python"
	exit 0
fi

# Is the package index there at all? A tiny download answers in seconds either way.
probe="$(mktemp -d)"
if ! "$BASE" -m pip download -q --no-deps --no-cache-dir --timeout 20 --retries 1 -d "$probe" pytest-timeout==2.4.0 \
	>/dev/null 2>&1; then
	rm -rf "$probe"
	echo "gpu_env_venv: the package index cannot be reached (no network?): not building $VENV" >&2
	exit 3
fi
rm -rf "$probe"

t0=$SECONDS
rm -rf "$VENV"
"$BASE" -m venv "$VENV"
echo "gpu_env_venv: building $VENV with $BASE: ${SPEC[*]}" >&2
"$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check "${SPEC[@]}" >&2
for m in "${ABSENT[@]}"; do # the GPU machine has none of these: neither may the venv
	if "$VENV/bin/python" -c "import $m" 2>/dev/null; then
		echo "gpu_env_venv: $m is importable in the venv, the GPU machine has none" >&2
		exit 1
	fi
done
VERS="$("$VENV/bin/python" -c 'import platform, torch, triton; print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__}")')"
{
	echo "$WANT"
	echo "$VERS"
	echo "built in $((SECONDS - t0)) s, $(du -sh "$VENV" | cut -f1) on disk"
} >"$STAMP"
echo "gpu_env_venv: $VERS; built in $((SECONDS - t0)) s, $(du -sh "$VENV" | cut -f1)" >&2
echo "$VENV/bin/python"
