"""Shared fixtures: a private token cache, a small deterministic corpus, and a CLI runner."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.use_deterministic_algorithms(False)

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not but "
         "model expert token router depth layer block sequence train loss value mixture compute").split()


def make_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-prose: numpy's PCG64 gives the same words on every machine."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=n_words)
    lines = [" ".join(words[i:i + 12]) + ".\n" for i in range(0, n_words, 12)]
    return "".join(lines)


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["MIXTURELM_CACHE"] = str(path)
    return path


@pytest.fixture(params=["kernel", "torch"])
def kernel_path(request, monkeypatch):
    """Each test twice: with mixturelm's compiled CPU kernels, and with the PyTorch ops (CUDA's path)."""
    from mixturelm.layers import kernels
    if request.param == "torch":
        monkeypatch.setattr(kernels, "library", lambda: None)
    elif kernels.library() is None:
        pytest.skip("no C compiler: the CPU kernels are not built here")
    return request.param


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """40 small text files (~10 KB each) in a folder, one in a subfolder."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "sub").mkdir()
    for i in range(40):
        (d / ("sub" if i == 0 else ".") / f"doc{i:02d}.txt").write_text(make_text(1600, i))
    return d


def run_cli(*args: str, check: bool = False, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-m", "mixturelm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"mixturelm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under path with the hash of its content: to prove nothing was changed. The lock file's
    content (the pid of the last process that held it) is left out; that it exists is not."""
    return {str(p.relative_to(path)): "" if p.name == ".mixturelm-lock" else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_train_refuses(tmp_path: Path, args: list[str], message: str) -> None:
    """`mixturelm train ARGS` into a folder holding earlier work: exit 2, one line containing message,
    the folder unchanged."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("previous work")
    before = tree_digest(out)
    proc = run_cli("train", *args, "--out", str(out), "--max-steps", "1")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert tree_digest(out) == before


def gloo_worker(rank: int, world: int, tmp: str, cases, check_case, refusal) -> None:
    """One process of a 2- or 4-process gloo test (torch.multiprocessing.spawn): every case checked by
    check_case(name, group), then refusal(group), which must raise a one-line UsageError; each outcome ("" or
    what went wrong) written to tmp/rank<r>.json for the test to read."""
    import datetime
    import json
    import traceback

    import torch.distributed as dist

    from mixturelm.errors import UsageError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a hang fails the case, not the run
    group = dist.new_group(list(range(world)))
    results = {}
    for name in cases:
        try:
            check_case(name, group)
            results[name] = ""
        except Exception:
            results[name] = traceback.format_exc()
    try:
        refusal(group)
        results["indivisible"] = "no UsageError"
    except UsageError as e:
        results["indivisible"] = "" if f"divisible by {world}" in str(e) and "\n" not in str(e) else str(e)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    # every process is past the barrier and its results are written: leave without gloo's C++ teardown, which
    # now and then aborts the process ("terminate called without an active exception", SIGABRT) and so fails
    # the spawn after every case passed; `mixturelm train` leaves the same way (cli.py, finish_distributed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
