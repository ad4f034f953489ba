#!/usr/bin/env bash
# The MoE-F figures of the README: NIFTY, then the LM stream (three dense-tiny experts, ~5 min of training
# on 2 CPU cores without other load), then the development/test protocol of `ensemble tune` (its own three
# experts, the standard library's code without site-packages). Outputs in runs/; the recorded copies are in
# benchmarks/ensemble/.
set -euo pipefail
cd "$(dirname "$0")/../.."
mixturelm ensemble nifty --out runs/moef/nifty
python benchmarks/ensemble/pydoc_topics.py runs/data/pydoc-topics
STD=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
mixturelm train --preset dense-tiny --data "$STD" --val-fraction 0.1 --max-steps 300 --out runs/moef/python --overwrite
mixturelm train --preset dense-tiny --data runs/data/pydoc-topics --val-fraction 0.1 --max-steps 300 --out runs/moef/prose --overwrite
mixturelm train --preset dense-tiny --data "$STD,runs/data/pydoc-topics" --val-fraction 0.1 --max-steps 300 --out runs/moef/both --overwrite
mixturelm ensemble lm --experts runs/moef/python runs/moef/prose --data "$STD,runs/data/pydoc-topics" --out runs/moef/lm2
mixturelm ensemble lm --experts runs/moef/python runs/moef/prose runs/moef/both --data "$STD,runs/data/pydoc-topics" --out runs/moef/lm3
# The tuning protocol, fixed before any result was seen: choose on the dev halves of (stdlib code, pydoc topics);
# report on the test halves of that pair and of (stdlib code, Debian Handbook + Debian Reference prose).
[ -d runs/data/prose ] || python benchmarks/compare/prose_corpus.py runs/data/prose
mixturelm train --preset dense-tiny --data stdlib --val-fraction 0.1 --max-steps 300 --out runs/moef/tune-python --overwrite
mixturelm train --preset dense-tiny --data runs/data/pydoc-topics --val-fraction 0.1 --max-steps 300 --out runs/moef/tune-prose --overwrite
mixturelm train --preset dense-tiny --data stdlib,runs/data/pydoc-topics --val-fraction 0.1 --max-steps 300 --out runs/moef/tune-both --overwrite
mixturelm ensemble tune --experts runs/moef/tune-python runs/moef/tune-prose runs/moef/tune-both \
    --dev-data "stdlib,runs/data/pydoc-topics" \
    --test-data "stdlib,runs/data/pydoc-topics;stdlib,runs/data/prose/[hr]*.txt" \
    --segments 16 --out runs/moef/tune --overwrite
