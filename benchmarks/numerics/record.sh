#!/usr/bin/env bash
# Numerics record of a mixturelm source tree, through the command line only, so that two versions of the
# code (before and after a change that must not alter any number) can be compared with compare.py:
#   bash benchmarks/numerics/record.sh SRC_TREE OUT_DIR     (SRC_TREE: a checkout, e.g. a git worktree)
# Trains every debug preset and some router/option variants 12 steps on a fixed synthetic corpus, runs a
# debug-size compare of the five architectures, the NIFTY ensemble, eval, generate, flops and inspect.
set -euo pipefail
SRC=$1; OUT=$2
rm -rf "$OUT"; mkdir -p "$OUT"
export PYTHONPATH=$SRC/src OMP_NUM_THREADS=2 MIXTURELM_CACHE=$OUT/cache
python3 - <<'PY' "$OUT/corpus"
import sys, numpy as np
from pathlib import Path
WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not but "
         "model expert token router depth layer block sequence train loss value mixture compute").split()
d = Path(sys.argv[1]); (d / "sub").mkdir(parents=True)
for i in range(40):
    rng = np.random.default_rng(i); w = rng.choice(WORDS, size=1600)
    (d / ("sub" if i == 0 else ".") / f"doc{i:02d}.txt").write_text("".join(" ".join(w[j:j+12]) + ".\n" for j in range(0, 1600, 12)))
PY
for p in dense-debug moe-debug moe-fg-debug mod-debug mode-debug mode-staged-debug peer-debug; do
  python3 -m mixturelm train --preset $p --data $OUT/corpus --max-steps 12 --eval-every 6 --out $OUT/runs/$p --no-progress > $OUT/$p.log 2>&1
done
python3 -m mixturelm train --preset moe-debug --router sigmoid_bias --data $OUT/corpus --max-steps 12 --eval-every 6 --out $OUT/runs/moe-sb --no-progress > $OUT/moe-sb.log 2>&1
python3 -m mixturelm train --preset moe-debug --router expert_choice --data $OUT/corpus --max-steps 12 --eval-every 6 --out $OUT/runs/moe-ec --no-progress > $OUT/moe-ec.log 2>&1
python3 -m mixturelm train --preset mod-debug --mod-causal predictor --data $OUT/corpus --max-steps 12 --eval-every 6 --out $OUT/runs/mod-pred --no-progress > $OUT/mod-pred.log 2>&1
python3 -m mixturelm train --preset peer-debug --peer-query-norm whiten --data $OUT/corpus --max-steps 12 --eval-every 6 --out $OUT/runs/peer-white --no-progress > $OUT/peer-white.log 2>&1
python3 -m mixturelm compare --size debug --flops 3e11 --data $OUT/corpus --eval-tokens 4096 --out $OUT/compare --no-progress > $OUT/compare.log 2>&1
python3 -m mixturelm ensemble nifty --out $OUT/nifty > $OUT/nifty.log 2>&1
python3 -m mixturelm eval --ckpt $OUT/runs/peer-debug > $OUT/eval-peer.log 2>&1
python3 -m mixturelm eval --ckpt $OUT/runs/mode-staged-debug > $OUT/eval-mode-staged.log 2>&1
python3 -m mixturelm inspect --ckpt $OUT/runs/mode-staged-debug --text "def f(x):\n    return x" --out $OUT/inspect-ms > $OUT/inspect-ms.log 2>&1
python3 -m mixturelm flops --preset peer-debug --json > $OUT/flops-peer.json
python3 -m mixturelm flops --preset mode-staged-debug --json > $OUT/flops-ms.json
python3 -m mixturelm generate --ckpt $OUT/runs/mod-debug --prompt "the model" --max-new-tokens 40 --temperature 0 > $OUT/gen-mod.log 2>&1
echo done
