"""Plain-text tables whose headers line up with their columns, whatever the values' widths."""

from __future__ import annotations

from typing import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-aligned columns, each as wide as its widest cell or header, one space apart."""
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    return [" ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in [list(headers), *rows]]
