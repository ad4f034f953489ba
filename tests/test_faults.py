"""Nothing lost, nothing hangs: kills at random moments and inside checkpoint writes and rotation, runs that
diverge, runs that fail before their first step, and two processes on one folder."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, tree_digest
from mixturelm import checkpoint
from mixturelm.errors import TrainingDiverged
from mixturelm.training import Trainer, new_run_config


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _complete_checkpoints(run: Path) -> list[str]:
    """The step_* folders, each verified against its manifest (an error if any is not complete)."""
    found = sorted(p for p in (run / "checkpoints").glob("step_*"))
    for p in found:
        checkpoint.verify(p)
    return [p.name for p in found]


def _wrote_since(path: Path, t: float) -> bool:
    return path.is_file() and path.stat().st_mtime > t


def _cfg(corpus_dir, **train):
    return new_run_config("dense-debug", {"data": str(corpus_dir), "max_steps": 8, "ckpt_every": 2,
                                          "eval_every": 100} | train)


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    Trainer(_cfg(corpus_dir), out, progress=False, log=lambda m: None).run()
    return _losses(out)


# ---------------------------------------------------------------------------------------------------------
# Kills inside a checkpoint write and inside rotation (in-process: an exception at that instant leaves the
# disk as a kill would, since nothing cleans up after it)

class Killed(BaseException):
    pass


@pytest.mark.parametrize("moment", ["after the weights", "before the manifest", "after renaming out of the series"])
def test_a_kill_inside_a_checkpoint_write_or_rotation_leaves_only_complete_checkpoints(
        corpus_dir, tmp_path, monkeypatch, reference, moment):
    out = tmp_path / "run"
    calls = {"n": 0}
    if moment == "after the weights":
        real = checkpoint.save_file

        def save_file(tensors, path):
            real(tensors, path)
            calls["n"] += 1
            if calls["n"] == 3:  # the third checkpoint (step 6)
                raise Killed
        monkeypatch.setattr(checkpoint, "save_file", save_file)
    elif moment == "before the manifest":
        real_json = checkpoint.write_json_atomic

        def write_json_atomic(path, obj, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Killed
            real_json(path, obj, **kw)
        monkeypatch.setattr(checkpoint, "write_json_atomic", write_json_atomic)
    else:
        real_rmtree = checkpoint.shutil.rmtree

        def rmtree(path, *a, **kw):
            if Path(path).name.startswith(".old-step_"):
                raise Killed  # renamed out of the series, not yet deleted
            real_rmtree(path, *a, **kw)
        monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        Trainer(_cfg(corpus_dir, keep_ckpts=2), out, progress=False, log=lambda m: None).run()
    monkeypatch.undo()
    kept = _complete_checkpoints(out)  # every step_* folder left is whole
    assert kept and (out / "checkpoints" / "latest").read_text() in kept
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers  # what the kill left behind, cleared by the resume:
    logs = []
    Trainer(_cfg(corpus_dir, keep_ckpts=2), out, resume=True, progress=False, log=logs.append).run()
    assert any("removed what an interrupted checkpoint write left" in m for m in logs)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert _losses(out) == reference


def test_a_damaged_newest_checkpoint_is_passed_over_with_a_warning(corpus_dir, tmp_path, reference):
    out = tmp_path / "run"
    Trainer(_cfg(corpus_dir, max_steps=6, keep_ckpts=3), out, progress=False, log=lambda m: None).run()
    newest = out / "checkpoints" / "step_0000006"
    (newest / "model.safetensors").write_bytes(b"half")
    (out / "results.json").unlink()
    logs = []
    Trainer(_cfg(corpus_dir, max_steps=6, keep_ckpts=3), out, resume=True, progress=False, log=logs.append).run()
    assert any(m.startswith("warning: checkpoint") and "passing over it" in m for m in logs)
    assert any("resuming from" in m and "step_0000004" in m for m in logs)
    assert _losses(out) == {s: v for s, v in reference.items() if s <= 6}


# ---------------------------------------------------------------------------------------------------------
# SIGKILL at random moments, checkpoints every step (so that kills land in writes and rotations too)

def test_kills_at_random_moments_then_resume_repeat_the_uninterrupted_losses(corpus_dir, tmp_path):
    common = ["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "60", "--ckpt-every", "1",
              "--keep-ckpts", "2", "--eval-every", "100", "--no-progress"]
    run_cli(*common, "--out", str(tmp_path / "full"), check=True)
    out = tmp_path / "killed"
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed_running = 0
    for kill in range(5):
        args = [*common, "--out", str(out)] + (["--resume"] if (out / "checkpoints" / "latest").is_file() else [])
        if (out / "results.json").is_file():
            break  # finished before the kills ran out
        started = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "mixturelm", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not _wrote_since(metrics, started):
            time.sleep(0.01)  # until this process trains (not while it imports)
        time.sleep(rng.uniform(0.0, 0.6))  # a random moment of training, writing or rotating
        killed_running += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _complete_checkpoints(out)  # only whole checkpoints in the series, whatever the moment
    assert killed_running >= 3, "the kills must land while the runs train"
    run_cli(*common, "--out", str(out), "--resume", check=True)
    want, got = _losses(tmp_path / "full"), _losses(out)
    assert list(got) == list(range(1, 61))
    assert got == pytest.approx(want, abs=1e-6)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------
# Divergence

def test_a_non_finite_loss_stops_training_and_the_run_resumes_exactly(corpus_dir, tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    real = Trainer._train_step

    def step(self, s):  # step 7 (index 6) goes wrong, as a learning rate far too large would make it
        record = real(self, s)
        return record | {"loss": float("nan")} if s == 6 else record
    monkeypatch.setattr(Trainer, "_train_step", step)
    # step 6's checkpoint holds the weights whose loss at step 7 was not finite: dropped; step 4's is named
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7 \(loss nan.*last good checkpoint .*step_0000004"):
        Trainer(_cfg(corpus_dir), out, progress=False, log=lambda m: None).run()
    assert max(_losses(out)) == 6  # nothing of the bad step was kept
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"
    assert not (out / "checkpoints" / "step_0000006").exists()
    monkeypatch.undo()
    Trainer(_cfg(corpus_dir), out, resume=True, progress=False, log=lambda m: None).run()
    assert _losses(out) == reference


def test_a_diverging_run_exits_3_and_starts_again_with_another_learning_rate(corpus_dir, tmp_path):
    """--lr 1e30: step 1's loss is finite, its update is not; step 2's loss is not. The checkpoint of step 1
    holds the weights that diverged, so it is dropped, and the same command with a sane rate trains."""
    out = tmp_path / "run"
    common = ["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "6", "--ckpt-every", "1",
              "--warmup-steps", "0", "--eval-every", "100", "--no-progress", "--out", str(out)]
    proc = run_cli(*common, "--lr", "1e30")
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "training diverged at step 2" in last and "no checkpoint from before it remains" in last, last
    assert "--lr" in last  # the flag, not the field name
    assert not list((out / "checkpoints").glob("step_*"))
    again = run_cli(*common, "--lr", "1e-3")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "results.json").read_text())["steps"] == 6


# ---------------------------------------------------------------------------------------------------------
# A run that fails before its first step does not block its rerun; two processes on one folder

def test_a_run_that_failed_before_its_first_checkpoint_starts_again(corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def boom(self, s):
        raise RuntimeError("out of memory, say")
    monkeypatch.setattr(Trainer, "_train_step", boom)
    with pytest.raises(RuntimeError):
        Trainer(_cfg(corpus_dir), out, progress=False, log=lambda m: None).run()
    monkeypatch.undo()
    Trainer(_cfg(corpus_dir), out, progress=False, log=lambda m: None).run()  # the same command, no --overwrite
    assert max(_losses(out)) == 8


def test_a_second_process_on_the_same_folder_is_refused_with_one_line(corpus_dir, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "100000", "--eval-every",
              "100000", "--ckpt-every", "5", "--no-progress", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "mixturelm", *common], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "latest").is_file():
            time.sleep(0.02)
        for extra in (["--resume"], ["--overwrite"], []):
            proc = run_cli(*common, *extra)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr
            # resume and overwrite pass the checks and meet the lock; a plain start is refused before it
            expected = "holds a training run already" if not extra else "is being written by another mixturelm process"
            assert expected in lines[0], lines[0]
        assert first.poll() is None, "the first run must still be going"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = list(_losses(out))
    assert steps == list(range(1, len(steps) + 1))  # every record once, in order: no second writer


def test_a_bad_value_with_overwrite_leaves_the_old_run(corpus_dir, tmp_path):
    out = tmp_path / "run"
    run_cli("train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "2", "--no-progress",
            "--out", str(out), check=True)
    before = tree_digest(out)
    proc = run_cli("train", "--preset", "dense-debug", "--data", str(corpus_dir), "--batch-size", str(10**12),
                   "--overwrite", "--out", str(out))
    assert proc.returncode == 2 and "needs about" in proc.stderr
    assert tree_digest(out) == before


@pytest.mark.slow  # a minute; a run killed at random moments and resumed is tested by default above
def test_a_compare_killed_twice_resumes_to_the_uninterrupted_results(corpus_dir, tmp_path):
    common = ["compare", "--data", str(corpus_dir), "--archs", "dense,mod", "--size", "debug", "--flops", "3e11",
              "--evals", "2", "--eval-tokens", "4096", "--view-tokens", "64", "--no-progress"]
    run_cli(*common, "--out", str(tmp_path / "full"), check=True)
    out = tmp_path / "killed"
    rng = random.Random(7)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "mixturelm", *common, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_cli(*common, "--out", str(out), check=True)
    want = {r["name"]: r["val_loss"] for r in json.loads((tmp_path / "full" / "results.json").read_text())["runs"]}
    got = {r["name"]: r["val_loss"] for r in json.loads((out / "results.json").read_text())["runs"]}
    assert got == pytest.approx(want, abs=1e-6)


def test_a_diverging_compare_run_names_the_run_and_a_fix_compare_accepts(corpus_dir, tmp_path, monkeypatch):
    from mixturelm.compare import CompareConfig, run_compare

    real = Trainer._train_step

    def step(self, s):
        record = real(self, s)
        return record | {"loss": float("inf")} if s == 3 else record
    monkeypatch.setattr(Trainer, "_train_step", step)
    cc = CompareConfig(archs=("dense",), sizes=("debug",), budgets=(1e11,), data=str(corpus_dir), evals=2,
                       eval_tokens=2048, view_tokens=32)
    with pytest.raises(TrainingDiverged, match=r"dense-debug diverged at step 4 .*`overwrite=True`") as e:
        run_compare(cc, tmp_path / "cmp", progress=False, log=lambda m: None)
    assert e.value.step == 4
