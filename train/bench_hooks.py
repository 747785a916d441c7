"""The training steps as the GPU benchmarks drive them (bench/gpu_sft_baseline.py): the same engine, loss and
packing as `grm-engine train sft`, on batches the benchmark builds (random-init model, packed rows)."""
from __future__ import annotations

import torch

from .batches import MicroBatch
from .config import SFTConfig
from .engine import Engine
from .sft import sft_micro_loss


def sft_bench_init(model_config, args, device) -> dict:
    """model_config: a transformers config; args: the benchmark's (ours_deepspeed, precision, micro_batch)."""
    from transformers import AutoModelForCausalLM

    deepspeed = getattr(args, "ours_deepspeed", None) or ""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if (deepspeed and cuda) else torch.float32
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    micro = getattr(args, "micro_batch", None) or args.batch
    config = SFTConfig(model="bench", data="bench", output_dir="bench", learning_rate=1e-5, device=str(device),
                       dtype="bfloat16" if cuda else "float32", deepspeed=deepspeed,
                       per_device_train_batch_size=micro,
                       gradient_accumulation_steps=max(1, args.batch // micro), max_grad_norm=1.0,
                       lr_scheduler_type="constant")
    engine = Engine(model, config, total_steps=1000)
    return {"engine": engine, "micro": micro, "device": device}


def _micro_batch(batch: dict, rows: slice) -> MicroBatch:
    input_ids = batch["input_ids"][rows]
    S, L = input_ids.shape
    segment = torch.empty((S, L), dtype=torch.long, device=input_ids.device)
    for s, lengths in enumerate(batch["doc_lens"][rows]):
        segment[s] = torch.repeat_interleave(torch.arange(len(lengths), device=input_ids.device),
                                             torch.tensor(lengths, device=input_ids.device))
    causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # [S, 1, L, L]
    return MicroBatch(input_ids, batch["position_ids"][rows], mask, batch["target_ids"][rows],
                      batch["loss_mask"][rows], [], None, S, S * L)


def sft_bench_step(state: dict, batch: dict) -> float:
    """One optimizer step: micro-batches of state["micro"] rows, loss = mean over the step's completion tokens."""
    engine, micro = state["engine"], state["micro"]
    total = int(batch["loss_mask"].sum())
    rows = batch["input_ids"].shape[0]
    loss_sum = 0.0
    starts = list(range(0, rows, micro))
    for i, start in enumerate(starts):
        mb = _micro_batch(batch, slice(start, start + micro))
        with engine.autocast():
            loss, stats = sft_micro_loss(engine.module, mb)
        engine.backward(loss / total, last=i == len(starts) - 1)
        loss_sum += float(stats["loss_sum"])
    engine.step()
    return loss_sum / total
