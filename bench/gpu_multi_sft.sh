#!/usr/bin/env bash
# Two GPUs, the real launchers: `grm-engine train sft` on 1 GPU vs `deepspeed --num_gpus 2` and `torchrun` at the
# same global batch (ZeRO-2 and ZeRO-3), then a resume under the launcher; prints the loss columns side by side.
set -uo pipefail
OUT=${1:-/tmp/out}; W=/tmp/multi_sft; rm -rf "$W"; mkdir -p "$W"
python3 - "$W" <<'PY'
import json, random, sys, torch, transformers as tf
from grm_engine.demo import build_tokenizer, sentence
from grm_engine import build_prompt
w = sys.argv[1]
tok = build_tokenizer(f"{w}/base")
torch.manual_seed(0)
cfg = tf.Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
tf.Qwen2ForCausalLM(cfg).save_pretrained(f"{w}/base")
rng = random.Random(0)
with open(f"{w}/sft.jsonl", "w") as f:
    for i in range(256):
        f.write(json.dumps({"prompt": build_prompt(sentence(rng), [sentence(rng), sentence(rng)]),
                            "completion": f"Scores: \\boxed{{{rng.randint(1, 10)}, {rng.randint(1, 10)}}}"}) + "\n")
PY
common="--model $W/base --data $W/sft.jsonl --max_steps 6 --logging_steps 1 --save_steps 3 --learning_rate 1e-4 --gradient_accumulation_steps 2 --dtype float32 --report_plot false"
run() { name=$1; shift; echo "-- $name"; "$@" >"$OUT/multi_$name.log" 2>&1 || { echo "FAILED $name"; grep -v -i warn "$OUT/multi_$name.log" | tail -15; }; }
run one_z2 python3 -m grm_engine train sft $common --output_dir $W/one_z2 --per_device_train_batch_size 8 --deepspeed zero2
run ds2_z2 deepspeed --num_gpus 2 --module grm_engine train sft $common --output_dir $W/ds2_z2 --per_device_train_batch_size 4 --deepspeed zero2
[ -n "${SKIP_TORCHRUN:-}" ] || run tr2_z3 torchrun --nproc-per-node 2 -m grm_engine train sft $common --output_dir $W/tr2_z3 --per_device_train_batch_size 4 --deepspeed zero3
# resume under the launcher: a 3-step run, then the same command with max_steps 6
run ds2_z3_a deepspeed --num_gpus 2 --module grm_engine train sft ${common/--max_steps 6/--max_steps 3} --output_dir $W/ds2_z3r --per_device_train_batch_size 4 --deepspeed zero3
run ds2_z3_b deepspeed --num_gpus 2 --module grm_engine train sft $common --output_dir $W/ds2_z3r --per_device_train_batch_size 4 --deepspeed zero3
python3 - "$W" "$OUT" <<'PY'
import json, sys
w, out = sys.argv[1:]
runs = ["one_z2", "ds2_z2", "tr2_z3", "ds2_z3r"]
table = {}
for r in runs:
    try:
        table[r] = {row["step"]: row["loss"] for row in map(json.loads, open(f"{w}/{r}/metrics.jsonl"))}
    except OSError:
        table[r] = {}
print("step | " + " | ".join(runs))
for step in range(1, 7):
    print(f"{step} | " + " | ".join(f"{table[r].get(step, float('nan')):.6f}" for r in runs))
json.dump(table, open(f"{out}/multi_sft.json", "w"), indent=1)
PY
