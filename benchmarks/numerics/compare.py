"""Compare two numerics records of record.sh: per-step losses, evaluations, compare tables, the NIFTY results,
FLOP counts, eval / generate output and the routing views.

    python benchmarks/numerics/compare.py BEFORE_DIR AFTER_DIR
"""
import json, sys
from pathlib import Path
A, B = Path(sys.argv[1]), Path(sys.argv[2])
bad = 0
def recs(p):
    return [json.loads(l) for l in p.read_text().splitlines()]
for run in sorted((A / "runs").iterdir()):
    a, b = recs(run / "metrics.jsonl"), recs(B / "runs" / run.name / "metrics.jsonl")
    la = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss"), r.get("val_loss_causal")) for r in a]
    lb = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss"), r.get("val_loss_causal")) for r in b]
    same = la == lb
    bad += not same
    usage = [(k, r[k]) for r in a for k in r if k.endswith("peer_usage")]
    usage_b = [(k, r[k]) for r in b for k in r if k.endswith("peer_usage")]
    print(f"{run.name:<20} {len(la)} records, identical losses: {same}" + (f", peer usage identical: {usage == usage_b}" if usage else ""))
    if not same:
        for x, y in zip(la, lb):
            if x != y: print("   ", x, y); break
ca = json.loads((A / "compare/results.json").read_text())["runs"]
cb = json.loads((B / "compare/results.json").read_text())["runs"]
keys = ["name", "total_params", "active_params", "forward_flops_per_token", "train_flops", "steps", "tokens", "val_loss", "val_ppl", "val_bpb", "curve", "train_flops_realized", "peer_usage", "load_max_over_mean", "mod_causal"]
for x, y in zip(ca, cb):
    diff = [k for k in keys if x.get(k) != y.get(k)]
    bad += bool(diff)
    print(f"compare {x['name']:<12} val_loss {x['val_loss']:.6f} {y['val_loss']:.6f} differing keys: {diff}")
    for k in diff: print("    ", k, x.get(k), y.get(k))
na = json.loads((A / "nifty/results.json").read_text()); nb = json.loads((B / "nifty/results.json").read_text())
na.pop("machine", None); nb.pop("machine", None); na.pop("command", None); nb.pop("command", None)
print("nifty results.json identical (machine and command aside):", na == nb); bad += na != nb
for f in ("flops-peer.json", "flops-ms.json"):
    fa, fb = json.loads((A / f).read_text()), json.loads((B / f).read_text())
    print(f, "forward parts identical:", fa["forward_per_token"] == fb["forward_per_token"], fa["train_per_token"] == fb["train_per_token"])
for f in ("eval-peer.log", "eval-mode-staged.log", "gen-mod.log"):
    print(f, "\n   before:", (A / f).read_text().strip().splitlines()[-1][:150], "\n   after: ", (B / f).read_text().strip().splitlines()[-1][:150])
ia = json.loads((A / "inspect-ms/inspect.json").read_text()); ib = json.loads((B / "inspect-ms/inspect.json").read_text())
la, lb = ia["layers"], ib["layers"]
print("inspect summaries identical (per layer):", {k: la[k] == lb.get(k) for k in la})
print("TOTAL differences:", bad)
