"""Writing what `mixturelm ensemble` measured: results.json, a markdown report, a terminal table, plots."""

from __future__ import annotations

from pathlib import Path

from ..files import output_folder, write_json_atomic, write_text_atomic
from ..plotting import pyplot

__all__ = ["check_out", "ci", "markdown_table", "print_table", "pyplot", "write_json", "write_text_atomic"]


def check_out(out: str | Path) -> Path:
    """--out must be a folder (or not exist yet); checked before any work so that a bad path costs nothing."""
    return output_folder(out)


def write_json(path: Path, obj) -> None:
    write_json_atomic(path, obj, sync=False)


def ci(m: dict, digits: int = 3) -> str:
    return f"{m['value']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text without rich
        print(title)
        for r in [header] + rows:
            print("  ".join(f"{c:<24}" for c in r))
        return
    table = Table(title=title, show_lines=False)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    Console(width=max(160, sum(len(h) for h in header) + 60)).print(table)

