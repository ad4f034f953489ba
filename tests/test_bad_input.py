"""Every command against bad values, foreign folders and damaged files: one line naming the problem and the
fix, exit status 2, and nothing written or changed anywhere in the folder the command was pointed at.

The table runs the commands in this process (main(argv), as the console script does) so that it stays fast;
the cases that need a second process, a read-only or a full file system, or a kill are below it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tree_digest
from mixturelm.cli import main

FLOAT = ["nan", "inf", "-inf", "1e30", "-1"]


@pytest.fixture(scope="module")
def world(corpus_dir, tmp_path_factory):
    """A folder holding what a user has: a finished run, a second run, a damaged run, a project folder of
    their own with a config.json, a plain file, and NIFTY predictions that are not UTF-8."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("world")
    run_cli("train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "3", "--out",
            str(root / "run"), "--no-progress", check=True)
    shutil.copytree(root / "run", root / "run2")
    shutil.copytree(root / "run", root / "damaged")
    weights = next((root / "damaged" / "checkpoints").glob("step_*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for name, damage in (("mismatched", _config_off), ("state_cut", _state_cut), ("weights_cut", _weights_cut)):
        shutil.copytree(root / "run", root / name)
        ckpt = next((root / name / "checkpoints").glob("step_*"))
        damage(ckpt)
        _rewrite_manifest(ckpt)  # the damage is not caught by the sizes and sums: what reading it gives is
        (root / name / "results.json").unlink()  # not finished: a resume loads the checkpoint
    (root / "old_compare" / "runs").mkdir(parents=True)  # a compare written before folders were marked
    (root / "old_compare" / "compare.json").write_text('{"shared": {}}')
    (root / "old_compare" / "results.json").write_text('{"machine": {}, "command": "mixturelm compare"}')
    (root / "project").mkdir()
    (root / "project" / "config.json").write_text("{}")
    (root / "project" / "main.py").write_text("print('my work')\n")
    (root / "file.txt").write_text("a file, not a folder\n")
    bad = root / "nifty" / "all-experts_seed-42"
    bad.mkdir(parents=True)
    (bad / "df_x.csv").write_bytes(b"date,label,predicted_label\n2020-01-01,\xff\xfe,Rise\n")
    return root


def _rewrite_manifest(ckpt: Path) -> None:
    import hashlib

    meta = json.loads((ckpt / "meta.json").read_text())
    for name in meta["files"]:
        data = (ckpt / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _config_off(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model"]["d_ffn"] = cfg["model"]["d_ffn"] * 2
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _state_cut(ckpt: Path) -> None:
    f = ckpt / "train_state.pt"
    f.write_bytes(f.read_bytes()[:2000])


def _weights_cut(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:3000])


# (arguments with {placeholders}, what the one line must say)
CASES = [
    # train: values checked before the old run in --out is touched, even with --overwrite
    (["train", "--overwrite", "--out", "{run}", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["train", "--overwrite", "--out", "{run}", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["train", "--overwrite", "--out", "{run}", "--max-flops", "nan"], "--max-flops must be a finite number"),
    (["train", "--overwrite", "--out", "{run}", "--max-flops", "inf"], "--max-flops must be a finite number"),
    (["train", "--overwrite", "--out", "{run}", "--max-flops", "1e30"], "more than 1,000,000,000"),
    (["train", "--overwrite", "--out", "{run}", "--max-steps", str(10**30)], "more than 1,000,000,000"),
    (["train", "--overwrite", "--out", "{run}", "--max-tokens", str(10**30)], "more than 1,000,000,000"),
    (["train", "--overwrite", "--out", "{run}", "--batch-size", str(10**12)], "needs about"),
    (["train", "--overwrite", "--out", "{run}", "--seq-len", str(10**9)], "needs about"),
    (["train", "--overwrite", "--out", "{run}", "--d-model", str(2**20), "--n-heads", "1"], "needs about"),
    (["train", "--overwrite", "--out", "{run}", "--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["train", "--overwrite", "--out", "{run}", "--preset", "moe-debug", "--n-experts", str(10**9)], "needs about"),
    (["train", "--overwrite", "--out", "{run}", "--preset", "moe-debug", "--capacity-factor", "nan"],
     "--capacity-factor must be"),
    (["train", "--overwrite", "--out", "{run}", "--preset", "moe-debug", "--capacity-factor", "1e30"],
     "--capacity-factor"),
    (["train", "--overwrite", "--out", "{run}", "--preset", "mod-debug", "--capacity", "nan"], "--capacity"),
    # train: folders that are not this run's
    (["train", "--overwrite", "--out", "{project}"], "left alone"),
    (["train", "--out", "{project}"], "left alone"),
    (["train", "--out", "{run}"], "holds a training run already"),
    (["train", "--out", "{file}"], "is a file"),
    (["train", "--resume", "--out", "{damaged}"], "is corrupt"),
    (["train", "--resume", "--out", "{state_cut}"], "train_state.pt cannot be read"),
    (["train", "--resume", "--out", "{weights_cut}"], "model.safetensors cannot be read"),
    (["eval", "--ckpt", "{mismatched}"], "does not fit its config"),
    (["generate", "--ckpt", "{weights_cut}"], "model.safetensors cannot be read"),
    # eval
    (["eval", "--ckpt", "{run}", "--max-tokens", "0"], "--max-tokens must be a positive integer"),
    (["eval", "--ckpt", "{run}", "--max-tokens", "-1"], "--max-tokens must be a positive integer"),
    (["eval", "--ckpt", "{run}", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["eval", "--ckpt", "{run}", "--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["eval", "--ckpt", "{run}", "--out", "{run2}"], "holds a training run"),
    (["eval", "--ckpt", "{run}", "--out", "{project}"], "left alone"),
    (["eval", "--ckpt", "{run}", "--out", "{file}"], "is a file"),
    (["eval", "--ckpt", "{damaged}"], "is corrupt"),
    # generate
    (["generate", "--ckpt", "{run}", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "--ckpt", "{run}", "--temperature", "inf"], "--temperature must be a finite number"),
    (["generate", "--ckpt", "{run}", "--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["generate", "--ckpt", "{run}", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "--ckpt", "{run}", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["generate", "--ckpt", "{run}", "--max-new-tokens", str(10**9)], "needs about"),
    (["generate", "--ckpt", "{run}", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["generate", "--ckpt", "{run}", "--num-samples", str(10**10)], "needs about"),
    (["generate", "--ckpt", "{damaged}"], "is corrupt"),
    # flops
    (["flops", "--seq-len", "0"], "--seq-len must be positive"),
    (["flops", "--seq-len", "-5"], "--seq-len must be positive"),
    (["flops", "--vocab-size", "0"], "--vocab-size must be a positive integer"),
    (["flops", "--ckpt", "{damaged}"], "is corrupt"),
    # inspect
    (["inspect", "--ckpt", "{run}", "--text", "x", "--out", "{run2}"], "holds a training run"),
    (["inspect", "--ckpt", "{run}", "--text", "x", "--out", "{project}", "--overwrite"], "left alone"),
    (["inspect", "--ckpt", "{run}", "--text", "x", "--out", "{new}", "--max-tokens", "0"], "--max-tokens must be"),
    (["inspect", "--ckpt", "{run}", "--text", "", "--out", "{new}"], "the text is empty"),
    (["inspect", "--ckpt", "{damaged}", "--text", "x", "--out", "{new}"], "is corrupt"),
    # ensemble
    (["ensemble", "nifty", "--out", "{run2}"], "holds a training run"),
    (["ensemble", "nifty", "--out", "{new}", "--resamples", "5"], "--resamples must be >= 10"),
    (["ensemble", "nifty", "--out", "{new}", "--data", "{nifty}", "--pools", "all", "--seeds", "42"],
     "is not a UTF-8 CSV"),
    (["ensemble", "lm", "--experts", "{run}", "--data", "{file}", "--out", "{run2}"], "holds a training run"),
    (["ensemble", "lm", "--experts", "{run}", "{run2}", "--data", "{file},{project}", "--out", "{new}",
      "--segment-len", "0"],
     "segment"),
    # bench
    (["bench", "moe", "--threads", "0"], "--threads must be a positive integer"),
    (["bench", "train", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["bench", "mod", "--steps", "0"], "--steps must be a positive integer"),
    (["bench", "moe", "--tokens", "-3"], "--tokens must be a positive integer"),
    (["bench", "moe", "--out", "{file}"], "is a file"),
    (["bench", "moe", "--out", "{run2}"], "holds a training run"),
    (["bench", "moe", "--out", "{old_compare}", "--overwrite"], "left alone"),
    (["bench", "compile", "--presets", "dense-debug,nope"], "unknown preset(s) nope"),
    # compare
    (["compare", "--flops", "1e30", "--out", "{new}"], "--flops 1e+30 gives"),
    (["compare", "--flops", "nan", "--out", "{new}"], "--flops"),
    (["compare", "--eval-tokens", "0", "--out", "{new}"], "--eval-tokens must be at least 1"),
    (["compare", "--batch-size", "0", "--out", "{new}"], "--batch-size must be at least 1"),
    (["compare", "--out", "{run2}"], "holds a training run"),
    (["compare", "--out", "{project}", "--overwrite"], "left alone"),
]


def _argv(args: list[str], world: Path, corpus_dir: Path) -> list[str]:
    places = {"run": world / "run", "run2": world / "run2", "damaged": world / "damaged", "project": world / "project",
              "mismatched": world / "mismatched", "state_cut": world / "state_cut", "weights_cut": world / "weights_cut",
              "file": world / "file.txt", "new": world / "new", "nifty": world / "nifty",
              "old_compare": world / "old_compare"}
    argv = [a.format(**{k: str(v) for k, v in places.items()}) for a in args]
    if argv[0] == "train" and "--resume" not in argv:
        budget = [] if {"--max-steps", "--max-tokens", "--max-flops"} & set(argv) else ["--max-steps", "2"]
        argv[1:1] = ["--data", str(corpus_dir), *budget, "--no-progress"]
        if "--preset" not in argv:
            argv[1:1] = ["--preset", "dense-debug"]
    if argv[0] == "compare":
        argv[1:1] = ["--data", str(corpus_dir), "--archs", "dense", "--size", "debug", "--no-progress"]
    return argv


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, corpus_dir, capsys, args, needle):
    before = tree_digest(world)
    code = main(_argv(args, world, corpus_dir))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and "error" in err[-1] and needle in err[-1], err
    assert [line for line in err if "error" in line] == [err[-1]], err  # one error line, the last
    assert tree_digest(world) == before
    assert not (world / "new").exists()


# ---------------------------------------------------------------------------------------------------------
# Every numeric option of the configs: any float is accepted as a valid value or refused with a UsageError
# naming the field; never another exception, never a NaN or infinity let through.

def _numeric_fields():
    import dataclasses

    from mixturelm.config import TrainConfig
    from mixturelm.layers.mod import MoDConfig
    from mixturelm.layers.moe import MoEConfig
    from mixturelm.layers.peer import PEERConfig

    return [(cls, f.name) for cls in (TrainConfig, MoEConfig, MoDConfig, PEERConfig)
            for f in dataclasses.fields(cls) if f.type in ("float", "float | None", "int", "int | None")]


@pytest.mark.parametrize("cls, field", _numeric_fields(), ids=lambda v: getattr(v, "__name__", v))
@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30)))
def test_numeric_config_values_are_valid_or_refused(cls, field, value):
    from mixturelm.errors import UsageError

    try:
        cfg = cls(**{field: value})
    except UsageError as e:
        # the field's own message, or one of a check that ties it to another field (batch_size to
        # grad_accum, top_k to n_experts)
        assert f"{cls.__name__}.{field}" in str(e) or f"{field}=" in str(e), str(e)
        return
    got = getattr(cfg, field)
    if isinstance(got, float):
        assert math.isfinite(got), f"{cls.__name__}.{field}={got} accepted"


# ---------------------------------------------------------------------------------------------------------
# Read-only and full file systems (a small tmpfs; skipped where this process may not mount one)

@pytest.fixture
def tmpfs(tmp_path):
    import subprocess

    mount = tmp_path / "fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the read-only and full-disk cases are not run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _remount(mount: Path, options: str) -> None:
    import subprocess

    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True, capture_output=True)


def test_every_out_on_a_read_only_file_system_is_one_line(tmpfs, world, corpus_dir, capsys):
    _remount(tmpfs, "ro")
    out = str(tmpfs / "out")
    for argv in (["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "1", "--out", out],
                 ["eval", "--ckpt", str(world / "run"), "--out", out],
                 ["inspect", "--ckpt", str(world / "run"), "--text", "x", "--out", out],
                 ["ensemble", "nifty", "--out", out],
                 ["bench", "moe", "--out", out],
                 ["compare", "--data", str(corpus_dir), "--archs", "dense", "--size", "debug", "--out", out]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot be written" in err[0], err


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(tmpfs, corpus_dir, capsys):
    """dense-debug's checkpoints (weights, AdamW moments) are about 1.5 MB: the third does not fit in 4 MB."""
    out = tmpfs / "run"
    argv = ["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "6", "--ckpt-every", "1",
            "--keep-ckpts", "3", "--eval-every", "100", "--no-progress", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no space left on the device while writing checkpoint" in err[-1], err
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint is gone
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept and (out / "checkpoints" / "latest").read_text() == kept[-1]
    _remount(tmpfs, "size=64m")
    assert main(argv + ["--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 6


# ---------------------------------------------------------------------------------------------------------
# Load: many samples of a long prompt, and a prompt whose bytes are not UTF-8

def test_generate_many_samples_of_a_long_prompt(world, capsys):
    prompt = "def f(x):\n    return x\n" * 150  # 3,600 bytes, past the training context of 64
    assert main(["generate", "--ckpt", str(world / "run"), "--prompt", prompt, "--num-samples", "48",
                 "--max-new-tokens", "40", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 48


def test_a_prompt_and_a_text_that_are_not_utf8_are_routed_as_their_bytes(world, tmp_path, capsys):
    raw = "caf\udce9 \udcff"  # what the shell hands over for the bytes b"caf\xe9 \xff"
    assert main(["generate", "--ckpt", str(world / "run"), "--prompt", raw, "--max-new-tokens", "4"]) == 0
    assert main(["inspect", "--ckpt", str(world / "run"), "--text", raw, "--out", str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "inspect.json").read_text())["n_tokens"] == 6


def test_evaluation_tokens_beyond_the_vocabulary_are_one_line(world, monkeypatch, capsys):
    """Tokens the checkpoint's embedding has no row for (a tokenizer that is not the run's) are refused, not
    indexed out of range."""
    import numpy as np

    from mixturelm.data import tokens

    real = tokens.prepare

    def prepare(*args, **kw):
        data = real(*args, **kw)
        data.val.tokens = np.concatenate([np.asarray(data.val.tokens), [300]]).astype(np.int64)
        return data
    monkeypatch.setattr(tokens, "prepare", prepare)
    assert main(["eval", "--ckpt", str(world / "run")]) == 2
    assert "reach id 300, beyond the checkpoint's vocabulary of 257" in capsys.readouterr().err
