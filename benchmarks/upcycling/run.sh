#!/usr/bin/env bash
# Sparse upcycling against its control, at equal further training FLOPs, on the default corpus:
# a dense-tiny model trained to BASE FLOPs, then
#   (a) the dense model trained on for MORE FLOPs (a new schedule, as the others get),
#   (b) the dense model upcycled to a MoE (8 copies of each FFN, top-2) trained for MORE FLOPs,
#   (c) the same MoE trained from scratch for BASE + MORE FLOPs (the total compute of (a) and (b)),
#   (d) the dense model upcycled to 8 experts of half the FFN (fine-grained slices) top-2, for MORE FLOPs.
# Usage: bash benchmarks/upcycling/run.sh [OUT] [BASE] [MORE] [SEED]
#   SEED (default 0) varies the continuations (new routers, data order) and (c); ARMS="a b d" runs only those.
set -euo pipefail
OUT=${1:-runs/upcycling}
BASE=${2:-1.6e13}
MORE=${3:-8e12}
SEED=${4:-0}
ARMS=${ARMS:-a b c d}
ML=${MIXTURELM:-mixturelm}  # the command (MIXTURELM="python -m mixturelm" runs another checkout)
mkdir -p "$OUT"
done_() { [ -f "$1/results.json" ]; }  # a stage already finished (rerun with another MORE: copy dense-base over)
done_ "$OUT/dense-base" || $ML train --preset dense-tiny --max-flops "$BASE" --out "$OUT/dense-base"
# (d): the FFN cut into 2 slices, 8 experts of half its size top-2: the dense model's FLOPs per token
for arm in "a-dense-continued dense" "b-upcycled-moe moe" "d-upcycled-fine moe --granularity 2 --top-k 2"; do
  set -- $arm
  name=$1; shift
  [[ " $ARMS " == *" ${name:0:1} "* ]] || continue
  done_ "$OUT/$name" && continue
  [ -d "$OUT/$name" ] || $ML upcycle "$OUT/dense-base" --to "$@" --max-flops "$MORE" --seed "$SEED" --out "$OUT/$name"
  $ML train --resume --out "$OUT/$name"
done
# the upcycled MoE's shape: moe-tiny's 8 experts top-2, each expert as large as dense-tiny's FFN
D_FFN=$(python -c "from mixturelm.presets import get_preset; print(get_preset('dense-tiny').model['d_ffn'])")
TOTAL=$(python -c "print(float('$BASE') + float('$MORE'))")
if [[ " $ARMS " == *" c "* ]] && ! done_ "$OUT/c-moe-scratch"; then
  $ML train --preset moe-tiny --d-expert "$D_FFN" --max-flops "$TOTAL" --seed "$SEED" --out "$OUT/c-moe-scratch"
fi
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
base = json.loads((out / "dense-base/results.json").read_text())
print(f"dense base: {base['val_loss']:.4f} after {base['train_flops']:.3g} FLOPs")
print("| run | further FLOPs | total FLOPs | steps | val loss | vs (a) |")
print("|---|---|---|---|---|---|")
a = None
for name in ("a-dense-continued", "b-upcycled-moe", "c-moe-scratch", "d-upcycled-fine"):
    if not (out / name / "results.json").is_file():
        continue
    r = json.loads((out / name / "results.json").read_text())
    further = r["train_flops"] if name != "c-moe-scratch" else float("nan")
    total = r["train_flops"] + (base["train_flops"] if name != "c-moe-scratch" else 0.0)
    a = r["val_loss"] if a is None else a
    print(f"| {name} | {further:.3g} | {total:.3g} | {r['steps']} | {r['val_loss']:.4f} | {r['val_loss'] - a:+.4f} |")
PY
