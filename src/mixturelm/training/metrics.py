"""A run's metrics: metrics.jsonl (one JSON record per line, written by the main process) and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def step_of(line: str) -> int | None:
    """The step of a metrics record, or None for a line a killed run left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def metric_records(run_dir: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl, [] if it has none (a half-written last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if step_of(line) is not None]


def last_record(run_dir: Path, kind: str = "train") -> dict:
    """The last record of a kind ("train" or "eval"), {} if none was written."""
    return next((r for r in reversed(metric_records(run_dir)) if r.get("kind") == kind), {})


def truncate_records(path: Path, step: int) -> None:
    """On resume, drop the records of steps the run is about to redo, and a line half written by a kill."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if step_of(line) is not None and step_of(line) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def records_after(path: Path, step: int) -> list[str]:
    """The whole records of the steps after `step` (lines, newline included)."""
    if not path.is_file():
        return []
    return [line + "\n" for line in path.read_text().splitlines() if (step_of(line) or 0) > step]


class Metrics:
    """metrics.jsonl and TensorBoard, written by the main process only."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        truncate_records(self.path, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
