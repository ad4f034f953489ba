"""Runs that extend: `train --resume` with a larger budget, the wsd schedule, what a cosine schedule does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixturelm import UsageError
from mixturelm.config import TrainConfig
from mixturelm.training import Trainer, new_run_config, resumed_run_config
from mixturelm.training.optim import Schedule
from conftest import run_cli, tree_digest
from test_cli import assert_usage_error

WSD = {"schedule": "wsd", "decay_fraction": 0.25, "warmup_steps": 2, "eval_every": 4, "ckpt_every": 100}


def records(run_dir: Path, key: str = "loss", kind: str = "train") -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if r["kind"] == kind}


def train_new(out: Path, data: Path, steps: int, log=None, on_step=None, **overrides) -> Trainer:
    cfg = new_run_config("dense-debug", {"data": str(data), "max_steps": steps} | overrides)
    trainer = Trainer(cfg, out, progress=False, log=log or (lambda m: None), on_step=on_step)
    trainer.run()
    return trainer


def extend(out: Path, steps: int, log=None) -> Trainer:
    cfg = resumed_run_config(out, None, {"max_steps": steps})
    trainer = Trainer(cfg, out, resume=True, progress=False, log=log or (lambda m: None))
    trainer.run()
    return trainer


def stop_at(step: int):
    """An on_step callback that interrupts the run after `step` steps, as a kill would."""
    def stop(done: int) -> None:
        if done == step:
            raise KeyboardInterrupt
    return stop


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = (run_dir / "checkpoints" / "latest").read_text()
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


def test_wsd_schedule_by_hand():
    s = Schedule("wsd", warmup=2, total=10, min_ratio=0.1, decay_fraction=0.3)
    assert s.decay_start == 7
    want = [0.5, 1, 1, 1, 1, 1, 1, 1 - 0.9 / 3, 1 - 0.9 * 2 / 3, 0.1]
    assert [s.factor(i) for i in range(10)] == pytest.approx(want)
    longer = Schedule("wsd", 2, 20, 0.1, 0.3)
    assert s.agrees_until(longer) == 7 and longer.agrees_until(s) == 7  # the shorter one decays first
    assert s.agrees_until(s) == 10
    cosine = Schedule("cosine", 2, 10, 0.1)
    assert cosine.agrees_until(Schedule("cosine", 2, 20, 0.1)) == 3  # the warm-up and the first step at the peak
    assert Schedule("wsd", 0, 5, 0.1, 0.0).factor(4) == 1.0  # no decay: constant after the warm-up


@pytest.mark.parametrize("bad", [{"schedule": "linear"}, {"decay_fraction": 1.5}])
def test_bad_schedule_options(bad):
    with pytest.raises(UsageError, match="TrainConfig.(schedule|decay_fraction)"):
        TrainConfig(**bad)


def test_a_finished_wsd_run_extended_is_the_run_trained_to_the_longer_budget(corpus_dir, tmp_path):
    full = tmp_path / "full"
    train_new(full, corpus_dir, 16, **WSD)
    short = tmp_path / "short"
    train_new(short, corpus_dir, 8, **WSD)  # decays from step 6
    before = records(short)
    lines = []
    extend(short, 16, log=lines.append)
    assert any("training again from its checkpoint of step 6" in line for line in lines)
    got, want = records(short), records(full)
    assert list(got) == list(range(1, 17))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), f"step {step}"
    assert records(short, "lr") == pytest.approx(records(full, "lr"))
    assert records(short, "val_loss", "eval") == pytest.approx(records(full, "val_loss", "eval"), abs=1e-6)
    for name, w in weights(full).items():
        torch.testing.assert_close(weights(short)[name], w, rtol=0, atol=1e-6)
    # the 8-step model is kept beside, with its results and the records of its decay
    kept = short / "checkpoints" / "final_0000008"
    assert json.loads((kept / "results.json").read_text())["steps"] == 8
    assert {json.loads(line)["step"] for line in (kept / "metrics.jsonl").read_text().splitlines()} == {7, 8}
    assert records(kept) == {s: before[s] for s in (7, 8)}
    # the point to extend from moved to the new decay's start
    assert sorted(p.name for p in (short / "checkpoints").glob("stable_*")) == ["stable_0000012"]


def test_a_wsd_run_stopped_before_its_decay_resumes_exactly(corpus_dir, tmp_path):
    full = tmp_path / "full"
    train_new(full, corpus_dir, 16, **WSD)
    stopped = tmp_path / "stopped"

    stop = stop_at(5)

    with pytest.raises(KeyboardInterrupt):
        train_new(stopped, corpus_dir, 8, on_step=stop, **(WSD | {"ckpt_every": 5}))
    lines = []
    extend(stopped, 16, log=lines.append)
    assert not any("training again" in line or "changes from" in line for line in lines)
    assert records(stopped) == pytest.approx(records(full), abs=1e-6)


def test_a_cosine_run_extended_says_how_its_rate_changes(corpus_dir, tmp_path):
    out = tmp_path / "run"
    train_new(out, corpus_dir, 8, warmup_steps=2)
    lines = []
    trainer = extend(out, 16, log=lines.append)
    assert any("the learning rate of step 9 changes from" in line and "a cosine schedule of 8 steps becomes one "
               "of 16" in line for line in lines)
    lr = records(out, "lr")
    assert list(lr) == list(range(1, 17))
    cfg = trainer.cfg.train
    assert lr[9] == pytest.approx(cfg.lr * Schedule.of(cfg, 16).factor(8))
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 16


def test_budgets_of_another_kind_and_smaller_ones(corpus_dir, tmp_path):
    out = tmp_path / "run"
    train_new(out, corpus_dir, 8, **WSD)
    tokens = 12 * 8 * 64  # 12 steps of dense-debug's 8 x 64 tokens
    cfg = resumed_run_config(out, None, {"max_tokens": tokens})
    assert (cfg.train.max_steps, cfg.train.max_tokens) == (None, tokens)
    before = tree_digest(out)
    with pytest.raises(UsageError, match="the run has trained 8 steps, more than the budget's 4"):
        Trainer(resumed_run_config(out, None, {"max_steps": 4}), out, resume=True, progress=False,
                log=lambda m: None).run()
    assert tree_digest(out) == before


def test_cli_extends_and_refuses_other_changes(corpus_dir, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--data", str(corpus_dir), "--preset", "dense-debug", "--no-progress", "--out", str(out)]
    run_cli(*common, "--max-steps", "4", "--schedule", "wsd", check=True)
    before = tree_digest(out)
    assert_usage_error(run_cli(*common, "--resume", "--max-steps", "6", "--schedule", "cosine"),
                       "--schedule cosine differs from the run's wsd")
    assert_usage_error(run_cli(*common, "--resume", "--max-steps", "6", "--decay-fraction", "0.5"),
                       "--decay-fraction 0.5 differs from the run's 0.2")
    assert tree_digest(out) == before
    done = run_cli(*common, "--resume", "--max-steps", "6", check=True)
    assert done.stdout.startswith("trained dense-debug for 6 steps")
    assert "TrainConfig.max_steps 4 -> 6" in done.stderr


def test_a_kill_after_the_branch_resumes_from_the_branch_point(corpus_dir, tmp_path):
    """Extended past its decay and killed before the next checkpoint: the branch point is in the series."""
    full = tmp_path / "full"
    train_new(full, corpus_dir, 16, **WSD)
    run = tmp_path / "run"
    train_new(run, corpus_dir, 8, **(WSD | {"keep_ckpts": 1}))  # the decay start is only in stable_*

    stop = stop_at(9)

    cfg = resumed_run_config(run, None, {"max_steps": 16})
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, run, resume=True, progress=False, log=lambda m: None, on_step=stop).run()
    assert (run / "checkpoints" / "latest").read_text() == "step_0000006"
    lines = []
    Trainer(resumed_run_config(run, None, {}), run, resume=True, progress=False, log=lines.append).run()
    assert any("resuming from" in line and "step_0000006" in line for line in lines)
    assert records(run) == pytest.approx(records(full), abs=1e-6)


def test_a_run_stopped_in_its_decay_drops_that_checkpoint(corpus_dir, tmp_path):
    run = tmp_path / "run"

    stop = stop_at(7)

    with pytest.raises(KeyboardInterrupt):
        train_new(run, corpus_dir, 8, on_step=stop, **(WSD | {"ckpt_every": 7}))
    lines = []
    extend(run, 16, log=lines.append)
    assert any("the checkpoint of step 7, part of the way through that decay, is dropped" in line for line in lines)
    assert not list((run / "checkpoints").glob("final_*"))
