"""Writing what `mixturelm ensemble` measured: results.json, a markdown report, a terminal table, plots."""

from __future__ import annotations

from pathlib import Path

from ..files import OutputFolder, claim, results_only, write_json_atomic, write_text_atomic
from ..plotting import pyplot

__all__ = ["check_out", "ci", "claim", "markdown_table", "print_table", "pyplot", "write_json", "write_text_atomic"]


ENSEMBLE_KIND = "ensemble report"


def check_out(out: str | Path, overwrite: bool = False) -> OutputFolder:
    """--out: new, empty or (overwrite) an earlier ensemble report; checked before any work so that a bad path
    costs nothing, claimed when the results are written."""
    return OutputFolder(out, ENSEMBLE_KIND, overwrite=overwrite,
                        legacy=lambda p: (p / "report.md").is_file() and results_only("benchmark", "rows")(p)).check().lock()


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

