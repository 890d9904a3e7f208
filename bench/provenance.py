"""Which code produced a set of figures: the git commit (where .git exists) and a tree hash.

    python bench/provenance.py [REPO] [--out provenance.json]

The tree hash is git's own tree id of the working tree's files (blob and tree objects hashed as
git hashes them, computed here in Python, nothing written to .git): for a clean checkout it
equals `git rev-parse HEAD^{tree}`, and a reviewer can recompute it on any copy with this script.
The file list comes from `git ls-files` (tracked + untracked, not ignored: what the device tool
copies) where git and .git are there; on a copy without .git (the GPU machine's working tree)
from a walk of the folder that skips .git and what its .gitignore files name (a subset of
gitignore's rules: globs, a leading or inner "/" anchors to the file's folder, a trailing "/"
matches folders; no "!").
`tree_hash_method` says which list was used.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def _git(repo: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.decode() if r.returncode == 0 else None


def git_files(repo: Path) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files that exist (None without git or .git)."""
    if not (repo / ".git").exists():
        return None
    out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out is None:
        return None
    return sorted({f for f in out.split("\0") if f and os.path.lexists(repo / f)})


def _ignore_rules(folder: Path, base: str) -> list[tuple[str, str, bool, bool]]:
    """(base, glob, anchored, folders only) from `folder`/.gitignore; `base` is folder's path."""
    rules = []
    gi = folder / ".gitignore"
    for line in gi.read_text().splitlines() if gi.is_file() else []:
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        rules.append((base, line.lstrip("/"), anchored, dir_only))
    return rules


def _ignored(rel: str, is_dir: bool, rules) -> bool:
    name = rel.rsplit("/", 1)[-1]
    for base, glob, anchored, dir_only in rules:
        if dir_only and not is_dir:
            continue
        if fnmatch.fnmatchcase(rel.removeprefix(base) if anchored else name, glob):
            return True
    return False


def walk_files(repo: Path) -> list[str]:
    """Files under `repo` minus .git and what the .gitignore files name (folders pruned whole;
    each folder's .gitignore applies below it, as git reads them)."""
    files, rules_of = [], {}
    for root, dirs, names in os.walk(repo):
        base = Path(root).relative_to(repo).as_posix()
        pre = "" if base == "." else base + "/"
        parent = pre.rstrip("/").rpartition("/")[0]
        rules = rules_of.get(parent + "/" if parent else "", []) if pre else []
        rules = rules_of[pre] = rules + _ignore_rules(Path(root), pre)
        keep = []
        for d in dirs:
            full = os.path.join(root, d)
            if d == ".git" or _ignored(pre + d, True, rules):
                continue
            if os.path.islink(full):  # git stores a link to a folder as a link
                names.append(d)
            else:
                keep.append(d)
        dirs[:] = keep
        files += [pre + n for n in names if not _ignored(pre + n, False, rules)]
    return sorted(files)


def _blob(path: Path) -> tuple[str, bytes]:
    if path.is_symlink():
        mode, data = "120000", os.readlink(path).encode()
    else:
        mode = "100755" if os.access(path, os.X_OK) else "100644"
        data = path.read_bytes()
    return mode, hashlib.sha1(b"blob %d\0" % len(data) + data).digest()


def tree_hash(repo: Path, files: list[str]) -> str:
    """git's tree id of `files` (paths relative to repo) as they are on disk."""
    root: dict = {}
    for f in files:
        node = root
        *dirs, name = f.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = _blob(repo / f)

    def write(node: dict) -> bytes:
        entries = []
        for name, v in node.items():
            if isinstance(v, dict):
                entries.append((name + "/", b"40000 " + name.encode() + b"\0" + write(v)))
            else:
                mode, sha = v
                entries.append((name, mode.encode() + b" " + name.encode() + b"\0" + sha))
        body = b"".join(e for _, e in sorted(entries, key=lambda e: e[0].encode()))
        return hashlib.sha1(b"tree %d\0" % len(body) + body).digest()

    return write(root).hex()


def provenance(repo: str | os.PathLike) -> dict:
    repo = Path(repo).resolve()
    files = git_files(repo)
    method = "git ls-files (tracked + untracked, not ignored)"
    if files is None:
        files, method = walk_files(repo), "file walk minus .gitignore (no git repository)"
    commit = _git(repo, "rev-parse", "HEAD") if (repo / ".git").exists() else None
    status = _git(repo, "status", "--porcelain") if commit else None
    return {
        "commit": commit.strip() if commit else None,
        "dirty": bool(status.strip()) if status is not None else None,
        "tree_hash": tree_hash(repo, files),
        "tree_hash_method": method,
        "files": len(files),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("repo", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = provenance(a.repo)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
