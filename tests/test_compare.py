"""`mixturelm compare`: equal budgets, results, plots, the report in a real browser, resume, bad input."""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, tree_digest
from mixturelm.compare import CompareConfig, mark_isoflop_optimal, plan_runs, run_compare
from mixturelm.flops import train_flops_per_token
from mixturelm.report import plot_isoflop

# two architectures on the debug backbone, a budget of a few dozen steps
TINY = dict(archs=("dense", "mod"), sizes=("debug",), budgets=(1.2e10,), batch_size=8, seq_len=64,
            eval_tokens=1024, evals=3, view_tokens=96)


@pytest.fixture(scope="module")
def finished(corpus_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    cc = CompareConfig(data=str(corpus_dir), **TINY)
    results = run_compare(cc, out, progress=False, command="test", log=lambda m: None)
    return out, results


def test_equal_budgets_and_results(finished):
    out, results = finished
    assert json.loads((out / "results.json").read_text()) == results
    runs = {r["arch"]: r for r in results["runs"]}
    assert set(runs) == {"dense", "mod"}
    for r in runs.values():
        cfg = json.loads((out / "runs" / r["name"] / "config.json").read_text())
        from mixturelm.config import ModelConfig

        per_step = train_flops_per_token(ModelConfig.from_dict(cfg["model"]), 64) * 8 * 64
        # the budget is met within one step, from below
        assert r["budget_flops"] - per_step < r["train_flops"] <= r["budget_flops"]
        assert r["steps"] == int(r["budget_flops"] // per_step) and r["tokens"] == r["steps"] * 8 * 64
        for key in ("total_params", "active_params", "forward_flops_per_token", "val_loss", "val_ppl", "val_bpb",
                    "tokens_per_s", "wall_s"):
            assert r[key] > 0, key
        assert abs(r["val_ppl"] - 2.718281828 ** r["val_loss"]) < 1e-6 * r["val_ppl"]
        assert len(r["curve"]) == 3 and r["curve"][-1][0] == pytest.approx(r["train_flops"])
        assert r["curve"][-1][1] == r["val_loss"]
    # MoD is cheaper per token, so it trains longer; it is scored with causal routing
    assert runs["mod"]["steps"] > runs["dense"]["steps"]
    assert runs["mod"]["val_loss_scored_with"] == "causal routing" and "val_loss_topk" in runs["mod"]
    assert runs["mod"]["active_params"] < runs["mod"]["total_params"]
    assert runs["dense"]["active_params"] == runs["dense"]["total_params"]
    # both runs saw the same validation tokens and the same data order
    evals = [[json.loads(line) for line in (out / "runs" / r["name"] / "metrics.jsonl").read_text().splitlines()
              if '"eval"' in line][-1]["val_tokens"] for r in runs.values()]
    assert evals[0] == evals[1]


def test_plots_and_report_files(finished):
    out, _ = finished
    for png in ("loss_vs_flops.png", "loss_vs_forward_flops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "dense-debug" in page and "mod-debug" in page and "test" in page  # table, command
    from mixturelm.presets import PRESETS

    assert all(html.escape(PRESETS[p].description) in page for p in ("dense-debug", "mod-debug"))  # what each is
    assert page.count("data:image/png;base64,") >= 2
    assert "http://" not in page and "https://" not in page  # self-contained
    for name in ("dense-debug", "mod-debug"):
        assert (out / "views" / name / "inspect.json").is_file()


def test_report_opens_in_headless_chromium(finished):
    """The report loads in a real browser with every image decoded and nothing on the console."""
    out, _ = finished
    browser = shutil.which("chromium")
    if browser is None or shutil.which("chromedriver") is None:
        if os.environ.get("MIXTURELM_REQUIRE_CHROMIUM"):
            pytest.fail("chromium / chromedriver are not installed (Debian packages chromium, chromium-driver)")
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-quic", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get((out / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        console = driver.get_log("browser")
        title = driver.title
    finally:
        driver.quit()
    assert title == "mixturelm compare"
    assert len(images) >= 2 and all(ok and width > 0 for _, ok, width in images), images
    assert console == []


def test_interrupted_compare_resumes(corpus_dir, finished, tmp_path, monkeypatch):
    """Killed in the second run after its first checkpoint; run again: the first is skipped, the second resumes
    from its checkpoint, and the results equal those of the uninterrupted compare."""
    _, uninterrupted = finished
    out = tmp_path / "cmp"
    # views drawn on a given text this time (the module's compare draws them on held-out tokens)
    cc = CompareConfig(data=str(corpus_dir), text="def main():\n    return 'café'\n", **TINY)
    from mixturelm.training import Trainer

    real_save = Trainer._save

    def save_then_die(self, step):
        real_save(self, step)
        if self.cfg.preset == "mod-debug":
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cc, out, progress=False, command="test", log=lambda m: None)
    assert (out / "runs" / "dense-debug" / "results.json").is_file()
    assert not (out / "runs" / "mod-debug" / "results.json").is_file()
    monkeypatch.setattr(Trainer, "_save", real_save)
    messages = []
    results = run_compare(cc, out, progress=False, command="test", log=messages.append)
    assert any("dense-debug: finished earlier, skipped" in m for m in messages)
    assert any("resuming from" in m and "mod-debug" in m for m in messages)
    for a, b in zip(results["runs"], uninterrupted["runs"]):
        assert (a["name"], a["steps"], a["train_flops"]) == (b["name"], b["steps"], b["train_flops"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
        assert [p[1] for p in a["curve"]] == pytest.approx([p[1] for p in b["curve"]], abs=1e-6)
    assert "caf" in (out / "report.html").read_text()


# ----------------------------------------------------------------------------------------------
# Several seeds: means with intervals, differences to dense paired by seed, resume per (run, seed)

@pytest.fixture(scope="module")
def seeded(corpus_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seeded") / "cmp"
    cc = CompareConfig(data=str(corpus_dir), seeds=(0, 1), **TINY)
    return out, run_compare(cc, out, progress=False, command="test", log=lambda m: None)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_seeds_are_run_directories_with_their_own_init_and_data_order(seeded, corpus_dir):
    from mixturelm.data import prepare
    from mixturelm.data.tokens import train_rows

    out, _ = seeded
    dirs = {(name, seed): out / "runs" / name / f"seed-{seed}" for name in ("dense-debug", "mod-debug") for seed in (0, 1)}
    for (name, seed), d in dirs.items():
        assert (d / "results.json").is_file(), d
        assert json.loads((d / "config.json").read_text())["train"]["seed"] == seed
    assert not (out / "runs" / "dense-debug" / "config.json").exists()
    for name in ("dense-debug", "mod-debug"):
        a, b = (dirs[name, 0], dirs[name, 1])
        # the held-out split and tokens are the same at every seed, so the per-seed losses can be paired
        assert json.loads((a / "data.json").read_text()) == json.loads((b / "data.json").read_text())
        evals = [[r["val_tokens"] for r in _metrics(d) if r["kind"] == "eval"] for d in (a, b)]
        assert evals[0] == evals[1]
        # ... while the initialisation and the data order are not
        first = [next(r["loss"] for r in _metrics(d) if r["kind"] == "train") for d in (a, b)]
        assert first[0] != first[1]
    data = prepare(str(corpus_dir), "bytes", 0.02, log=lambda m: None)
    assert not train_rows(data.train, 1, 0, 8, 64).equal(train_rows(data.train, 1, 1, 8, 64))


def test_seeds_give_means_intervals_and_paired_differences(seeded):
    from mixturelm.report import differences_sentence, table_rows
    from mixturelm.stats import mean_interval, paired_difference

    out, results = seeded
    assert json.loads((out / "results.json").read_text()) == results
    assert results["settings"]["seeds"] == [0, 1]
    rows = {r["arch"]: r for r in results["runs"]}
    assert set(rows) == {"dense", "mod"}  # one row per run, whatever the seeds
    per_seed = {}
    for arch, r in rows.items():
        assert r["seeds"] == [0, 1] and [s["seed"] for s in r["per_seed"]] == [0, 1]
        losses = [json.loads((out / "runs" / r["name"] / f"seed-{s}" / "results.json").read_text())
                  for s in (0, 1)]
        losses = [s.get("val_loss_causal", s["val_loss"]) for s in losses]
        assert r["val_loss_per_seed"] == pytest.approx(losses, abs=1e-12)
        assert r["val_loss"] == pytest.approx(sum(losses) / 2, abs=1e-12)
        assert r["val_loss_interval"] == pytest.approx(mean_interval(losses).to_dict())
        assert r["val_loss_interval"]["low"] < r["val_loss"] < r["val_loss_interval"]["high"]
        assert r["curve"][-1][1] == pytest.approx(r["val_loss"], abs=1e-12)  # the mean curve ends at the mean
        per_seed[arch] = losses
    assert "vs_dense" not in rows["dense"]
    d = rows["mod"]["vs_dense"]
    expected = paired_difference(per_seed["mod"], per_seed["dense"])
    assert d["reference"] == "dense-debug" and d["n"] == 2
    assert d["per_seed"] == pytest.approx([m - r for m, r in zip(per_seed["mod"], per_seed["dense"])], abs=1e-12)
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((expected.mean, expected.low, expected.high))
    assert d["resolved"] == (d["low"] > 0 or d["high"] < 0)
    table = {row[0]: row for row in table_rows(results["runs"])}
    assert "±" in table["mod-debug"][7] and table["mod-debug"][10] == "2"
    assert table["dense-debug"][11] == "reference"
    assert table["mod-debug"][11].endswith("resolved") and "[" in table["mod-debug"][11]
    sentence = differences_sentence(results["runs"])
    assert "over 2 seeds" in sentence and "mod-debug" in sentence
    page = (out / "report.html").read_text()
    assert html.escape(sentence) in page and "first seed" in page
    assert (out / "views" / "mod-debug" / "inspect.json").is_file()  # the first seed's views


def test_a_seed_deleted_is_the_only_run_trained_again(seeded, tmp_path):
    out, before = seeded
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "runs" / "mod-debug" / "seed-1")
    messages = []
    cc = CompareConfig(data=before["settings"]["data"], seeds=(0, 1), **TINY)
    results = run_compare(cc, copy, progress=False, command="test", log=messages.append)
    skipped = [m for m in messages if "finished earlier, skipped" in m]
    assert sorted(skipped) == sorted(f"  {n}: finished earlier, skipped"
                                     for n in ("dense-debug seed 0", "dense-debug seed 1", "mod-debug seed 0"))
    assert any("mod-debug seed 1:" in m and "steps in" in m for m in messages)
    for a, b in zip(results["runs"], before["runs"]):
        assert a["val_loss_per_seed"] == pytest.approx(b["val_loss_per_seed"], abs=1e-6)


def test_resume_with_other_seeds_is_refused(seeded, tmp_path):
    out, _ = seeded
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    before = tree_digest(copy)
    proc = run_cli("compare", "--data", json.loads((out / "compare.json").read_text())["shared"]["data"],
                   "--out", str(copy), "--archs", "dense,mod", "--size", "debug", "--flops", "1.2e10",
                   "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "1024", "--evals", "3", "--seeds", "0,1,2")
    assert proc.returncode == 2 and "holds a compare with seeds [0, 1], not [0, 1, 2]" in proc.stderr, proc.stderr
    assert tree_digest(copy) == before


def test_one_seed_keeps_the_single_run_layout_and_resumes_older_compares(finished, tmp_path):
    """--seeds 3 is --seed 3; a compare.json written before `seeds` existed resumes: every run is skipped."""
    assert CompareConfig(seeds=(3,)) == CompareConfig(seed=3)
    assert [r.folder for r in plan_runs(CompareConfig(seeds=(3,), **TINY), 257)] == ["dense-debug", "mod-debug"]
    out, before = finished
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    marker = json.loads((copy / "compare.json").read_text())
    del marker["shared"]["seeds"]
    (copy / "compare.json").write_text(json.dumps(marker))
    messages = []
    results = run_compare(CompareConfig(data=before["settings"]["data"], **TINY), copy, progress=False,
                          command="test", log=messages.append)
    assert sum("finished earlier, skipped" in m for m in messages) == 2
    for r in results["runs"]:
        assert r["seeds"] == [0] and r["val_loss_interval"]["low"] is None and "per_seed" not in r
    assert results["runs"][1]["vs_dense"]["resolved"] is False
    from mixturelm.report import differences_sentence, table_rows

    assert table_rows(results["runs"])[1][11].endswith("(1 seed: not resolved)")
    assert differences_sentence(results["runs"]).startswith("One seed: no interval")


def test_sweep_with_seeds_marks_the_optimum_by_the_mean():
    from mixturelm.compare import add_differences, seed_row

    def run(arch, size, seed, loss):
        return {"name": f"{arch}-{size}", "arch": arch, "size": size, "budget_flops": 1e12, "seed": seed,
                "val_loss": loss, "curve": [[1e12, loss]], "total_params": 1, "tokens_per_s": 1.0}
    # at seed 0 the other size wins: the mean decides
    losses = {("dense", "debug"): (2.0, 2.1), ("dense", "small"): (2.2, 1.85), ("mod", "debug"): (1.9, 1.8),
              ("mod", "small"): (1.7, 2.3)}
    rows = [seed_row([run(a, size, s, loss) for s, loss in enumerate(ls)], 1.0) for (a, size), ls in losses.items()]
    add_differences(rows)
    mark_isoflop_optimal(rows)
    best = {r["name"] for r in rows if r["isoflop_optimal"]}
    assert best == {"dense-small", "mod-debug"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["mod-small"]["vs_dense"]["reference"] == "dense-small"  # paired within its size
    assert by_name["mod-debug"]["vs_dense"]["per_seed"] == pytest.approx([-0.1, -0.3])
    assert "vs_dense" not in by_name["dense-debug"]
    plans = plan_runs(CompareConfig(archs=("dense",), sizes=("debug", "tiny"), budgets=(1e12,), sweep=True,
                                    seeds=(0, 5)), vocab_size=257)
    assert [(r.folder, r.config.train.seed) for r in plans] == [
        ("dense-debug/seed-0", 0), ("dense-tiny/seed-0", 0), ("dense-debug/seed-5", 5), ("dense-tiny/seed-5", 5)]


# ----------------------------------------------------------------------------------------------
# Planning and the sweep

def test_plan_gives_every_arch_the_budget_and_sweep_marks_the_optimum(tmp_path):
    cc = CompareConfig(archs=("dense", "moe", "mod", "mode", "peer"), sizes=("debug", "tiny"), budgets=(1e12, 2e12),
                       sweep=True)
    runs = plan_runs(cc, vocab_size=257)
    assert len(runs) == 5 * 2 * 2 and len({r.name for r in runs}) == len(runs)
    for r in runs:
        per_step = train_flops_per_token(r.config.model, 256) * 16 * 256
        assert r.steps == int(r.budget // per_step)
        assert (r.config.train.batch_size, r.config.train.seq_len, r.config.train.seed) == (16, 256, 0)
        assert r.config.train.eval_tokens == cc.eval_tokens
    rows = [{"name": r.name, "arch": r.arch, "size": r.size, "budget_flops": r.budget, "total_params": i + 1,
             "val_loss": 3.0 - 0.1 * (r.size == "tiny") + 0.01 * i} for i, r in enumerate(runs)]
    mark_isoflop_optimal(rows)
    best = {(r["arch"], r["budget_flops"]) for r in rows if r["isoflop_optimal"]}
    assert len(best) == 10  # one per architecture and budget
    assert all(r["size"] == "tiny" for r in rows if r["isoflop_optimal"])
    plot_isoflop(rows, tmp_path / "isoflop.png")
    assert (tmp_path / "isoflop.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written or changed

@pytest.mark.parametrize("args, message", [
    (["--archs", "dense,transformer"], "no architecture 'transformer'"),
    (["--archs", "dense,dense"], "names something twice"),
    (["--flops", "lots"], "--flops lots is not a number"),
    (["--flops", "-1"], "must be positive"),
    (["--flops", "1e3"], "smaller than one step"),
    (["--size", "huge"], "no architecture 'dense' at size huge"),
    (["--text-file", "/nonexistent.txt"], "does not exist"),
    (["--text", " "], "--text is empty"),
    (["--eval-tokens", "100"], "--eval-tokens=100 is below one window of --seq-len=256"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--sweep", ""], "--sweep is empty"),
    (["--flops", "6e9,6.0e9"], "names a budget twice"),
    (["--device", "tpu"], "is not a device"),
    (["--seeds", "0,0"], "names something twice"),
    (["--seeds", "0,00"], "--seeds=0,0 names a seed twice"),
    (["--seeds", "a"], "--seeds a is not a list of integers"),
    (["--seeds", "1.5,2"], "is not a list of integers"),
    (["--seeds", ""], "--seeds is empty"),
    (["--seeds", ","], "--seeds is empty"),
    (["--seeds=-1,2"], "--seeds=-1,2 must be integers >= 0"),
    (["--seed", "1", "--seeds", "0,1"], "--seed and --seeds both given"),
])
def test_bad_input_is_one_line_and_writes_nothing(corpus_dir, tmp_path, args, message):
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--data", str(corpus_dir), "--out", str(out), "--no-progress", "--archs", "dense",
                   "--size", "debug", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_out_that_is_not_a_compare_is_left_alone(corpus_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    for extra in ([], ["--overwrite"]):
        proc = run_cli("compare", "--data", str(corpus_dir), "--out", str(out), "--archs", "dense", "--size",
                       "debug", *extra)
        assert proc.returncode == 2 and "holds files that are not a compare of mixturelm" in proc.stderr, proc.stderr
    assert tree_digest(out) == before


def test_resume_with_other_settings_is_refused(finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    before = tree_digest(copy)
    proc = run_cli("compare", "--data", json.loads((out / "compare.json").read_text())["shared"]["data"],
                   "--out", str(copy), "--archs", "dense", "--size", "debug", "--flops", "2.4e10",
                   "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "1024", "--evals", "3")
    assert proc.returncode == 2 and "holds a compare with budgets" in proc.stderr, proc.stderr
    assert tree_digest(copy) == before


def test_text_file_must_be_utf8(corpus_dir, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    proc = run_cli("compare", "--data", str(corpus_dir), "--out", str(tmp_path / "cmp"), "--text-file", str(bad))
    assert proc.returncode == 2 and "is not UTF-8" in proc.stderr



def _small_compare(data: Path, out: Path, *extra: str):
    return run_cli("compare", "--data", str(data), "--out", str(out), "--no-progress", "--archs", "dense", "--size",
                   "debug", "--flops", "1e9", "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "512",
                   "--evals", "1", "--view-tokens", "32", *extra)


def test_resume_on_a_changed_corpus_is_refused(corpus_dir, tmp_path):
    """The runs of one compare must see the same data: a corpus changed between the interrupted compare and its
    rerun is refused (not only warned about), and nothing in --out changes."""
    data = tmp_path / "corpus"
    shutil.copytree(corpus_dir, data)
    out = tmp_path / "cmp"
    assert _small_compare(data, out).returncode == 0
    (data / "doc01.txt").write_text((data / "doc01.txt").read_text() + "\nmore text\n")
    before = tree_digest(out)
    proc = _small_compare(data, out)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(errors) == 1 and "corpus changed" in errors[0], proc.stderr
    assert tree_digest(out) == before


def test_overwrite_through_a_link_replaces_the_compare_and_keeps_the_link(corpus_dir, tmp_path):
    real = tmp_path / "real"
    assert _small_compare(corpus_dir, real).returncode == 0
    (real / "stale.txt").write_text("from the earlier compare")
    link = tmp_path / "link"
    link.symlink_to(real)
    proc = _small_compare(corpus_dir, link, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and (real / "results.json").is_file() and not (real / "stale.txt").exists()


def test_a_damaged_run_file_is_one_line(finished, tmp_path):
    out, _ = finished
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    (copy / "runs" / "dense-debug" / "results.json").write_text("{not json")
    before = tree_digest(copy)
    shared = json.loads((out / "compare.json").read_text())["shared"]
    proc = run_cli("compare", "--data", shared["data"], "--out", str(copy), "--archs", "dense,mod", "--size", "debug",
                   "--flops", "1.2e10", "--batch-size", "8", "--seq-len", "64", "--eval-tokens", "1024", "--evals", "3",
                   "--view-tokens", "96")
    assert proc.returncode == 2 and "is unreadable" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr
    assert tree_digest(copy) == before


def test_realized_flops_of_integrated_mode(tmp_path):
    """The budget assumes balanced no-op routing; the realized count uses every step's measured no-op share."""
    from mixturelm.compare import realized_train_flops

    run = [r for r in plan_runs(CompareConfig(archs=("mode",), sizes=("debug",), budgets=(1e11,)), 257)][0]
    cfg, t = run.config, run.config.train
    per_step = train_flops_per_token(cfg.model, t.seq_len) * t.batch_size * t.seq_len
    m = cfg.model.block_spec(0).moe
    assert m.n_noop == m.n_experts  # half the slots are no-ops, so balanced routing skips half of top-k
    layers = cfg.model.n_layers
    d = tmp_path / "run"
    d.mkdir()
    records = [{"kind": "train", "step": s, **{f"stat/layer{i}.noop_fraction": f for i in range(layers)}}
               for s, f in ((1, 0.5), (2, 0.25), (3, 0.75))]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    per_expert_slot = 6.0 * cfg.model.d_model * m.d_expert  # forward FLOPs of one routed expert per token
    tokens = t.batch_size * t.seq_len
    # by hand: step 1 as planned; step 2 a quarter of k more experts per token in each layer, step 3 a quarter less
    expected = 3 * per_step + 3 * tokens * layers * per_expert_slot * m.top_k * (0.0 + 0.25 - 0.25)
    assert realized_train_flops(d, cfg, per_step) == pytest.approx(expected)
    records[2]["stat/layer0.noop_fraction"] = 0.5
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    expected += 3 * tokens * per_expert_slot * m.top_k * 0.25  # layer 0 at step 3 now computes as planned
    assert realized_train_flops(d, cfg, per_step) == pytest.approx(expected)
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    assert realized_train_flops(d, cfg, per_step) is None  # no no-op experts: nothing to correct


def test_a_finished_run_resumed_keeps_its_routing_statistics(corpus_dir, tmp_path):
    """Killed after its last checkpoint but before results.json: resuming re-evaluates and still reports the last
    step's MoD routing statistics (the report's line for the run needs them)."""
    from mixturelm.training import Trainer, new_run_config

    cfg = new_run_config("mod-debug", {"data": str(corpus_dir), "max_steps": 4, "eval_every": 4, "ckpt_every": 4,
                                       "eval_tokens": 512})
    out = tmp_path / "run"
    first = Trainer(cfg, out, progress=False, log=lambda m: None).run()
    (out / "results.json").unlink()
    again = Trainer(new_run_config("mod-debug", {"data": str(corpus_dir), "max_steps": 4, "eval_every": 4,
                                                 "ckpt_every": 4, "eval_tokens": 512}),
                    out, resume=True, progress=False, log=lambda m: None).run()
    assert again["mod_causal"] == first["mod_causal"] and again["loss"] == first["loss"]
    assert again["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)


def test_the_command_line_defaults_are_compare_configs():
    """One place for the defaults: `mixturelm compare --out DIR` alone gives CompareConfig()."""
    from mixturelm.cli import build_parser, compare_config

    assert compare_config(build_parser().parse_args(["compare", "--out", "x"])) == CompareConfig()


@pytest.mark.parametrize("low, high", [(1.2e6, 4.4e6), (2.1e5, 2.3e6), (3e11, 2e13)])
def test_log_axis_tick_labels_do_not_overlap(low, high):
    from mixturelm.plotting import pyplot
    from mixturelm.report import log_x

    fig, ax = pyplot().subplots(figsize=(7.5, 4.8))
    ax.plot([low, high], [1, 2], "o")
    log_x(ax)
    fig.canvas.draw()
    boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
                    if t.get_text() and t.get_visible() and low <= t.get_position()[0] <= high), key=lambda b: b.x0)
    pyplot().close(fig)
    assert len(boxes) >= 2
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))


def test_pairwise_differences_rank_the_runs_paired_by_seed():
    """Every pair of the same size and budget, better minus worse over their common seeds, against a hand
    computation: differences (-0.1, -0.3) have mean -0.2, s = 0.1414, t_{0.975,1} = 12.706, half-width
    12.706 * 0.1414 / sqrt(2) = 1.2706."""
    from mixturelm.compare import pairwise_differences, seed_row
    from mixturelm.report import ranking_sentence

    def run(arch, size, seed, loss):
        return {"name": f"{arch}-{size}", "arch": arch, "size": size, "budget_flops": 1e12, "seed": seed,
                "val_loss": loss, "curve": [[1e12, loss]], "total_params": 1, "tokens_per_s": 1.0}
    losses = {("dense", "debug"): (2.0, 2.1), ("mod", "debug"): (1.9, 1.8), ("peer", "debug"): (1.95, 1.85),
              ("mod", "small"): (1.7, 2.3)}
    rows = [seed_row([run(a, size, s, loss) for s, loss in enumerate(ls)], 1.0) for (a, size), ls in losses.items()]
    pairs = {(p["better"], p["worse"]): p for p in pairwise_differences(rows)}
    assert set(pairs) == {("mod-debug", "dense-debug"), ("peer-debug", "dense-debug"), ("mod-debug", "peer-debug")}
    d = pairs[("mod-debug", "dense-debug")]
    assert d["mean"] == pytest.approx(-0.2) and d["half_width"] == pytest.approx(1.2706, abs=1e-4)
    assert d["resolved"] is False and d["seeds"] == [0, 1]
    # a constant gap has no spread: resolved
    close = pairs[("mod-debug", "peer-debug")]
    assert close["mean"] == pytest.approx(-0.05) and close["half_width"] == pytest.approx(0, abs=1e-12)
    assert close["resolved"] is True
    sentence = ranking_sentence({"runs": rows, "pairwise": list(pairs.values())})
    assert sentence.index("mod-debug") < sentence.index("< peer-debug") < sentence.index("< dense-debug")
    assert "-0.0500 [-0.0500, -0.0500], resolved" in sentence and "not resolved" in sentence
