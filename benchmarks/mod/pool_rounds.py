"""Prefill's speed-up against the FLOP speed-up, and decoding's against the bound on MoD's speed-up, pooled over
the rounds of several `bench mod` runs: each round pairs dense's time with MoD's (results.json, `all_rounds_s`),
so every round is one measurement of the ratio, and runs of the same code are more rounds of one measurement.
Prints, for prefill and per batch size, the rounds, their median, mean, least and greatest, and how many fell
under 90 %.

    python benchmarks/mod/pool_rounds.py runs/bench-mod-a runs/bench-mod-b ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def pooled(folders: list[str]) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {}
    for folder in folders:
        result = json.loads((Path(folder) / "results.json").read_text())
        prefill = next(row for name, row in result["rows"].items() if name.startswith("prefill"))["all_rounds_s"]
        ratios.setdefault("prefill", []).extend(d / m * result["flop_ratio"]
                                                for d, m in zip(prefill["dense"], prefill["MoD"]))
        for batch, x in result["decode"]["batches"].items():
            rounds = x["all_rounds_s"]
            ratios.setdefault(batch, []).extend(d / m / x["bound_speedup"] for d, m in zip(rounds["dense"], rounds["MoD"]))
    return ratios


def main() -> None:
    folders = sys.argv[1:]
    if not folders:
        raise SystemExit("usage: python benchmarks/mod/pool_rounds.py RUN_FOLDER [RUN_FOLDER ...] (bench mod --out folders)")
    print(f"pooled over the rounds of {len(folders)} runs: prefill's speed-up / the FLOP speed-up, and decoding's "
          "speed-up / its bound, at each batch size")
    print(f"{'':>8}{'rounds':>8}{'median':>9}{'mean':>8}{'least':>8}{'greatest':>10}{'under 90 %':>12}")
    for batch, r in sorted(pooled(folders).items(), key=lambda kv: -1 if kv[0] == "prefill" else int(kv[0])):
        label = batch if batch == "prefill" else f"batch {batch}"
        print(f"{label:>8}{len(r):>8}{statistics.median(r):>9.1%}{statistics.mean(r):>8.1%}{min(r):>8.1%}"
              f"{max(r):>10.1%}{sum(v < 0.9 for v in r):>12}")


if __name__ == "__main__":
    main()
