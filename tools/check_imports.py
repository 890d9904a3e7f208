"""Imports of vidtrain's own modules inside functions hide an arrow of the room graph
(docs/ARCHITECTURE.md, the import-linter contracts in pyproject.toml). Each one must say why on
its line or the line above with a comment containing `lazy:` (e.g. an optional heavy package, or
keeping `vidtrain --help` fast). Exit 1 listing the others."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def own(node: ast.AST) -> str | None:
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vidtrain"):
        return node.module
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name.startswith("vidtrain")]
        return names[0] if names else None
    return None


def _explained(lines: list[str], lineno: int) -> bool:
    """A `lazy:` comment on the import's line, or above the block of imports it belongs to."""
    if "lazy:" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while (i >= 0 and lines[i].strip().startswith(("from ", "import ", ")"))) or (
        i >= 0 and lines[i].startswith(" " * 8) and lines[i].strip().endswith(",")
    ):
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#") and "lazy:" in lines[i]


def local_imports(path: Path) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            name = own(node)
            if name is None:
                continue
            if not _explained(lines, node.lineno):
                found.append(
                    f"{path}:{node.lineno}: {name} imported inside {fn.name}() without a 'lazy:' reason"
                )
    return sorted(set(found))


def main(argv: list[str]) -> int:
    problems = []
    for root in argv or ["vidtrain"]:
        for path in sorted(Path(root).rglob("*.py")):
            problems += local_imports(path)
    for p in problems:
        print(p)
    if problems:
        print(
            f"{len(problems)} import(s) of vidtrain inside functions without a 'lazy:' reason",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
