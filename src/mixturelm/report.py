"""What `mixturelm compare` shows: the terminal table, the plots (PNG) and one self-contained report.html
(inline CSS, images as data URIs, no script, nothing fetched), with the routing views of every run."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .ensemble.report import print_table
from .files import write_text_atomic
from .plotting import pyplot
from .stats import Interval, describe
from .training.summary import describe_summary

TABLE_HEADER = ["run", "total params", "active params", "fwd FLOPs/token", "train FLOPs", "steps", "tokens",
                "val loss", "ppl", "bits/byte", "seeds", "vs dense, paired by seed", "tokens/s", "wall s"]


def interval(d: dict) -> Interval:
    """A results.json interval (mixturelm.stats.Interval.to_dict) back as an Interval."""
    return Interval(d["n"], d["mean"], d["low"], d["high"], d["confidence"])


def loss_cell(r: dict) -> str:
    """The mean validation loss, ± the half-width of its 95 % interval with several seeds."""
    half = r.get("val_loss_interval", {}).get("half_width")
    return f"{r['val_loss']:.4f}" + (f" ± {half:.4f}" if half is not None else "")


def difference_cell(r: dict) -> str:
    if "vs_dense" in r:
        return describe(interval(r["vs_dense"]))
    return "reference" if r["arch"] == "dense" else "-"


def table_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for r in runs:
        name = r["name"] + (" *" if r.get("isoflop_optimal") else "")
        rows.append([name, f"{r['total_params']:,}", f"{r['active_params']:,.0f}",
                     f"{r['forward_flops_per_token']:.3g}", f"{r['train_flops']:.3g}", f"{r['steps']:,}",
                     f"{r['tokens']:,}", loss_cell(r), f"{r['val_ppl']:.3f}", f"{r['val_bpb']:.4f}",
                     str(len(r.get("seeds", [None]))), difference_cell(r),
                     f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-",
                     f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-"])
    return rows


def differences_sentence(runs: list[dict]) -> str:
    """Which differences to dense are resolved (their 95 % interval excludes 0) and which are not."""
    compared = [r for r in runs if "vs_dense" in r]
    if not compared:
        return "No dense run of the same size and budget: no differences to dense."
    resolved = [r for r in compared if r["vs_dense"]["resolved"]]
    unresolved = [r for r in compared if not r["vs_dense"]["resolved"]]
    n = min(r["vs_dense"]["n"] for r in compared)
    if n == 1:
        return ("One seed: no interval, so no difference to dense is resolved (" +
                "; ".join(f"{r['name']} {r['vs_dense']['mean']:+.4f}" for r in compared) + "). Give --seeds to tell.")

    def listed(group: list[dict]) -> str:
        return "; ".join(f"{r['name']} {describe(interval(r['vs_dense'])).rsplit(',', 1)[0]}" for r in group) or "none"
    return (f"Differences to dense, paired by seed, with 95 % t intervals over {n} seeds. Resolved (the interval "
            f"excludes 0): {listed(resolved)}. Not resolved (the interval holds 0): {listed(unresolved)}.")


def ranking_sentence(results: dict) -> str:
    """The runs of each size and budget from the lowest mean loss up, with each step to the next one: the
    paired difference and whether it is resolved (empty for one run)."""
    steps = {(p["better"], p["worse"]): p for p in results.get("pairwise", [])}
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["size"], r["budget_flops"]), []).append(r)
    sentences = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["val_loss"])
        links = [ranked[0]["name"]]
        for better, worse in zip(ranked, ranked[1:]):
            p = steps.get((better["name"], worse["name"]))
            gap = describe(interval(p)) if p else "no seed in common"
            links.append(f"< {worse['name']} ({gap})")
        if len(ranked) > 1:
            sentences.append(" ".join(links))
    if not sentences:
        return ""
    n = min(len(r.get("seeds", [None])) for r in results["runs"])
    return ("From the lowest mean loss up, each run against the next, paired by seed"
            f"{'' if n > 1 else ' (one seed: nothing resolved)'}: " + "; ".join(sentences) + ".")


def first_seed(row: dict) -> dict:
    """The row of a run's first seed: its routing views and routers' statistics are that seed's."""
    return row["per_seed"][0] if "per_seed" in row else row


def _error_bars(ax, xs: list[float], runs: list[dict], color: str) -> None:
    """The 95 % intervals of the mean losses, where there are several seeds."""
    for x, r in zip(xs, runs):
        half = r.get("val_loss_interval", {}).get("half_width")
        if half is not None:
            ax.errorbar([x], [r["val_loss"]], yerr=[half], fmt="none", ecolor=color, capsize=3, lw=1)


# ----------------------------------------------------------------------------------------------
# Plots

def _colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
    return {n: palette[i % len(palette)] for i, n in enumerate(dict.fromkeys(names))}


def _axes():
    return pyplot().subplots(figsize=(7.5, 4.8))


def _log_ticks(v: float, _pos=None) -> str:
    """2e6, 3e5, 1.5e13: short labels that do not run into each other."""
    exponent = int(f"{v:e}".split("e")[1])
    return f"{v / 10 ** exponent:g}e{exponent}"


def log_x(ax) -> None:
    """A log-scale x with labelled ticks at 1, 2, 3 and 5 of each decade: matplotlib's default labels its
    minor ticks too when a plot spans less than a decade, and they ran into each other."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0), numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(_log_ticks))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Log-scale x, labels, grid, legend; written as PNG and closed."""
    log_x(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_loss_vs_flops(runs: list[dict], path: Path) -> None:
    """Validation loss against training FLOPs, one line per run: the isoFLOP comparison's curves."""
    colors = _colors([r["arch"] for r in runs])
    sizes = sorted({r["size"] for r in runs})
    styles = dict(zip(sizes, ["-", "--", ":", "-."] * 4))
    fig, ax = _axes()
    for r in runs:
        if r["curve"]:
            x, y = zip(*r["curve"])
            n = len(r.get("seeds", [None]))
            ax.plot(x, y, styles[r["size"]], color=colors[r["arch"]], marker="o", ms=3,
                    label=r["name"] + (f" (mean of {n} seeds)" if n > 1 else ""))
            _error_bars(ax, [x[-1]], [r], colors[r["arch"]])
    _save(fig, ax, path, "training FLOPs", "validation loss (nats/token)", "Validation loss against training compute")


def plot_loss_vs_forward_flops(runs: list[dict], path: Path) -> None:
    """Final validation loss against forward FLOPs per token: what each architecture costs to run."""
    colors = _colors([r["arch"] for r in runs])
    budgets = sorted({r.get("budget_flops") for r in runs}, key=lambda b: b or 0)
    styles = dict(zip(budgets, ["-", "--", ":", "-."] * 4))
    fig, ax = _axes()
    for arch in dict.fromkeys(r["arch"] for r in runs):
        for b in budgets:  # a line joins the sizes of one architecture at one budget
            group = sorted((r for r in runs if r["arch"] == arch and r.get("budget_flops") == b),
                           key=lambda r: r["forward_flops_per_token"])
            if group:
                ax.plot([r["forward_flops_per_token"] for r in group], [r["val_loss"] for r in group], styles[b],
                        marker="o", color=colors[arch], label=arch if len(budgets) == 1 else f"{arch}, {b:.3g} FLOPs")
                _error_bars(ax, [r["forward_flops_per_token"] for r in group], group, colors[arch])
    for r in runs:
        ax.annotate(r["name"], (r["forward_flops_per_token"], r["val_loss"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    _save(fig, ax, path, "forward FLOPs per token", "final validation loss (nats/token)", "Final loss against cost per token (same training FLOPs)")


def plot_isoflop(runs: list[dict], path: Path) -> None:
    """The MoD/PEER papers' isoFLOP plot: loss against parameters per architecture and budget, the
    isoFLOP-optimal size of each starred."""
    colors = _colors([r["arch"] for r in runs])
    budgets = sorted({r["budget_flops"] for r in runs})
    styles = dict(zip(budgets, ["-", "--", ":", "-."] * 4))
    fig, ax = _axes()
    for arch in dict.fromkeys(r["arch"] for r in runs):
        for b in budgets:
            group = sorted((r for r in runs if r["arch"] == arch and r["budget_flops"] == b),
                           key=lambda r: r["total_params"])
            ax.plot([r["total_params"] for r in group], [r["val_loss"] for r in group], styles[b], marker="o",
                    color=colors[arch], label=f"{arch}, {b:.3g} FLOPs")
            _error_bars(ax, [r["total_params"] for r in group], group, colors[arch])
            best = [r for r in group if r.get("isoflop_optimal")]
            ax.plot([r["total_params"] for r in best], [r["val_loss"] for r in best], "*", ms=16,
                    color=colors[arch], markeredgecolor="black")
    _save(fig, ax, path, "total parameters", "final validation loss (nats/token)", "isoFLOP curves (star: the isoFLOP-optimal size)")


PLOTS = {"loss_vs_flops.png": plot_loss_vs_flops, "loss_vs_forward_flops.png": plot_loss_vs_forward_flops}


# ----------------------------------------------------------------------------------------------
# The report

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table.results { border-collapse: collapse; font-size: 0.9em; }
table.results th, table.results td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.results td:first-child, table.results th:first-child { text-align: left; }
pre { background: #f4f4f4; padding: 0.6em; white-space: pre-wrap; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
section.run { border-top: 2px solid #888; margin-top: 2em; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def routing_statistics(run: dict) -> str:
    """One line of what the run's routers did over its last evaluation or training step."""
    parts = describe_summary(run)
    if "train_flops_realized" in run:
        parts.append(f"training FLOPs as routed (what the routers chose, counted step by step) "
                     f"{run['train_flops_realized']:.4g} against {run['train_flops']:.4g} budgeted "
                     f"({run['train_flops_realized'] / run['train_flops'] - 1:+.1%})")
    if "val_loss_topk" in run:
        parts.append(f"validation loss with training's top-k routing {run['val_loss_topk']:.4f}, causal "
                     f"{run['val_loss']:.4f}")
    return "; ".join(parts) or "no routed layers"


def render_html(results: dict, out: Path, plots: list[str], views: dict[str, str]) -> str:
    e = html.escape
    rows = table_rows(results["runs"])
    head = "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    best = min(results["runs"], key=lambda r: r["val_loss"])
    n_seeds = len(best.get("seeds", [None]))
    runs_by_name = {r["name"]: r for r in results["runs"]}
    m = results["machine"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>mixturelm compare</title>", f"<style>{CSS}</style></head><body>",
        "<h1>mixturelm compare: architectures at equal training compute</h1>",
        f"<p>Lowest {'mean ' if n_seeds > 1 else ''}validation loss: <b>{e(best['name'])}</b> "
        f"({loss_cell(best)} nats/token, {best['val_bpb']:.4f} bits/byte"
        f"{f', over {n_seeds} seeds' if n_seeds > 1 else ', one seed'}).</p>",
        f"<p>{e(differences_sentence(results['runs']))}</p>",
        f"<p>{e(ranking_sentence(results))}</p>",
        f"<table class=\"results\"><tr>{head}</tr>{body}</table>",
        "<p>Validation loss in nats per token over the same held-out tokens for every run and seed; MoD models "
        "are scored with causal routing. With several seeds (each sets a run's initialisation and data order, "
        "never the held-out tokens) the loss is the mean over the seeds ± the half-width of its 95 % Student-t "
        "interval, perplexity and bits per byte are those of the mean loss, and a run's difference to dense of "
        "its size and budget is the mean of the per-seed differences with its 95 % t interval: resolved when "
        "the interval excludes 0. One seed gives no interval and resolves nothing. Active parameters: those one "
        "token uses, on average. A star marks the isoFLOP-optimal size of an architecture (with --sweep, by the "
        "mean loss).</p>",
        f"<h2>How the sizes were chosen</h2><p>{e(results['rule'])}</p>",
        "<ul>" + "".join(f"<li><b>{e(r['name'])}</b>: {e(r['description'])}</li>" for r in results["runs"]) + "</ul>",
        "<h2>Plots</h2>", *(_img(out / p, p) for p in plots),
        "<h2>Routing views</h2>",
        *(["<p>The views and statistics are those of each run's first seed.</p>"] if n_seeds > 1 else []),
        "<p>What each run's routers did on the same text (the start of the held-out split unless --text was "
        "given). The line above each run's views is measured on other tokens: the last training batch and "
        "the whole validation split, as it says. Shares measured on one text differ from those: MoD's top-k "
        "takes exactly its capacity of every window, but its causal rule (what sampling does) lets a token in "
        "when its score passes a threshold set during training, so it takes more of some texts and less of "
        "others; PEER's usage grows with the number of tokens it sees.</p>",
        *(f'<section class="run"><h3>{e(name)}</h3><p>{e(routing_statistics(first_seed(runs_by_name[name])))}</p>{fragment}'
          "</section>" for name, fragment in views.items()),
        "<h2>Command and machine</h2>", f"<pre>{e(results['command'])}</pre>",
        f"<pre>{e(json.dumps(m, indent=1))}</pre>",
        f"<h2>Settings</h2><pre>{e(json.dumps(results['settings'], indent=1))}</pre>",
        f"<h2>Corpus</h2><pre>{e(json.dumps(results['corpus'], indent=1))}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(out: Path, results: dict, runs, data, cc, log=print) -> None:
    """Plots, routing views and report.html in out; the table printed."""
    plots = list(PLOTS)
    for name, plot in PLOTS.items():
        plot(results["runs"], out / name)
    if cc.sweep:
        plot_isoflop(results["runs"], out / "isoflop.png")
        plots.append("isoflop.png")
    views = routing_views_of_runs(out, runs, data, cc)
    write_text_atomic(out / "report.html", render_html(results, out, plots, views))
    print_table("mixturelm compare: equal training FLOPs", TABLE_HEADER, table_rows(results["runs"]))
    for sentence in (differences_sentence(results["runs"]), ranking_sentence(results)):
        if sentence:
            log(sentence)
    log(f"results in {out / 'results.json'}, report in {out / 'report.html'}")


def routing_views_of_runs(out: Path, runs, data, cc) -> dict[str, str]:
    """Every run's routing views on the same tokens, written to out/views/<run>/ and returned as HTML."""
    import numpy as np
    import torch

    from . import checkpoint
    from .views.routing import routing_views

    if cc.text is not None:
        ids = torch.tensor(data.tokenizer.encode(cc.text.encode("utf-8"))[:cc.view_tokens], dtype=torch.long)
    else:
        ids = torch.from_numpy(np.asarray(data.val.tokens[:cc.view_tokens], dtype=np.int64))
    fragments = {}
    for r in [r for r in runs if r.seed == runs[0].seed]:  # the first seed's: one view per run
        model, _, tokenizer, _ = checkpoint.load_model(out / "runs" / r.folder)
        views = routing_views(model, tokenizer, ids, title=r.name, window=cc.seq_len)  # windows as trained
        view_dir = out / "views" / r.name
        view_dir.mkdir(parents=True, exist_ok=True)
        for file, png in views.figures.items():
            (view_dir / file).write_bytes(png)
        write_text_atomic(view_dir / "inspect.json", json.dumps(views.summary, indent=1))
        fragments[r.name] = views.html
    return fragments
