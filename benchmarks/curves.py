"""Print the validation-loss curves of several run directories side by side.

    python benchmarks/curves.py runs/check-dense-tiny runs/check-moe-tiny
"""

import json
import sys
from pathlib import Path


def evals(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}


def main(runs: list[str]) -> None:
    curves = {Path(r).name: evals(Path(r)) for r in runs}
    steps = sorted(set().union(*curves.values()))
    width = max(12, *(len(name) + 2 for name in curves))  # long names stay apart
    print(f"{'step':>6}" + "".join(f"{name:>{width}}" for name in curves))
    for s in steps:
        print(f"{s:>6}" + "".join(f"{c.get(s, float('nan')):>{width}.4f}" for c in curves.values()))
    for name, run in zip(curves, runs):
        res = json.loads((Path(run) / "results.json").read_text())
        print(f"{name}: {res['params']:,} params, {res['forward_flops_per_token']:.3g} forward FLOPs/token, "
              f"{res['wall_s']:.0f} s, final val loss {res['val_loss']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
