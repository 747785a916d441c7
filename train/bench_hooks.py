"""The training steps as the GPU benchmarks drive them (bench/gpu_sft_baseline.py): the same engine, loss and
packing as `grm-engine train sft`, on batches the benchmark builds (random-init model, packed rows). Also the one
definition of the benchmarks' Qwen2.5 shapes and random-init model (bench/gpu_grpo.py, bench/gpu_sft_baseline.py)."""
from __future__ import annotations

import torch

from .batches import MicroBatch
from .config import SFTConfig
from .engine import Engine, all_reduce_sum
from .sft import sft_micro_loss


SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,  # Qwen2.5-0.5B
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,  # Qwen2.5-7B
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,  # CPU smoke tests
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True),
}


GEMMA2_SHAPES = {
    "gemma2-27b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,  # the
                       num_key_value_heads=16, head_dim=128, vocab_size=256000, query_pre_attn_scalar=144,  # paper's
                       sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),  # base model
    "gemma2-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,  # CPU smoke
                        num_key_value_heads=2, head_dim=16, vocab_size=4096, query_pre_attn_scalar=16,
                        sliding_window=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


def model_config(name: str):
    """The benchmarks' config for a shape name: a Qwen2.5 shape (SHAPES) or a Gemma 2 shape (GEMMA2_SHAPES, eager
    attention: transformers has no SDPA path for its soft-capping)."""
    if name in GEMMA2_SHAPES:
        from transformers import Gemma2Config

        return Gemma2Config(**GEMMA2_SHAPES[name], max_position_embeddings=8192, use_cache=False,
                            attn_implementation="eager")
    return qwen2_config(SHAPES[name])


def qwen2_config(shape: dict):
    """A Qwen2.5 config of `shape` (one of SHAPES): Qwen2.5's rope base and norm epsilon, no KV cache (training)."""
    from transformers import Qwen2Config

    return Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       hidden_act="silu", use_cache=False, attn_implementation="sdpa")


def random_model(model_config, device, dtype, seed: int = 0, zero3_config: dict | None = None):
    """Random init directly on the device in `dtype` (a 7B model built on the CPU in fp32 takes minutes).
    zero3_config: a DeepSpeed ZeRO-3 config: the parameters are partitioned across the ranks as they are built
    (transformers' DeepSpeed integration: zero.Init, weights initialized gathered), so no rank ever holds the whole
    model (a 27B policy and its reference do not fit one GPU together)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    attention = getattr(model_config, "_attn_implementation", None) or "sdpa"
    zero3 = None
    if zero3_config is not None:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(zero3_config)  # transformers builds under zero.Init while this object lives
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(model_config, attn_implementation=attention, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
        del zero3


def sft_bench_init(model_config, args, device) -> dict:
    """model_config: a transformers config; args: the benchmark's (ours_deepspeed, precision, micro_batch)."""
    deepspeed = getattr(args, "ours_deepspeed", None) or ""
    cuda = device.type == "cuda"
    model = random_model(model_config, device, torch.bfloat16 if (deepspeed and cuda) else torch.float32)
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
    """One optimizer step: micro-batches of state["micro"] rows, loss = mean over the step's completion tokens of
    every rank (as `train sft` normalizes: the gradient of N ranks x B rows equals that of one rank x N*B rows)."""
    engine, micro = state["engine"], state["micro"]
    total = int(all_reduce_sum([float(batch["loss_mask"].sum())], engine.device)[0])
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
    return all_reduce_sum([loss_sum], engine.device)[0] / total
