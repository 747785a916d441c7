#!/usr/bin/env bash
# Training benchmarks and GPU tests on the lent machine, one call per part (results and logs under $OUT):
#   bash bench/gpu_train.sh grpo     # 1 GPU: build, GPU training tests, our GRPO step (0.5B, ZeRO-2) vs TRL GRPOTrainer
#   bash bench/gpu_train.sh sft      # 1 GPU: GPU training tests, SFT tokens/s + memory, ours (plain, ZeRO-2, ZeRO-3) vs transformers
#   bash bench/gpu_train.sh multi    # 2 GPUs: `deepspeed --num_gpus 2` / torchrun SFT (ZeRO-2/3) vs 1 GPU, resume; 7B GRPO ZeRO-3 on 2
# Needs `carry: [".whl"]` (deepspeed, trl and their needs; bench/gpu_setup.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
part=${1:?grpo | sft | multi}
TESTS=none bash bench/gpu_run.sh none none >"$OUT/build_run.log" 2>&1; tail -3 "$OUT/build_run.log"
# shellcheck disable=SC1091
source bench/gpu_setup.sh >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
t() { echo "== $* ($(date +%T))"; }
gpu_tests() {
  t pytest; timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_train_gpu.py >"$OUT/pytest_train_gpu.log" 2>&1
  grep -E "^E |Error|passed|failed" "$OUT/pytest_train_gpu.log" | tail -20
}
sft_variant() {  # name, extra args
  local name=$1; shift
  t "sft $name"; timeout 150 python3 bench/gpu_sft_baseline.py "$@" --out "$OUT/sft_$name.json" >"$OUT/sft_$name.log" 2>&1
  grep -v -i warn "$OUT/sft_$name.log" | grep -E "Error|^ours|^hf|^case" | tail -6
}
case "$part" in
grpo)
  gpu_tests
  t ours; timeout 200 python3 bench/gpu_grpo.py --shape 0.5b --deepspeed zero2 --out "$OUT/grpo_ours_05b.json" 2>&1 | grep -v -i warn | tail -6
  t trl; timeout 300 python3 bench/gpu_trl_grpo.py --variants "${TRL_VARIANTS:-nogc,gc}" --steps 2 --out "$OUT/grpo_trl_05b.json" 2>&1 | tail -12
  ;;
sft)
  gpu_tests
  sft_variant 05b_hf --shape 0.5b --variants hf
  sft_variant 05b_ours --shape 0.5b --variants ours
  sft_variant 05b_zero2 --shape 0.5b --variants ours --ours-deepspeed zero2
  sft_variant 05b_zero3 --shape 0.5b --variants ours --ours-deepspeed zero3
  ;;
launcher)
  t ds2; SKIP_TORCHRUN=1 timeout 300 bash bench/gpu_multi_sft.sh "$OUT" 2>&1 | tail -12
  ;;
multi)
  t ds2; timeout 300 bash bench/gpu_multi_sft.sh "$OUT" 2>&1 | tail -20
  t grpo7b2; timeout 250 torchrun --nproc-per-node 2 bench/gpu_grpo.py --shape 7b --deepspeed zero3 --steps 2 \
    --gradient-checkpointing --out "$OUT/grpo_ours_7b_z3_x2.json" >"$OUT/grpo7b2.log" 2>&1
  grep -v -i warn "$OUT/grpo7b2.log" | grep -E "Error|^step|section" | tail -8
  ;;
esac
t done
