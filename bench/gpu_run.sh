#!/usr/bin/env bash
# One call on the lent GPU machine: install carried wheels (peers), build grm-engine against the
# machine's torch, run the GPU test lane and the GPU benchmarks, keep logs under $OUT.
#   bash bench/gpu_run.sh "<pytest targets or empty for all>" "<bench sections>"
# e.g. bash bench/gpu_run.sh "tests/test_loss.py" "ceilings,loss"
# PYTEST_ARGS (default -x) replaces the stop-at-first-failure flag, e.g. PYTEST_ARGS= to run every test.
# Carried wheels (.whl/: Liger, DeepSpeed, TRL) go to /tmp/site: a later command in the same call that needs them
# must `export PYTHONPATH=/tmp/site` itself (this script's export does not reach its caller).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
tests=${1:-tests}
sections=${2:-ceilings,loss,parse,decode,cascade,score}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
start=$(date +%s)
if ! python3 -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  echo "BUILD WITH CUDA FAILED; the errors:"; grep -E "error|Error" "$OUT/build.log" | head -30
  echo "retrying without the CUDA extension"
  GRM_ENGINE_CUDA=0 python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import grm_engine, json; print(json.dumps(grm_engine.backends()))"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader
if [ "$tests" != "none" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m gpu -q ${PYTEST_ARGS--x} -p no:cacheprovider $tests 2>&1 | tee "$OUT/pytest.log" | tail -25
fi
if [ "$sections" != "none" ]; then
  timeout ${BENCH_TIMEOUT:-400} python3 bench/gpu.py --only "$sections" --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
