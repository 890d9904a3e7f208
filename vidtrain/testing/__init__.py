"""Test harnesses shipped for users' own equality checks; the library itself never imports them
(an import-linter contract in pyproject.toml holds that)."""
