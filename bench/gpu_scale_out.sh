#!/usr/bin/env bash
# Scale-out runs on 4 and 8 GPUs of one host (device kinds nvidia-h200-x4 / nvidia-h200-x8; issue 15). Logs and
# JSON under $OUT; a summary line per part. Each part is sized for one 600 s device call; name `.whl` in `carry`.
#   bash bench/gpu_scale_out.sh score05   # `grm-engine score --devices ...`, 0.5B shape, 512 examples x k = 8, on
#                                         # 1, 2, 4, 8 GPUs: critiques/s and scaling efficiency (target 7.5x at 8)
#   bash bench/gpu_scale_out.sh score7b   # the same at the 7B shape, 256 examples x k = 8
#   bash bench/gpu_scale_out.sh grpo7b    # GRPO, ZeRO-3, 7B shape, 8 prompts x 8 generations per GPU, 512-token
#                                         # prompts, 256 new: 2, 4, 8 GPUs; rollout / gather / reference / policy
#                                         # seconds, peak memory, efficiency from 2 to 8 GPUs (target >= 85%)
#   bash bench/gpu_scale_out.sh gemma27b  # the paper's base shape, Gemma 2 27B, GRPO with ZeRO-3 on 8 GPUs, the
#                                         # reference partitioned (reference sharded) and both models built
#                                         # partitioned (--zero-init): does it fit, step time, what dominates
# SCALE_OUT_DRY=1 prints the commands without running anything (how they were checked on a machine without GPUs);
# GPUS=N overrides the GPU count nvidia-smi reports.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
part=${1:?"part: score05 | score7b | grpo7b | gemma27b"}
W=/tmp/scale_out; mkdir -p "$W"
dry=${SCALE_OUT_DRY:-}
run() { echo "+ $*" >&2; [ -n "$dry" ] || "$@"; }
runlog() { local log=$1; shift; echo "+ $* > $log" >&2; [ -n "$dry" ] || "$@" > "$log" 2>&1; }
gpus=${GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
counts=(); for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && counts+=("$n"); done
echo "== $part on $gpus GPUs ($(date +%T))"
if [ -z "$dry" ]; then
  TESTS=none bash bench/gpu_run.sh none none >"$OUT/build_run.log" 2>&1; tail -2 "$OUT/build_run.log"
  # shellcheck disable=SC1091
  source bench/gpu_setup.sh >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
fi

score() {  # shape name, examples
  local shape=$1 examples=$2 model="$W/model_$1"
  run python3 - "$shape" "$examples" "$W" <<'PY'
import json, sys
sys.path.insert(0, "bench")
import gpu_score as b
from grm_engine.train.bench_hooks import SHAPES
shape, count, w = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = b.build_model(SHAPES[shape])
model.save_pretrained(f"{w}/model_{shape}")
b.word_tokenizer(SHAPES[shape]["vocab_size"]).save_pretrained(f"{w}/model_{shape}")
for name, examples in ((f"data_{shape}", b.synthetic_examples(count)), ("warm", b.synthetic_examples(16, seed=99))):
    with open(f"{w}/{name}.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps({"id": e.id, "query": e.query, "responses": e.responses, "best": e.best}) + "\n")
PY
  local common="--model $model --k 8 --max-tokens 256 --temperature 0.5 --chunk-size 512 --max-num-seqs 512 --kv-cache-memory-fraction 0.85"
  local all; all=$(seq -s, 0 $((gpus - 1)))
  # one warm-up on every GPU fills Triton's on-disk kernel cache (CUDA graphs are captured in every run)
  run timeout 200 python3 -m grm_engine score $common --data "$W/warm.jsonl" --devices "$all" --out "$W/warm_$shape.jsonl"
  for n in "${counts[@]}"; do
    local devices; devices=$(seq -s, 0 $((n - 1)))
    runlog "$OUT/score_${shape}_$n.log" timeout 300 python3 -m grm_engine score $common --data "$W/data_$shape.jsonl" \
      --devices "$devices" --out "$W/score_${shape}_$n.jsonl" || echo "FAILED score $shape x$n"
  done
  [ -n "$dry" ] || python3 - "$shape" "$OUT" "${counts[@]}" <<'PY'
import json, sys
shape, out, *counts = sys.argv[1:]
rows = {}
for n in counts:
    lines = [l for l in open(f"{out}/score_{shape}_{n}.log") if l.startswith("{")]
    if lines:
        rows[int(n)] = json.loads(lines[-1])
base = rows.get(1)
report = {"section": "scale_out_score", "shape": shape, "runs": {}}
for n, r in sorted(rows.items()):
    cps = r["samples"] / r["seconds"]
    report["runs"][n] = {"critiques_per_s": cps, "seconds": r["seconds"],
                         "speedup": base and cps / (base["samples"] / base["seconds"]),
                         "efficiency": base and cps / (base["samples"] / base["seconds"]) / n}
print(json.dumps(report))
json.dump(report, open(f"{out}/scale_out_score_{shape}.json", "w"), indent=1)
PY
}

grpo() {  # name, gpu count, seconds allowed, gpu_grpo.py args...
  local name=$1 n=$2 limit=$3; shift 3
  runlog "$OUT/grpo_$name.log" timeout "$limit" torchrun --standalone --nproc-per-node "$n" bench/gpu_grpo.py "$@" \
    --out "$OUT/grpo_$name.json" || echo "FAILED grpo $name"
  [ -n "$dry" ] || grep -v -i warn "$OUT/grpo_$name.log" | grep -E "Error|^step|^\{" | tail -5
}

case $part in
  score05) score 0.5b 512 ;;
  score7b) score 7b 256 ;;
  grpo7b)
    for n in 2 4 8; do
      [ "$n" -le "$gpus" ] && grpo "7b_x$n" "$n" 170 --shape 7b --deepspeed zero3 --prompts 8 --gens 8 --prompt-tokens 512 \
        --new 256 --warmup 1 --steps 2
    done
    [ -n "$dry" ] || python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
runs = {}
for n in (2, 4, 8):
    try:
        runs[n] = json.load(open(f"{out}/grpo_7b_x{n}.json"))
    except (OSError, ValueError):
        pass
rate = {n: r["rollout_tokens"] * r["world_size"] / r["step_s"] for n, r in runs.items()}
report = {"section": "scale_out_grpo", "shape": "7b", "zero": 3,
          "runs": {n: {k: r[k] for k in ("step_s", "rollout_s", "gather_s", "reference_s", "policy_s", "peak_gb")}
                   | {"tokens_per_s": rate[n]} for n, r in runs.items()}}
if 2 in rate and 8 in rate:
    report["efficiency_2_to_8"] = rate[8] / (4 * rate[2])
print(json.dumps(report))
json.dump(report, open(f"{out}/scale_out_grpo_7b.json", "w"), indent=1)
PY
    ;;
  gemma27b)
    grpo gemma27b_x"$gpus" "$gpus" 540 --shape gemma2-27b --deepspeed zero3 --reference sharded --zero-init --prompts 8 \
      --gens 8 --prompt-tokens 512 --new 256 --warmup 1 --steps 1 --gradient-checkpointing
    ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
echo "== done ($(date +%T))"
# the device tool returns at most 8 files from $OUT: everything also goes into all.tgz (sorted first)
(cd "$OUT" && tar czf all.tgz --exclude=all.tgz -- * 2>/dev/null) || true
