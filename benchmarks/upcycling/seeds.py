"""Repeats of the upcycling experiment, side by side: each arm's validation loss per seed, its mean with a
95 % t-interval, and each arm's difference to the dense continuation (a) paired by seed, with its interval.

    python benchmarks/upcycling/seeds.py runs/upcycling-long runs/upcycling-long-s1 runs/upcycling-long-s2
"""

import json
import math
import statistics
import sys
from pathlib import Path

from scipy.stats import t as student_t

ARMS = ("a-dense-continued", "b-upcycled-moe", "c-moe-scratch", "d-upcycled-fine")


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval."""
    if len(xs) < 2:
        return xs[0], math.nan
    return statistics.mean(xs), student_t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def main(folders: list[str]) -> None:
    loss = {a: [] for a in ARMS}
    for folder in folders:
        for a in ARMS:
            path = Path(folder) / a / "results.json"
            loss[a].append(json.loads(path.read_text())["val_loss"] if path.is_file() else None)
    arms = [a for a in ARMS if all(v is not None for v in loss[a])]  # arms run at every seed
    print(f"{len(folders)} repeats: {', '.join(folders)}")
    print("| arm | val loss per repeat | mean, 95 % interval | minus (a), paired | 95 % interval |")
    print("|---|---|---|---|---|")
    for a in arms:
        m, h = interval(loss[a])
        diffs = [x - y for x, y in zip(loss[a], loss[ARMS[0]])]
        dm, dh = interval(diffs)
        paired = "" if a == ARMS[0] else f"{dm:+.4f} | [{dm - dh:+.4f}, {dm + dh:+.4f}]"
        print(f"| {a} | {', '.join(f'{x:.4f}' for x in loss[a])} | {m:.4f} +- {h:.4f} | {paired or '- | -'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
