#!/usr/bin/env bash
# Training benchmarks and GPU tests on the lent machine, one call per part (results under $OUT):
#   bash bench/gpu_train.sh grpo     # 1 GPU: build, GPU training tests, our GRPO step (0.5B, ZeRO-2) vs TRL GRPOTrainer
#   bash bench/gpu_train.sh sft      # 1 GPU: SFT tokens/s + memory, ours (plain, ZeRO-2, ZeRO-3) vs transformers; 7B GRPO ZeRO-3
#   bash bench/gpu_train.sh multi    # 2 GPUs: `deepspeed --num_gpus 2` SFT (ZeRO-2/3) vs 1 GPU, resume; 7B GRPO ZeRO-3 on 2
# Needs `carry: [".whl"]` (deepspeed, trl and their needs; bench/gpu_setup.sh).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
part=${1:?grpo | sft | multi}
TESTS=none bash bench/gpu_run.sh none none >"$OUT/build_run.log" 2>&1; tail -3 "$OUT/build_run.log"
# shellcheck disable=SC1091
source bench/gpu_setup.sh >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
t() { echo "== $* ($(date +%T))"; }
case "$part" in
grpo)
  t pytest; timeout 240 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/test_train_gpu.py 2>&1 | tail -8
  t ours; timeout 200 python3 bench/gpu_grpo.py --shape 0.5b --deepspeed zero2 --out "$OUT/grpo_ours_05b.json" 2>&1 | grep -v -i warn | tail -6
  t trl; timeout 300 python3 bench/gpu_trl_grpo.py --variants ${TRL_VARIANTS:-nogc,gc} --steps 2 --out "$OUT/grpo_trl_05b.json" 2>&1 | tail -12
  ;;
sft)
  t pytest; timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_train_gpu.py 2>&1 | tail -8
  for v in hf ours zero2 zero3; do
    case $v in hf) a="--variants hf";; ours) a="--variants ours";; *) a="--variants ours --ours-deepspeed $v";; esac
    t "sft 0.5b $v"; timeout 150 python3 bench/gpu_sft_baseline.py --shape 0.5b $a --out "$OUT/sft_05b_$v.json" 2>&1 | tail -3
  done
  t grpo7b; timeout 240 python3 bench/gpu_grpo.py --shape 7b --deepspeed zero3 --steps 2 --gradient-checkpointing --out "$OUT/grpo_ours_7b_z3.json" 2>&1 | grep -v -i warn | tail -5
  ;;
multi)
  t ds2; timeout 280 bash bench/gpu_multi_sft.sh "$OUT" 2>&1 | tail -20
  t grpo7b2; timeout 250 torchrun --nproc-per-node 2 bench/gpu_grpo.py --shape 7b --deepspeed zero3 --steps 2 --gradient-checkpointing \
    --out "$OUT/grpo_ours_7b_z3_x2.json" 2>&1 | grep -v -i warn | tail -5
  ;;
esac
t done
