"""Row-sparse (lazy) Adam against dense-gradient AdamW on PEER's expert tables: the validation loss of short
runs of peer-debug with 256^2 experts (about a fifth of the rows retrieved per step, as in peer-tiny), both
paths at the same seeds, and the paired difference with its 95 % interval.

    python benchmarks/peer/lazy_vs_dense.py OUT_DIR [STEPS] [SEEDS]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from mixturelm.training import Trainer, new_run_config

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, two-sided 95 %, by degrees of freedom


def run(out: Path, steps: int, seed: int, sparse: bool) -> float:
    cfg = new_run_config("peer-debug", {"max_steps": steps, "seed": seed, "eval_every": steps},
                         block_overrides={"peer": {"n_experts": 256 * 256, "sparse_grad": sparse}})
    folder = out / f"{'rows' if sparse else 'dense'}-s{seed}"
    return Trainer(cfg, folder, resume=folder.exists(), progress=False, log=lambda m: None).run()["val_loss"]


def main() -> None:
    out = Path(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    seeds = [int(s) for s in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0, 1, 2]
    rows = {s: run(out, steps, s, True) for s in seeds}
    dense = {s: run(out, steps, s, False) for s in seeds}
    print(f"peer-debug, 256^2 experts, {steps} steps; validation loss by seed")
    print(f"{'seed':>6}{'row-sparse Adam':>17}{'dense AdamW':>13}{'difference':>12}")
    for s in seeds:
        print(f"{s:>6}{rows[s]:>17.4f}{dense[s]:>13.4f}{rows[s] - dense[s]:>+12.4f}")
    diffs = [rows[s] - dense[s] for s in seeds]
    mean = statistics.mean(diffs)
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    print(f"mean difference (row-sparse - dense) {mean:+.4f}, 95 % interval [{mean - half:+.4f}, {mean + half:+.4f}]")
    (out / "lazy_vs_dense.json").write_text(json.dumps({"steps": steps, "rows": rows, "dense": dense}, indent=1))


if __name__ == "__main__":
    main()
