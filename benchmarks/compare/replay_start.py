"""Train the first steps of a recorded run again, alone, from its config.json, and compare its training losses
with the ones the run recorded: a check that a surprising run is what its seed does, not a fault of the
machine it shared (the run is deterministic on CPU).

    OMP_NUM_THREADS=1 python benchmarks/compare/replay_start.py runs/headline-prose/runs/moe-tiny/seed-0 --steps 12

(the thread count of the recorded run: another changes the rounding of the sums)
"""
import argparse
import json
import tempfile
from pathlib import Path

from mixturelm.training import RunConfig, Trainer


class Enough(Exception):
    pass


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory (config.json, metrics.jsonl)")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    cfg = RunConfig.from_dict(json.loads((args.run / "config.json").read_text()))

    def stop(done: int) -> None:
        if done >= args.steps:
            raise Enough

    with tempfile.TemporaryDirectory() as tmp:
        try:
            Trainer(cfg, Path(tmp) / "replay", device="cpu", progress=False, log=lambda m: None, on_step=stop).run()
        except Enough:
            pass
        again = train_losses(Path(tmp) / "replay")
    recorded = train_losses(args.run)
    worst = max(abs(again[s] - recorded[s]) for s in again)
    for s in sorted(again):
        print(f"step {s:3d}: recorded {recorded[s]:.5f}, again {again[s]:.5f}")
    print(f"largest difference over {len(again)} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
