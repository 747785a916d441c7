#!/usr/bin/env bash
# Several GPUs on the nvidia-h200-x2 machine (logs and JSON under $OUT):
#   1. `grm-engine score` at the 0.5B shape (512 RewardBench-shaped examples x k = 8, up to 256 tokens, random-init
#      Qwen2.5-0.5B shape, bench/gpu_score.py's data and model) with --devices 0 and --devices 0,1: critiques/s
#      (target: 2 GPUs >= 1.9x one) and how many samples are identical between the two runs (noise is keyed by
#      the example; only batch composition can change a token through bf16 rounding);
#   2. GRPO at the 0.5B shape, ZeRO-2 and ZeRO-3, the same global batch (16 prompts x 8 generations x 256 new tokens):
#      1 GPU x 16 prompts vs torchrun 2 GPUs x 8 prompts: step time, memory, rollout tokens/s (target >= 1.8x);
#      and 1 GPU x 8 prompts (the single-GPU benchmark's shape) for reference.
#   3. SFT at the 7B shape (8 packed rows of 2,048 per step, micro-batch 1), ZeRO-2 and ZeRO-3: 1 GPU x 8 rows vs
#      torchrun 2 GPUs x 4 rows, the same global batch: tokens/s, peak memory, and the losses step by step (they
#      must agree: each rank draws its share of the one global batch, losses normalized by global token counts);
#      1 GPU may not hold 7B's fp32 master weights and Adam states (~122 GB): then its row says out of memory.
#   4. `grm-engine eval` of the demo's GRPO model on 1 and 2 GPUs (accuracy tables vs sample agreement).
#   bash bench/gpu_multi.sh score    # then: bash bench/gpu_multi.sh grpo (needs `carry: [".whl"]`: deepspeed;
#                                    # GRPO_ZEROS="zero2 zero3" by default);
#   bash bench/gpu_multi.sh eval     # (needs `carry: [".out/demo_eval"]`, see bench/make_demo_eval.py)
#   bash bench/gpu_multi.sh sft7b    # (needs `carry: [".whl"]`)
#                                    # each part fits one 600 s device call
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
parts=${1:-score,grpo}
W=/tmp/gpu_multi; rm -rf "$W"; mkdir -p "$W"
t() { echo "== $* ($(date +%T))"; }
TESTS=none bash bench/gpu_run.sh none none >"$OUT/build_run.log" 2>&1; tail -3 "$OUT/build_run.log"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader

if [[ ,$parts, == *,score,* ]]; then
  t "score: model and data"
  python3 - "$W" <<'PY' || exit 1
import json, sys
sys.path.insert(0, "bench")
import gpu_score as b
w = sys.argv[1]
model = b.build_model(b.SHAPE)
model.save_pretrained(f"{w}/model")
b.word_tokenizer(b.SHAPE["vocab_size"]).save_pretrained(f"{w}/model")
for name, examples in (("data", b.synthetic_examples(b.NUM_EXAMPLES)), ("warm", b.synthetic_examples(16, seed=99))):
    with open(f"{w}/{name}.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps({"id": e.id, "query": e.query, "responses": e.responses, "best": e.best}) + "\n")
PY
  common="--model $W/model --k 8 --max-tokens 256 --temperature 0.5 --chunk-size 512 --max-num-seqs 512 --kv-cache-memory-fraction 0.85"
  for devices in 0 0,1; do
    name=gpus_${devices/,/_}
    # a warm-up run fills Triton's on-disk kernel cache (CUDA graphs are captured in every run, as a user's would)
    timeout 150 python3 -m grm_engine score $common --data $W/warm.jsonl --devices $devices --out $W/warm_$name.jsonl \
      >"$OUT/score_warm_$name.log" 2>&1 || { echo "FAILED warm-up $devices"; tail -20 "$OUT/score_warm_$name.log"; }
    t "score --devices $devices"
    start=$(date +%s%N)
    timeout 240 python3 -m grm_engine score $common --data $W/data.jsonl --devices $devices --out $W/$name.jsonl \
      >"$OUT/score_$name.log" 2>&1 || { echo "FAILED score $devices"; grep -v "it/s\|ex/s" "$OUT/score_$name.log" | tail -20; }
    echo "wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/score_$name.log"
    tail -2 "$OUT/score_$name.log"
  done
  python3 - "$W" "$OUT" <<'PY'
import json, sys
w, out = sys.argv[1:]
def rows(name):
    with open(f"{w}/{name}.jsonl") as f:
        return {r["id"]: r for r in map(json.loads, f)}
def summary(name):
    lines = [l for l in open(f"{out}/score_{name}.log") if l.startswith("{")]
    wall = [float(l.split()[1]) / 1e3 for l in open(f"{out}/score_{name}.log") if l.startswith("wall_ms")]
    return {**json.loads(lines[-1]), "wall_s": wall[-1]}
one, two = rows("gpus_0"), rows("gpus_0_1")
assert list(one) == list(two), "the two files hold different ids or orders"
same = total = same_best = 0
for i in one:
    total += len(one[i]["samples"])
    same += sum(a["text"] == b["text"] for a, b in zip(one[i]["samples"], two[i]["samples"]))
    same_best += one[i]["best"] == two[i]["best"]
s1, s2 = summary("gpus_0"), summary("gpus_0_1")
critiques = s1["samples"]
report = {"section": "score_multi", "kind": "nvidia-h200-x2", "case": "512 ex x k=8 x <=256 tok, qwen2.5-0.5B shape, CLI",
          "one_gpu": s1, "two_gpus": s2,
          "one_critiques_per_s": critiques / s1["seconds"], "two_critiques_per_s": critiques / s2["seconds"],
          "speedup_scoring": s1["seconds"] / s2["seconds"], "speedup_wall": s1["wall_s"] / s2["wall_s"],
          "identical_samples": same, "samples": total, "identical_best": same_best, "examples": len(one)}
print(json.dumps(report))
json.dump(report, open(f"{out}/score_multi.json", "w"), indent=1)
PY
fi

if [[ ,$parts, == *,grpo,* ]]; then
  # shellcheck disable=SC1091
  source bench/gpu_setup.sh >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
  grpo() {  # zero stage, name, launcher..., then gpu_grpo.py's args
    local zero=$1 name=$2; shift 2
    t "grpo $zero $name"
    timeout 200 "$@" --shape 0.5b --deepspeed $zero --steps 3 --out "$OUT/grpo_${zero}_$name.json" \
      >"$OUT/grpo_${zero}_$name.log" 2>&1 || echo "FAILED grpo $zero $name"
    grep -v -i warn "$OUT/grpo_${zero}_$name.log" | grep -E "Error|^step|^\{" | tail -6
  }
  for zero in ${GRPO_ZEROS:-zero2 zero3}; do
    grpo $zero x1_p16 python3 bench/gpu_grpo.py --prompts 16
    grpo $zero x2_p8 torchrun --standalone --nproc-per-node 2 bench/gpu_grpo.py --prompts 8
    [ "$zero" != zero2 ] || grpo $zero x1_p8 python3 bench/gpu_grpo.py --prompts 8
  done
  python3 - "$OUT" ${GRPO_ZEROS:-zero2 zero3} <<'PY'
import json, sys
out, zeros = sys.argv[1], sys.argv[2:]
def tokens_per_s(r):  # rollout tokens of the whole step (every GPU) per second of step time
    return r["rollout_tokens"] * r["world_size"] / r["step_s"]
for zero in zeros:
    runs = {}
    for name in ("x1_p16", "x2_p8", "x1_p8"):
        try:
            runs[name] = json.load(open(f"{out}/grpo_{zero}_{name}.json"))
        except (OSError, ValueError):
            runs[name] = None
    row = {"section": "grpo_multi", "kind": "nvidia-h200-x2", "case": f"0.5B, {zero}, 16 prompts x 8 gens x 256 new per step"}
    for name, r in runs.items():
        if r:
            row[name] = {k: r.get(k) for k in ("world_size", "prompts_per_gpu", "step_s", "rollout_s", "gather_s",
                                               "reference_s", "policy_s", "peak_gb")}
            row[name]["rollout_tokens_per_s"] = tokens_per_s(r)
            for key in ("loss", "kl", "grad_norm", "reward_mean"):  # every step, warm-up included
                row[name][key] = [s.get(key) for s in r["steps"]]
    if runs["x1_p16"] and runs["x2_p8"]:
        row["speedup_same_global_batch"] = tokens_per_s(runs["x2_p8"]) / tokens_per_s(runs["x1_p16"])
        for key in ("kl", "grad_norm", "reward_mean"):  # the same global batch: these should agree step by step
            row[f"max_rel_diff_{key}"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in
                                             zip(row["x1_p16"][key], row["x2_p8"][key]))
    print(json.dumps(row))
    json.dump(row, open(f"{out}/grpo_multi_{zero}.json", "w"), indent=1)
PY
fi

if [[ ,$parts, == *,eval,* ]]; then
  # `grm-engine eval` of the demo's trained GRPO model (carried in .out/demo_eval: model, meta RM, 1,024 held-out
  # examples, written here by bench/make_demo_eval.py from a finished `grm-engine demo` run) on 1 and 2 GPUs:
  # the accuracy tables must be equal within the measured sample agreement
  D=.out/demo_eval
  [ -d $D/model ] || { echo "no $D (run bench/make_demo_eval.py here and carry .out/demo_eval)"; exit 1; }
  for devices in 0 0,1; do
    name=gpus_${devices/,/_}
    t "eval --devices $devices"
    start=$(date +%s%N)
    timeout 240 python3 -m grm_engine eval --model $D/model --meta-rm $D/meta_rm --data $D/test.jsonl --k 1,8,32 \
      --max-tokens 48 --seed 0 --tie-policy strict --max-num-seqs 1024 --devices $devices --out-dir $W/eval_$name \
      >"$OUT/eval_$name.log" 2>&1 || { echo "FAILED eval $devices"; grep -v "it/s\|ex/s" "$OUT/eval_$name.log" | tail -20; }
    echo "wall_ms $(( ($(date +%s%N) - start) / 1000000 ))" | tee -a "$OUT/eval_$name.log"
    cp $W/eval_$name/results.json "$OUT/eval_results_$name.json" 2>/dev/null
  done
  python3 bench/compare_evals.py $W/eval_gpus_0 $W/eval_gpus_0_1 --out "$OUT/eval_multi.json"
fi

if [[ ,$parts, == *,sft7b,* ]]; then
  # shellcheck disable=SC1091
  source bench/gpu_setup.sh >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
  for zero in ${SFT_ZEROS:-zero2 zero3}; do
    for n in 2 1; do
      t "sft 7b $zero x$n"
      timeout 140 torchrun --standalone --nproc-per-node $n bench/gpu_sft_baseline.py --shape 7b --variants ours \
        --ours-deepspeed $zero --batch $((8 / n)) --micro-batch 1 --warmup 1 --steps 3 \
        --out "$OUT/sft7b_${zero}_x$n.json" >"$OUT/sft7b_${zero}_x$n.log" 2>&1 || echo "FAILED sft 7b $zero x$n"
    done
  done
  python3 - "$OUT" ${SFT_ZEROS:-zero2 zero3} <<'PY'
import json, sys
out = sys.argv[1]
report = {"section": "sft_multi", "kind": "nvidia-h200-x2", "case": "7B shape, 8 x 2,048 packed per step"}
for zero in sys.argv[2:]:
    for n in (1, 2):
        try:
            row = json.load(open(f"{out}/sft7b_{zero}_x{n}.json"))["rows"][0]
        except (OSError, ValueError, IndexError):
            row = {"error": "no result (see the log: out of memory?)"}
        report[f"{zero}_x{n}"] = {k: row.get(k) for k in ("tok_s", "step_s", "peak_alloc_GB", "losses", "error")}
    one, two = report[f"{zero}_x1"], report[f"{zero}_x2"]
    if one.get("tok_s") and two.get("tok_s"):
        report[f"{zero}_speedup"] = two["tok_s"] / one["tok_s"]
        report[f"{zero}_max_loss_diff"] = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
print(json.dumps(report))
json.dump(report, open(f"{out}/sft_multi.json", "w"), indent=1)
PY
fi
t done
# the device tool returns at most 8 files from $OUT: everything also goes into all.tgz (sorted first)
(cd "$OUT" && tar czf all.tgz --exclude=all.tgz -- * 2>/dev/null) || true
