"""Data parallelism: 2 CPU processes (gloo) match one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli


def _losses(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    return train, [r for r in recs if r["kind"] == "eval"]


def test_two_processes_match_one(corpus_dir, tmp_path):
    args = ["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "6", "--batch-size", "8",
            "--grad-accum", "2", "--eval-every", "3", "--no-progress"]
    run_cli(*args, "--out", str(tmp_path / "one"), check=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mixturelm", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, one_eval = _losses(tmp_path / "one")
    two, two_eval = _losses(tmp_path / "two")
    assert list(one) == list(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=2e-5), f"step {step}"
    assert [e["val_tokens"] for e in two_eval] == [e["val_tokens"] for e in one_eval]
    for a, b in zip(one_eval, two_eval):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=2e-5)
    # only the main process writes: one checkpoint series, one metrics file
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text() == "step_0000006"
