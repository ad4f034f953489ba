#!/usr/bin/env bash
# GPU readiness, on one GPU in under 8 minutes: the CUDA tests (tests/test_cuda.py), then the headline figures
# (benchmarks/gpu/headline.py), into one results file.
#   bash benchmarks/gpu/run.sh [RESULTS_JSON]            default benchmarks/gpu/results.json
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu/run.sh /tmp/r.json   tries the script where there is no GPU
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-benchmarks/gpu/results.json}
device=${DEVICE:-cuda}
tests_log=$(mktemp)
set +e
MIXTURELM_TEST_DEVICE=$device timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$tests_log"
tests_rc=${PIPESTATUS[0]}
set -e
timeout 360 python3 benchmarks/gpu/headline.py --device "$device" --out "$out" ${QUICK:+--quick}
python3 - "$out" "$tests_log" "$tests_rc" <<'PY'
import json, sys
path, log, rc = sys.argv[1], open(sys.argv[2]).read().strip().splitlines(), int(sys.argv[3])
r = json.load(open(path))
r["cuda_tests"] = {"exit_status": rc, "summary": log[-1] if log else ""}
json.dump(r, open(path, "w"), indent=1)
print("cuda tests:", r["cuda_tests"])
PY
