"""The seam holds: a mechanism defined here, in the test, trains, evaluates, counts its FLOPs, compares and is
inspected through the public entry points, with no change to any module of mixturelm.

The mechanism: a gated FFN, y = sigmoid(w . x) * SwiGLU(x), whose gate is a one-expert router with an L1 loss
on the gate (a token may learn to skip the FFN)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from mixturelm import MixtureLM, ModelConfig, UsageError
from mixturelm.cli import main as cli_main
from mixturelm.compare import CompareConfig, run_compare
from mixturelm.errors import positive_ints
from mixturelm.flops import flop_counter, flops_report
from mixturelm.layers import Aux, SwiGLU
from mixturelm.mechanisms import Mechanism, Option, register, registry
from mixturelm.presets import PRESETS, Preset
from mixturelm.training import Trainer, new_run_config
from mixturelm.training.evaluation import evaluate_checkpoint
from mixturelm.views.command import run_inspect


@dataclass(kw_only=True)
class GatedConfig:
    d_hidden: int = 48

    def __post_init__(self) -> None:
        positive_ints(self, "d_hidden")


@dataclass
class GatedAux(Aux):
    kind: ClassVar[str] = "gated"
    gate_N: torch.Tensor | None = None

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"gate_mean": self.gate_N.mean()}


class GatedFFN(nn.Module):
    def __init__(self, d_model: int, config: GatedConfig) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, 1, bias=False)
        self.ffn = SwiGLU(d_model, config.d_hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, GatedAux]:
        g = torch.sigmoid(self.router(x))
        y, _ = self.ffn(x)
        return g * y, GatedAux({"gate_l1": g.mean()}, gate_N=g.detach().flatten())


class GatedView:
    shows_text = True

    def attach(self, layer, rec):
        def after(module, args, out):
            layer.data.setdefault("gates", []).append(out[1].gate_N.cpu())
        return [layer.module.register_forward_hook(after)]

    def summary(self, layer, text):
        gates = torch.cat(layer.data["gates"])
        return {"kind": "gated", "layer": layer.index, "n_tokens": text.n, "gate_mean": gates.mean().item()}

    def figures(self, layer, s):
        return {}

    def html(self, layer, s, text, figures):
        return f"<p>layer {s['layer']}: mean gate {s['gate_mean']:.3f}</p>"

    def table_cell(self, s):
        return f"mean gate {s['gate_mean']:.3f}"

    def describe(self, key, s):
        return f"{key}: gated FFN, mean gate {s['gate_mean']:.3f}"


class GatedMechanism(Mechanism):
    kind = "gated"
    title = "gated FFN"
    config_class = GatedConfig
    module_types = (GatedFFN,)
    loss_weights = {"gate_l1": 1e-3}
    block_options = {"gate_hidden": Option("d_hidden", int, "gated FFN: hidden size")}
    summary_key = "gate"
    presets_hint = "gated-*"

    def build(self, config, d_model, **_):
        return GatedFFN(d_model, config)

    def flops(self, config, model, d_hidden):
        return {"gate_router": 2.0 * model.d_model, "gated_ffn": 6.0 * model.d_model * config.d_hidden}

    def summarize(self, record):
        gates = registry.layer_stats(record, "gate_mean")
        return {"gate": {f"layer{i}": v for i, v in gates.items()}} if gates else {}

    def describe(self, summary):
        return [f"{layer} gated FFN: mean gate {v:.3f}" for layer, v in summary.get("gate", {}).items()]

    def view(self):
        return GatedView()


@pytest.fixture
def gated(monkeypatch):
    """The mechanism registered, with a preset gated-debug beside dense-debug, for this test only."""
    mechanism = register(GatedMechanism())
    dense = PRESETS["dense-debug"]
    blocks = [{"ffn": "gated", "gated": {"d_hidden": 256}} for _ in range(dense.model["n_layers"])]
    monkeypatch.setitem(PRESETS, "gated-debug", Preset("gated-debug", "dense-debug with gated FFNs",
                                                       dense.model | {"blocks": blocks}, dense.train))
    yield mechanism
    registry.unregister("gated")


def test_a_mechanism_defined_in_a_test_goes_through_every_entry_point(gated, corpus_dir, tmp_path, capsys):
    # configs: the block takes the new kind and its config; bad values are refused naming the field
    with pytest.raises(UsageError, match="GatedConfig.d_hidden must be a positive integer"):
        ModelConfig(n_layers=1, blocks=[{"ffn": "gated", "gated": {"d_hidden": 0}}])
    cfg = ModelConfig(**PRESETS["gated-debug"].model)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

    # FLOPs: the analytic count uses the mechanism's, and matches what torch counts
    report = flops_report(cfg, 64)
    assert report["forward_per_token"]["gated_ffn"] == 2 * 6.0 * 64 * 256
    model = MixtureLM(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 64))
    with flop_counter() as fc:
        model(idx)
    assert fc.get_total_flops() / idx.numel() == pytest.approx(report["forward_total"], rel=1e-6)

    # training: the gate's loss is weighted into the objective and its statistic logged every step
    run = tmp_path / "run"
    summary = Trainer(new_run_config("gated-debug", {"data": str(corpus_dir), "max_steps": 6, "eval_every": 3}),
                      run, progress=False, log=lambda m: None).run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("aux/layer0.gate_l1" in r and "stat/layer1.gate_mean" in r for r in records if r["kind"] == "train")
    assert 0 < summary["gate"]["layer0"] < 1 and summary["val_loss"] < math.log(257)

    # evaluation of the checkpoint
    res = evaluate_checkpoint(run)
    assert res["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-6)

    # the command line: its block option becomes a flag, its errors speak flags
    assert cli_main(["train", "--preset", "gated-debug", "--gate-hidden", "16", "--data", str(corpus_dir),
                     "--max-steps", "2", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert saved["model"]["blocks"][0]["gated"] == {"d_hidden": 16}
    assert cli_main(["train", "--preset", "dense-debug", "--gate-hidden", "16", "--data", str(corpus_dir),
                     "--max-steps", "2", "--out", str(tmp_path / "no")]) == 2
    assert "--gate-hidden: preset dense-debug has no gated FFN blocks" in capsys.readouterr().err

    # inspect: the mechanism's view
    views = run_inspect(run, "the model and the router", tmp_path / "inspect")
    assert 0 < views.summary["layers"]["layer0.gated"]["gate_mean"] < 1
    assert "mean gate" in (tmp_path / "inspect" / "inspect.html").read_text()

    # compare at equal FLOPs against dense, with the report
    out = tmp_path / "cmp"
    results = run_compare(CompareConfig(archs=("dense", "gated"), sizes=("debug",), budgets=(2e9,), data=str(corpus_dir),
                                        batch_size=4, seq_len=32, eval_tokens=256, evals=2, view_tokens=64),
                          out, progress=False, command="test", log=lambda m: None)
    rows = {r["arch"]: r for r in results["runs"]}
    assert rows["gated"]["forward_flops_per_token"] > rows["dense"]["forward_flops_per_token"]
    assert rows["gated"]["steps"] < rows["dense"]["steps"]  # more FLOPs per token: fewer steps in the budget
    assert "gate" in rows["gated"] and "gated FFN: mean gate" in (out / "report.html").read_text()
