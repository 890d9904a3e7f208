"""One holder per run folder: `RUN/vidtrain.lock`, taken atomically by rank 0 of a run.

The lock file names its holder (host, pid, the process's start time, the Slurm job id, when it
was taken). A second run on the same folder gets an error naming the holder. A lock whose
holder is gone is taken over with a message: on the same host when the pid no longer runs (or
runs a different process: pid reuse is told apart by the process start time), on any host when
the lock was taken by the same Slurm job (a requeued job restarts elsewhere under the same id).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "vidtrain.lock"


class RunLockError(ValueError):
    """The run folder is held by another run (or cannot be written)."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime, after "pid (comm)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _me() -> dict:
    pid = os.getpid()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "proc_start": _proc_start(pid),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _stale_reason(holder: dict, me: dict) -> str | None:
    """Why `holder` is gone (so its lock may be taken over), or None while it may still run."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"taken by the same Slurm job {me['slurm_job_id']} (a requeue)"
    if holder.get("host") != me["host"]:
        return None  # another machine: its pids cannot be checked from here
    pid = int(holder.get("pid", -1))
    if pid == me["pid"]:
        return "held by this process"
    if pid <= 0 or not _alive(pid):
        return f"its process {pid} is gone"
    start = holder.get("proc_start")
    if start is not None and _proc_start(pid) not in (None, start):
        return f"pid {pid} now belongs to another process"
    return None


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job} since {holder.get('started')}"


class RunLock:
    """`acquire()` or raise RunLockError; `release()` removes the file if this process holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self.took_over: str | None = None

    def _create(self, info: dict) -> bool:
        """Write the holder's record to a private file, then hard-link it to the lock name: the
        link appears whole or fails if the name exists (atomic, also on NFS)."""
        tmp = self.path.with_name(f".{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def acquire(self) -> RunLock:
        me = _me()
        try:
            for _ in range(3):  # a concurrent take-over may win the race: look again
                if self._create(me):
                    self.held = True
                    return self
                holder = self.read()
                if holder is None and not self.path.exists():  # released meanwhile
                    continue
                if holder is None:  # a lock appears whole: unreadable means damaged by hand
                    reason = "its lock file is unreadable"
                else:
                    reason = _stale_reason(holder, me)
                    if reason is None:
                        raise RunLockError(
                            f"run folder {self.path.parent} is in use by {describe(holder)} "
                            f"(lock {self.path}); use another run.dir, or delete the lock file if that run is gone"
                        )
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                self.took_over = f"took over the lock of {self.path.parent}: {reason}"
        except OSError as e:
            raise RunLockError(f"cannot write to run folder {self.path.parent}: {e.strerror or e}") from None
        raise RunLockError(f"could not take the lock {self.path}: another run keeps taking it")

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if not self.held:
            return
        holder = self.read()
        if (
            holder is not None
            and holder.get("pid") == os.getpid()
            and holder.get("host") == socket.gethostname()
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.held = False
