"""The source text of the templates a campaign uses, for versioning and plan diffs.

A campaign's sends depend on its templates and on every layout and partial they extend,
include or import, so all of those files are collected (file -> source).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from jinja2 import Environment, TemplateSyntaxError, meta

from nurture.message.rendering import SUFFIX

_PARSER = Environment()


def template_sources(root: Path, names: Iterable[str]) -> dict[str, str]:
    """Map each file the templates ``names`` (e.g. ``b2b/welcome``) read to its source.

    Files are relative POSIX paths under ``root``; references are followed transitively.
    Missing files and unparsable ones are kept as far as they can be read (lint reports
    the errors; this only records what is there).
    """
    pending = [n if n.endswith(SUFFIX) else n + SUFFIX for n in names]
    found: dict[str, str] = {}
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = root / name
        if not path.is_file():
            continue
        source = path.read_text(encoding="utf-8")
        found[name] = source
        try:
            refs = meta.find_referenced_templates(_PARSER.parse(source))
        except TemplateSyntaxError:
            continue
        pending.extend(r for r in refs if r is not None and r not in found)
    return dict(sorted(found.items()))


def source_diff(
    name: str, old: str, new: str, *, max_lines: int = 40
) -> tuple[list[str], int, int]:
    """A unified diff of one template (capped at ``max_lines``), and lines added, removed."""
    lines = list(
        difflib.unified_diff(
            old.splitlines(), new.splitlines(), f"a/{name}", f"b/{name}", n=1, lineterm=""
        )
    )
    added = sum(1 for ln in lines if ln.startswith("+") and not ln.startswith("+++"))
    removed = sum(1 for ln in lines if ln.startswith("-") and not ln.startswith("---"))
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... ({len(lines) - max_lines} more diff lines)"]
    return lines, added, removed
