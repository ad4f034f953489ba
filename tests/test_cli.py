"""The command line: each bad input gets one line naming the problem and the fix, exit status 2,
and leaves an existing run untouched; the good paths (eval, generate, flops, presets) work."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli, tree_digest


@pytest.fixture(scope="session")
def trained(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    run_cli("train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "10", "--out", str(out),
            "--no-progress", check=True)
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def assert_usage_error(proc, needle: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], f"expected one error line, last, got:\n{proc.stderr}"
    assert needle in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--dtype", "fp8"], "dtype='fp8' is unknown"),
    (["--tokenizer", "words"], "--tokenizer 'words' is unknown"),
    (["--max-steps", "abc"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--d-model", "-8"], "--d-model must be a positive integer"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--max-flops", "inf"], "--max-flops must be a finite number > 0"),
    (["--d-model", "100", "--n-heads", "3"], "not divisible by n_heads"),
    (["--data", "/no/such/file.txt"], "no such file or folder"),
    (["--max-tokens", "10"], "smaller than one step"),
    (["--max-steps", "5", "--max-tokens", "9999"], "give one budget, not --max-steps and --max-tokens"),
    (["--resume", "--overwrite"], "contradict"),
    (["--batch-size", "6", "--grad-accum", "4"], "not divisible by grad_accum"),
])
def test_bad_train_options(args, needle, corpus_dir, tmp_path):
    base = ["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--out", str(tmp_path / "new")]
    if "--preset" in args:
        base = base[:1] + base[3:]
    if "--data" in args:
        base = [a for a in base if a not in ("--data", str(corpus_dir))]
    assert_usage_error(run_cli(*base, *args), needle)
    assert not (tmp_path / "new").exists(), "a rejected run creates nothing"


def test_empty_data(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = run_cli("train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert_usage_error(proc, "no text found")


def test_too_little_data_for_one_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("just a few words")
    assert_usage_error(run_cli("train", "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o")),
                       "fewer than one sequence")


def test_non_empty_out_is_not_overwritten(run_copy, corpus_dir):
    before = tree_digest(run_copy)
    proc = run_cli("train", "--preset", "dense-debug", "--data", str(corpus_dir), "--out", str(run_copy))
    assert_usage_error(proc, "holds a training run already; continue it (--resume), replace it (--overwrite)")
    assert tree_digest(run_copy) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, corpus_dir):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    proc = run_cli("train", "--data", str(corpus_dir), "--out", str(tmp_path / "precious"), "--overwrite")
    assert_usage_error(proc, "holds files that are not a training run of mixturelm; it is left alone")
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_a_run(run_copy, corpus_dir):
    run_cli("train", "--preset", "dense-debug", "--data", str(corpus_dir), "--out", str(run_copy), "--overwrite",
            "--max-steps", "3", "--no-progress", check=True)
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_0000003"
    assert not (run_copy / "checkpoints" / "step_0000010").exists()


def test_resume_with_a_different_config(run_copy):
    before = tree_digest(run_copy)
    assert_usage_error(run_cli("train", "--out", str(run_copy), "--resume", "--seq-len", "16"),
                       "--seq-len 16 differs from the run's")
    assert_usage_error(run_cli("train", "--out", str(run_copy), "--resume", "--preset", "dense-tiny"),
                       "differs from the run's preset")
    assert tree_digest(run_copy) == before


def test_resume_with_nothing_to_resume(tmp_path):
    assert_usage_error(run_cli("train", "--out", str(tmp_path / "nothing"), "--resume"), "holds no run to resume")


def _latest(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text()


@pytest.mark.parametrize("damage", ["truncate-weights", "flip-state", "drop-meta"])
def test_damaged_checkpoint_is_refused_everywhere(run_copy, damage):
    ckpt = _latest(run_copy)
    if damage == "truncate-weights":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "flip-state":
        f = ckpt / "train_state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        (ckpt / "meta.json").unlink()
    before = tree_digest(run_copy)
    needle = "no readable meta.json" if damage == "drop-meta" else "is corrupt"
    assert_usage_error(run_cli("train", "--out", str(run_copy), "--resume"), needle)
    assert_usage_error(run_cli("eval", "--ckpt", str(run_copy)), needle)
    assert_usage_error(run_cli("generate", "--ckpt", str(run_copy), "--max-new-tokens", "3"), needle)
    assert tree_digest(run_copy) == before


def test_missing_checkpoint_path(tmp_path):
    assert_usage_error(run_cli("eval", "--ckpt", str(tmp_path / "nope")), "no such file or folder")
    (tmp_path / "empty").mkdir()
    assert_usage_error(run_cli("generate", "--ckpt", str(tmp_path / "empty")), "no checkpoint there")


def test_eval_generate_and_flops_of_a_trained_run(trained, tmp_path):
    proc = run_cli("eval", "--ckpt", str(trained), "--out", str(tmp_path / "ev"), check=True)
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    summary = json.loads((trained / "results.json").read_text())
    assert res["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)  # the same tokens as training's eval
    assert "bits/byte" in proc.stdout
    gen = run_cli("generate", "--ckpt", str(trained), "--prompt", "the model", "--max-new-tokens", "20",
                  "--num-samples", "2", "--top-k", "5", "--top-p", "0.9", check=True)
    assert gen.stdout.count("the model") == 2
    assert_usage_error(run_cli("generate", "--ckpt", str(trained), "--prompt", ""), "prompt is empty")
    assert_usage_error(run_cli("generate", "--ckpt", str(trained), "--top-p", "2"), "--top-p must be in")
    flops = json.loads(run_cli("flops", "--ckpt", str(trained), "--json", check=True).stdout)
    assert flops["train_per_token"] == pytest.approx(3 * flops["forward_total"])
    assert summary["forward_flops_per_token"] == pytest.approx(flops["forward_total"])


def test_help_and_presets():
    for cmd in ("train", "eval", "generate", "flops", "bench"):
        assert run_cli(cmd, "--help").returncode == 0
    out = run_cli("train", "--list-presets", check=True).stdout
    assert all(f"dense-{s}" in out for s in ("debug", "tiny", "small", "medium", "large"))
    text = run_cli("flops", "--preset", "dense-small", check=True).stdout
    assert "attn_scores" in text and "training" in text


def test_bad_device_and_out_that_is_a_file(tmp_path, corpus_dir, trained):
    assert_usage_error(run_cli("train", "--data", str(corpus_dir), "--out", str(tmp_path / "o"), "--device", "foo"),
                       "is not a device")
    assert not (tmp_path / "o").exists()
    (tmp_path / "afile").write_text("x")
    assert_usage_error(run_cli("train", "--data", str(corpus_dir), "--out", str(tmp_path / "afile")), "is a file")
    assert_usage_error(run_cli("eval", "--ckpt", str(trained), "--out", str(tmp_path / "afile")), "is a file")


def test_resume_with_a_corrupt_config(run_copy):
    (run_copy / "config.json").write_text("{not json")
    assert_usage_error(run_cli("train", "--out", str(run_copy), "--resume"), "unreadable")


def test_resume_after_a_half_written_metrics_line(run_copy):
    with open(run_copy / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 11, "lo')  # what a kill in the middle of a write leaves
    run_cli("train", "--out", str(run_copy), "--resume", "--no-progress", check=True)
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] <= 10 for line in lines)
