#!/usr/bin/env bash
# Sparse upcycling against its control, at equal further training FLOPs, on the default corpus:
# a dense-tiny model trained to BASE FLOPs, then
#   (a) the dense model trained on for MORE FLOPs (a new schedule, as the others get),
#   (b) the dense model upcycled to a MoE (8 copies of each FFN, top-2) trained for MORE FLOPs,
#   (c) the same MoE trained from scratch for BASE + MORE FLOPs (the total compute of (a) and (b)).
# Usage: bash benchmarks/upcycling/run.sh [OUT] [BASE] [MORE]
set -euo pipefail
OUT=${1:-runs/upcycling}
BASE=${2:-1.6e13}
MORE=${3:-8e12}
ML=${MIXTURELM:-mixturelm}  # the command (MIXTURELM="python -m mixturelm" runs another checkout)
mkdir -p "$OUT"
done_() { [ -f "$1/results.json" ]; }  # a stage already finished (rerun with another MORE: copy dense-base over)
done_ "$OUT/dense-base" || $ML train --preset dense-tiny --max-flops "$BASE" --out "$OUT/dense-base"
for arm in "a-dense-continued dense" "b-upcycled-moe moe"; do
  set -- $arm
  done_ "$OUT/$1" && continue
  [ -d "$OUT/$1" ] || $ML upcycle "$OUT/dense-base" --to "$2" --max-flops "$MORE" --out "$OUT/$1"
  $ML train --resume --out "$OUT/$1"
done
# the upcycled MoE's shape: moe-tiny's 8 experts top-2, each expert as large as dense-tiny's FFN
D_FFN=$(python -c "from mixturelm.presets import get_preset; print(get_preset('dense-tiny').model['d_ffn'])")
TOTAL=$(python -c "print(float('$BASE') + float('$MORE'))")
done_ "$OUT/c-moe-scratch" || $ML train --preset moe-tiny --d-expert "$D_FFN" --max-flops "$TOTAL" --out "$OUT/c-moe-scratch"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
base = json.loads((out / "dense-base/results.json").read_text())
print(f"dense base: {base['val_loss']:.4f} after {base['train_flops']:.3g} FLOPs")
print("| run | further FLOPs | total FLOPs | steps | val loss | vs (a) |")
print("|---|---|---|---|---|---|")
a = None
for name in ("a-dense-continued", "b-upcycled-moe", "c-moe-scratch"):
    r = json.loads((out / name / "results.json").read_text())
    further = r["train_flops"] if name != "c-moe-scratch" else float("nan")
    total = r["train_flops"] + (base["train_flops"] if name != "c-moe-scratch" else 0.0)
    a = r["val_loss"] if a is None else a
    print(f"| {name} | {further:.3g} | {total:.3g} | {r['steps']} | {r['val_loss']:.4f} | {r['val_loss'] - a:+.4f} |")
PY
