"""`vidtrain-launch`: start `vidtrain train RECIPE k=v ...` on many ranks.

  vidtrain-launch --launcher deepspeed --nproc 2 recipes/tf_debug_sp2.yaml
  vidtrain-launch --launcher torchrun --nproc 8 --nnodes 2 --node-rank 0 --master-addr node0 RECIPE
  vidtrain-launch --launcher slurm --nnodes 4 --nproc 8 --gpus-per-node 8 --partition gpu RECIPE --dry-run
  vidtrain-launch sample --nproc 2 -- --checkpoint runs/debug --shots shots.yaml --out video.mp4

The `sample` entry starts `python -m vidtrain.cli sample ARGS` on N torchrun ranks of one node
(the ranks read N from WORLD_SIZE) (what `vidtrain sample --nproc N` runs: Ulysses over heads, the KV cache by heads, rank 0
decodes and writes).

Every launcher ends in the same entry, `python -m vidtrain.cli train RECIPE k=v ...`, with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment (what the
strategies read). `--dry-run` prints the command (or the rendered sbatch script) and exits. The
recipe and overrides are loaded as `vidtrain train` loads them before anything starts: a typo is
one line and exit 2, not a traceback after the nodes are allocated.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from vidtrain.config import load_recipe
from vidtrain.utils import quiet

ENTRY = ["-m", "vidtrain.cli", "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(a: argparse.Namespace) -> list[str]:
    return [str(Path(a.recipe).resolve()), *a.overrides]


def deepspeed_executable() -> str:
    """DeepSpeed's launcher of this interpreter's environment (works without an activated venv)."""
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.exists():
        return str(beside)
    found = shutil.which("deepspeed")
    if found is None:
        raise ValueError("the deepspeed launcher is not installed here (pip install deepspeed)")
    return found


def deepspeed_command(a: argparse.Namespace) -> list[str]:
    cmd = [deepspeed_executable()]
    if a.hostfile:
        if not Path(a.hostfile).is_file():
            raise ValueError(f"hostfile {a.hostfile!r} does not exist (lines like 'node0 slots=8')")
        cmd += ["--hostfile", a.hostfile]
    elif a.nnodes > 1:
        raise ValueError(
            f"--nnodes {a.nnodes} with the deepspeed launcher needs --hostfile (lines like 'node0 slots=8')"
        )
    if a.nnodes > 1:
        cmd += ["--num_nodes", str(a.nnodes)]
    cmd += ["--num_gpus", str(a.nproc), "--no_local_rank", "--module"]
    if not a.verbose:
        cmd += ["--log_level", "warning"]
    cmd += ["--master_addr", a.master_addr or "127.0.0.1", "--master_port", str(a.master_port or free_port())]
    # --module: deepspeed runs `python -u -m <first arg> <rest>`
    return [*cmd, "vidtrain.cli", "train", *train_args(a)]


def torchrun_command(a: argparse.Namespace, entry: list[str] | None = None) -> list[str]:
    """torchrun over `entry` (module and arguments; default: `vidtrain.cli train RECIPE k=v ...`)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(a.nproc),
        "--nnodes",
        str(a.nnodes),
    ]
    if a.nnodes > 1:
        if not a.master_addr:
            raise ValueError("multi-node torchrun needs --master-addr (the address of node rank 0)")
        cmd += ["--node_rank", str(a.node_rank)]
    cmd += ["--master_addr", a.master_addr or "127.0.0.1", "--master_port", str(a.master_port or free_port())]
    entry = entry if entry is not None else ["vidtrain.cli", "train", *train_args(a)]
    return [*cmd, "--module", *entry]


def sbatch_script(a: argparse.Namespace) -> str:
    """The sbatch script: one task per rank, `srun` maps Slurm's ids to the launcher env."""
    run_dir = Path(a.log_dir or ".").resolve()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={a.job_name}",
        f"#SBATCH --nodes={a.nnodes}",
        f"#SBATCH --ntasks-per-node={a.nproc}",
        "#SBATCH --cpus-per-task=1" if not a.gpus_per_node else f"#SBATCH --gpus-per-node={a.gpus_per_node}",
    ]
    if a.partition:
        lines.append(f"#SBATCH --partition={a.partition}")
    if a.time:
        lines.append(f"#SBATCH --time={a.time}")
    lines += [
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={a.master_port or 29500}",
        "export WANDB_MODE=${WANDB_MODE:-offline} PYTHONUNBUFFERED=1",
        "# one task per rank; Slurm's ids become the env the strategies read",
        "srun --kill-on-bad-exit=1 bash -c '"
        "export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; "
        f"exec {shlex.join([sys.executable, *ENTRY, *train_args(a)])}'",
    ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="vidtrain-launch",
        description=__doc__.split("\n")[0],
    )
    p.add_argument(
        "--launcher",
        choices=("deepspeed", "torchrun", "slurm"),
        default="torchrun",
        help="how the ranks start",
    )
    p.add_argument("--nproc", type=int, default=1, help="ranks (GPUs or CPU processes) per node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes")
    p.add_argument("--node-rank", type=int, default=0, help="torchrun multi-node: this node's rank")
    p.add_argument("--hostfile", help="deepspeed multi-node hostfile")
    p.add_argument("--master-addr")
    p.add_argument("--master-port", type=int)
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--time", help="slurm time limit, e.g. 02:00:00")
    p.add_argument("--gpus-per-node", type=int, default=0, help="slurm GPUs per node (0: CPU ranks)")
    p.add_argument("--job-name", default="vidtrain", help="slurm job name")
    p.add_argument("--log-dir", help="slurm: folder for slurm-%%j.out (default: current folder)")
    p.add_argument("--script-out", help="slurm: where to write the sbatch script (default: a temp file)")
    p.add_argument("--dry-run", action="store_true", help="print the command / sbatch script, start nothing")
    p.add_argument(
        "--verbose", action="store_true",
        help="everything the launcher and the ranks print (DeepSpeed's INFO lines, wandb's banner); "
        "by default the known-harmless noise listed in vidtrain/utils/quiet.py is dropped",
    )  # fmt: skip
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    a = p.parse_args(argv)
    if a.nproc < 1 or a.nnodes < 1:
        raise ValueError(f"--nproc and --nnodes must be >= 1, got {a.nproc}, {a.nnodes}")
    if not Path(a.recipe).is_file():
        raise ValueError(f"recipe {a.recipe!r} not found")
    check_recipe(a)
    return a


def check_recipe(a: argparse.Namespace) -> None:
    """Load the recipe and overrides as `vidtrain train` will (a ConfigError is one line), and check
    that the ranks fit it, before any process starts or any script is rendered."""

    recipe = load_recipe(a.recipe, a.overrides)
    world, sp = a.nproc * a.nnodes, recipe.parallel.sp_size
    if a.launcher == "deepspeed" and a.hostfile:  # the hostfile's slots decide the rank count
        return
    if world % sp:
        raise ValueError(
            f"{world} rank(s) ({a.nnodes} node(s) x {a.nproc}) are not divisible by parallel.sp_size={sp}: "
            "give --nproc / --nnodes whose product is a multiple of it"
        )


SAMPLE_ENTRY = ["vidtrain.cli", "sample"]


def parse_sample(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`vidtrain-launch sample [--nproc N ...] -- SAMPLE ARGS`: the launcher's options, then
    `vidtrain sample`'s arguments (which that command checks itself)."""
    if "--" in argv:
        cut = argv.index("--")
        own, rest = argv[:cut], argv[cut + 1 :]
    else:
        own, rest = argv, []
    p = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        prog="vidtrain-launch sample",
        description="start `vidtrain sample` on N torchrun ranks of this node (multi-GPU sampling)",
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks (GPUs or CPU processes)")
    p.add_argument("--master-port", type=int)
    p.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    p.add_argument("--verbose", action="store_true", help="everything the ranks print")
    a = p.parse_args(own)
    if a.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {a.nproc}")
    if not rest:
        raise ValueError("vidtrain-launch sample needs `-- ARGS` (vidtrain sample's arguments)")
    a.launcher, a.nnodes, a.node_rank, a.master_addr = "torchrun", 1, 0, None
    return a, without_nproc(rest)


def without_nproc(args: list[str]) -> list[str]:
    """`vidtrain sample`'s arguments minus `--nproc N`: inside the ranks the count is WORLD_SIZE
    (and torchrun's argument parser would call `--nproc` an ambiguous `--nproc-per-node`)."""
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    return out


def _sample(argv: list[str]) -> int:
    try:
        a, rest = parse_sample(argv)
        cmd = torchrun_command(a, [*SAMPLE_ENTRY, *rest])
    except ValueError as e:
        print(f"vidtrain-launch: error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(shlex.join(cmd))
        return 0
    return run_ranks(cmd, a)


def main(argv: list[str] | None = None) -> int:
    quiet.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sample"]:
        return _sample(argv[1:])
    try:
        a = parse(argv)
        if a.launcher == "slurm":
            return _slurm(a)
        cmd = deepspeed_command(a) if a.launcher == "deepspeed" else torchrun_command(a)
    except ValueError as e:
        print(f"vidtrain-launch: error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        print(shlex.join(cmd))
        return 0
    return run_ranks(cmd, a)


def rank_env(a: argparse.Namespace) -> dict[str, str]:
    """The ranks' environment: --verbose passed on; on a machine without CUDA the accelerator
    named for DeepSpeed (its probe would warn once per process) and torchrun's OMP_NUM_THREADS=1
    set as torchrun would (it warns when it has to)."""
    env = dict(os.environ)
    if a.verbose:
        env[quiet.VERBOSE_ENV] = "1"
    if a.launcher == "deepspeed" and "DS_ACCELERATOR" not in env:
        import torch  # lazy: only a local deepspeed launch asks which accelerator this is

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    if a.launcher == "torchrun" and a.nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_ranks(cmd: list[str], a: argparse.Namespace) -> int:
    """Start the ranks, say so, and pass their output through minus the listed noise."""
    world = a.nproc * a.nnodes
    print(
        f"[vidtrain-launch] starting {world} {a.launcher} rank(s) on {a.nnodes} node(s); start-up takes "
        "10-90 s (DeepSpeed builds its CPU comm op once, ~70 s); rank 0 reports progress",
        flush=True,
    )
    env = rank_env(a)
    if env.get(quiet.VERBOSE_ENV):
        return subprocess.call(cmd, env=env)
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    for line in proc.stdout:
        if not quiet.noise_line(line):
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.wait()


def _slurm(a: argparse.Namespace) -> int:
    script = sbatch_script(a)
    if a.dry_run:
        print(script, end="")
        return 0
    import tempfile

    path = (
        Path(a.script_out)
        if a.script_out
        else Path(tempfile.mkstemp(prefix="vidtrain-", suffix=".sbatch")[1])
    )
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        print(
            f"vidtrain-launch: error: sbatch not found (is Slurm installed here?); the script is {path}",
            file=sys.stderr,
        )
        return 2
    if out.returncode:
        print(f"vidtrain-launch: sbatch failed: {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    print(f"[vidtrain-launch] submitted job {out.stdout.strip()} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
