"""Markdown checks shared by the tests of the docs and of the benchmark scripts' printed tables."""

from __future__ import annotations

import re


def markdown_tables_are_rectangular(text: str) -> int:
    """Every markdown table in ``text`` has as many cells in its header and in each row as in its separator (a ``|``
    inside a cell, as in ``T·|Z|``, must be escaped or the table does not render); returns how many tables."""

    def cells(line: str) -> int:
        return len(re.split(r"(?<!\\)\|", line.strip().strip("|")))

    lines, tables, i = text.splitlines(), 0, 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[\s:|-]+\|\s*", lines[i + 1]):
            tables, n, j = tables + 1, cells(lines[i + 1]), i + 2
            assert cells(lines[i]) == n, lines[i]
            while j < len(lines) and lines[j].startswith("|"):
                assert cells(lines[j]) == n, lines[j]
                j += 1
            i = j
        else:
            i += 1
    return tables
