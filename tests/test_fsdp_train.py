"""`mixturelm train --fsdp` under torchrun (CPU, gloo): the parameters sharded with FSDP2 (the expert slices
apart under --expert-parallel), the per-step losses equal to one process with the same micro-batches, and
checkpoints written by every process with torch.distributed.checkpoint that one process reads.

As in test_expert_parallel_train.py, the single process accumulates as many micro-batches as the parallel
run has over all its processes (the balance loss is per micro-batch)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from mixturelm import checkpoint
from test_expert_parallel_train import ARGS, _losses

STEP6 = "step_0000006"


def _torchrun(n: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "mixturelm", *args], capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(ckpt) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, whole, whichever its format."""
    if checkpoint.is_sharded(ckpt):
        return {k.removeprefix("model."): v for k, v in checkpoint.read_sharded(ckpt, "model.").items()}
    return load_file(ckpt / checkpoint.MODEL_FILE)


def _same_losses(one, many):
    (train1, eval1), (train2, eval2) = _losses(one), _losses(many)
    assert list(train1) == list(train2) == list(range(1, 7))
    for step in train1:
        assert train2[step] == pytest.approx(train1[step], abs=2e-5), f"step {step}"
    assert list(eval1) == list(eval2)
    for step in eval1:
        assert eval2[step] == pytest.approx(eval1[step], abs=2e-5), f"eval at step {step}"


def _same_weights(a, b, atol):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=0, msg=k)


# the sigmoid_bias router: its bias moves from loads summed over processes; its balance loss (weight 1e-4) is
# the only term a micro-batch's size changes, so one process may resume the 2-process run (next test)
SIGMOID = ["--router", "sigmoid_bias"]


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """One process (--grad-accum 2) and 2 processes with --fsdp --expert-parallel 2, 6 steps of moe-debug."""
    root = tmp_path_factory.mktemp("fsdp")
    args = [*ARGS, "--data", str(corpus_dir), *SIGMOID]
    run_cli(*args, "--grad-accum", "2", "--out", str(root / "one"), check=True)
    _torchrun(2, *args, "--fsdp", "--expert-parallel", "2", "--out", str(root / "fsdp-ep"))
    return root


def test_fsdp_with_expert_parallel_matches_one_process(runs):
    _same_losses(runs / "one", runs / "fsdp-ep")
    ckpt = runs / "fsdp-ep" / "checkpoints" / STEP6
    assert checkpoint.is_sharded(ckpt) and not (ckpt / checkpoint.MODEL_FILE).exists()
    shards = sorted(p.name for p in (ckpt / checkpoint.DCP_DIR).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own
    _same_weights(runs / "one" / "checkpoints" / STEP6, ckpt, atol=1e-5)


def test_fsdp_alone_matches_one_process(corpus_dir, tmp_path):
    """The softmax router with its balance loss; the experts sharded by FSDP like any parameter."""
    args = [*ARGS, "--data", str(corpus_dir)]
    run_cli(*args, "--grad-accum", "2", "--out", str(tmp_path / "one"), check=True)
    _torchrun(2, *args, "--fsdp", "--out", str(tmp_path / "fsdp"))
    _same_losses(tmp_path / "one", tmp_path / "fsdp")
    _same_weights(tmp_path / "one" / "checkpoints" / STEP6, tmp_path / "fsdp" / "checkpoints" / STEP6, atol=1e-5)


def test_one_process_resumes_a_sharded_checkpoint_exactly(corpus_dir, runs, tmp_path):
    """From the step-3 checkpoint of the 2-process run, one process (no --fsdp, no expert parallelism; the
    run's --grad-accum 1, so micro-batches of 8 rows instead of 4) trains on to the weights the 2-process run
    ended on (up to the float sums' order and the 1e-4 balance loss of bigger micro-batches)."""
    run = tmp_path / "resumed"
    shutil.copytree(runs / "fsdp-ep", run)
    shutil.rmtree(run / "checkpoints" / STEP6)
    (run / "checkpoints" / "latest").write_text("step_0000003")
    (run / "results.json").unlink()
    run_cli(*ARGS, "--data", str(corpus_dir), *SIGMOID, "--out", str(run), "--resume", check=True)
    assert not checkpoint.is_sharded(run / "checkpoints" / STEP6)
    _same_weights(runs / "fsdp-ep" / "checkpoints" / STEP6, run / "checkpoints" / STEP6, atol=1e-5)


def test_eval_reads_a_sharded_checkpoint(runs):
    """One process, no process group: the loss the 2-process run measured at its last step."""
    proc = run_cli("eval", "--ckpt", str(runs / "fsdp-ep" / "checkpoints" / STEP6), check=True)
    val_loss = _losses(runs / "fsdp-ep")[1][6]
    assert f"loss {val_loss:.4f}" in proc.stdout, proc.stdout


def test_a_missing_shard_is_one_line(runs, tmp_path):
    ckpt = tmp_path / STEP6
    shutil.copytree(runs / "fsdp-ep" / "checkpoints" / STEP6, ckpt)
    (ckpt / checkpoint.DCP_DIR / "__1_0.distcp").unlink()
    proc = run_cli("eval", "--ckpt", str(ckpt))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "__1_0.distcp" in proc.stderr, proc.stderr


def test_a_corrupt_index_or_shard_behind_the_manifest_is_a_usage_error(runs, tmp_path):
    """Past meta.json (as if rewritten to match): an index that cannot be read, a shard it names that is gone,
    a truncated shard (DCP raises a BaseException for it) each give a UsageError naming the file."""
    ckpt = tmp_path / STEP6
    shutil.copytree(runs / "fsdp-ep" / "checkpoints" / STEP6, ckpt)
    shard = ckpt / checkpoint.DCP_DIR / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(checkpoint.UsageError, match=r"shards in dcp/ cannot be read"):
        checkpoint.read_sharded(ckpt, "model.")
    shard.unlink()
    with pytest.raises(checkpoint.UsageError, match=r"shard file dcp/__1_0\.distcp is missing"):
        checkpoint.read_sharded(ckpt, "model.")
    (ckpt / checkpoint.DCP_METADATA).write_bytes(b"not a pickle")
    with pytest.raises(checkpoint.UsageError, match=r"dcp/\.metadata cannot be read"):
        checkpoint.read_sharded(ckpt, "model.")


def test_fsdp_on_one_process_is_refused(corpus_dir, tmp_path):
    proc = run_cli("train", "--preset", "moe-debug", "--data", str(corpus_dir), "--max-steps", "1", "--fsdp",
                   "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "torchrun" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_fsdp_refuses_peer(corpus_dir, tmp_path):
    """Under torchrun each process prints the line and exits 2 (torchrun itself then exits 1, with the
    launcher's own traceback, no frame of mixturelm's)."""
    proc = _torchrun(2, "train", "--preset", "peer-debug", "--data", str(corpus_dir), "--max-steps", "1",
                     "--fsdp", "--no-progress", "--out", str(tmp_path / "peer"), check=False)
    assert proc.returncode != 0, proc.stderr[-2000:]
    # the two processes' lines may interleave on the shared stderr
    assert proc.stderr.count("mixturelm train: error: --fsdp cannot shard PEER") == 2, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and "mixturelm" in line]
    assert not (tmp_path / "peer").exists()


@pytest.mark.slow
def test_mod_blocks_around_moe_layers(corpus_dir, tmp_path):
    """mode-staged: MoD's predictor (a side network, clipped under its own norm over the shards), a MoE
    layer seeing a routed subset of the tokens, and evaluation's second (causal) pass, all sharded."""
    args = [*ARGS, "--data", str(corpus_dir), "--preset", "mode-staged-debug", "--mod-causal", "predictor"]
    run_cli(*args, "--grad-accum", "2", "--out", str(tmp_path / "one"), check=True)
    _torchrun(2, *args, "--fsdp", "--expert-parallel", "2", "--out", str(tmp_path / "fsdp"))
    _same_losses(tmp_path / "one", tmp_path / "fsdp")
    _same_weights(tmp_path / "one" / "checkpoints" / STEP6, tmp_path / "fsdp" / "checkpoints" / STEP6, atol=1e-5)


@pytest.mark.slow
def test_fsdp_compiled_matches_eager(runs, corpus_dir, tmp_path):
    """torch.compile over the FSDP2 model: the losses of one process (as the eager run's)."""
    args = [*ARGS, "--data", str(corpus_dir), *SIGMOID]
    _torchrun(2, *args, "--fsdp", "--compile", "--out", str(tmp_path / "compiled"))
    _same_losses(runs / "one", tmp_path / "compiled")


@pytest.mark.slow
def test_a_single_device_checkpoint_resumed_sharded(corpus_dir, tmp_path):
    """One process's step-3 checkpoint, resumed by 2 processes with --fsdp --expert-parallel 2: the full
    moments cut to FSDP's shards and the expert slices; the same weights as the one process at step 6."""
    args = [*ARGS, "--data", str(corpus_dir), *SIGMOID]
    run_cli(*args, "--out", str(tmp_path / "one"), check=True)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "one", run)
    shutil.rmtree(run / "checkpoints" / STEP6)
    (run / "checkpoints" / "latest").write_text("step_0000003")
    (run / "results.json").unlink()
    _torchrun(2, *args, "--fsdp", "--expert-parallel", "2", "--out", str(run), "--resume")
    assert checkpoint.is_sharded(run / "checkpoints" / STEP6)
    _same_weights(tmp_path / "one" / "checkpoints" / STEP6, run / "checkpoints" / STEP6, atol=1e-5)


@pytest.mark.slow
def test_four_processes_then_two(corpus_dir, tmp_path):
    """4 processes in 2 expert-parallel groups of 2 (the experts on a (2, 2) mesh) match one process; their
    step-3 checkpoint resumed by 2 processes with --fsdp alone (another world and expert-parallel size)."""
    args = [*ARGS, "--data", str(corpus_dir), *SIGMOID]
    run_cli(*args, "--grad-accum", "4", "--out", str(tmp_path / "one"), check=True)
    _torchrun(4, *args, "--fsdp", "--expert-parallel", "2", "--out", str(tmp_path / "four"))
    _same_losses(tmp_path / "one", tmp_path / "four")
    run = tmp_path / "two"
    shutil.copytree(tmp_path / "four", run)
    shutil.rmtree(run / "checkpoints" / STEP6)
    (run / "checkpoints" / "latest").write_text("step_0000003")
    (run / "results.json").unlink()
    _torchrun(2, *args, "--fsdp", "--out", str(run), "--resume")
    _same_weights(tmp_path / "four" / "checkpoints" / STEP6, run / "checkpoints" / STEP6, atol=1e-5)


@pytest.mark.slow
def test_a_kill_during_a_sharded_checkpoint_resumes_exactly(corpus_dir, tmp_path):
    """SIGKILL to every process once a shard of the 5th or a later checkpoint is in its temporary folder (or,
    if that moment is missed, after the 8th checkpoint): the run resumes from the previous checkpoint and
    ends on the weights of an uninterrupted run, bit for bit."""
    args = [*ARGS, "--data", str(corpus_dir), "--max-steps", "12", "--ckpt-every", "1", "--eval-every", "100",
            "--fsdp", "--expert-parallel", "2"]
    _torchrun(2, *args, "--out", str(tmp_path / "whole"))
    run = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "mixturelm", *args, "--out", str(run)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (ckpts / "step_0000008").is_dir():
            break
        if (ckpts / "step_0000004").is_dir() and any(any(p.rglob("*.distcp")) for p in ckpts.glob(".tmp-*")):
            break
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists(), "the run finished before the kill"
    assert (ckpts / "latest").read_text() >= "step_0000004"
    _torchrun(2, *args, "--out", str(run), "--resume")
    last = "step_0000012"
    a, b = _weights(tmp_path / "whole" / "checkpoints" / last), _weights(ckpts / last)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    assert not list(ckpts.glob(".tmp-*"))


def test_a_failed_shard_write_reports_its_cause_in_one_line(tmp_path, monkeypatch):
    """DCP wraps a write's OSError in a CheckpointException (a BaseException, which the command line would
    print as a traceback): the trainer reports the OSError itself (one line for a full, read-only or
    forbidden disk), or a UsageError naming the cause when there is none."""
    import torch.distributed.checkpoint as dcp

    from mixturelm.checkpoint import write_failure
    from mixturelm.errors import UsageError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file where the checkpoint's folder should go")
    with pytest.warns(UserWarning):  # DCP's "saving in a single process"
        with pytest.raises(BaseException) as caught:
            dcp.save({"a": torch.zeros(3)}, checkpoint_id="taken", no_dist=True)
    assert not isinstance(caught.value, Exception)
    assert isinstance(write_failure(caught.value), FileExistsError)
    wrapped = type(caught.value)("save failed", {0: (ValueError("bad tensor"), None)})
    line = write_failure(wrapped)
    assert isinstance(line, UsageError) and "bad tensor" in str(line) and "\n" not in str(line)
