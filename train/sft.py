"""`grm-engine train sft`: supervised fine-tuning on {"prompt", "completion"} rows, loss on completion tokens only.

The prompt is used as written (build_prompt's text for GRM critiques) and tokenized as GRM scoring tokenizes
it; the completion is tokenized on its own and ends with EOS, so the model learns exactly the token sequence
the decoder continues from. The loss goes through the fused lm_head (train/losses.py).
"""
from __future__ import annotations


import numpy as np
import torch

from ..protocol import encode_text
from .batches import Row, model_attention_mask
from .config import ConfigError, jsonl_objects
from .loop import TrainResult, run_supervised
from .losses import completion_nll_sum, final_logit_softcap
from .run_dir import check_model_dir, load_causal_lm, load_dtype, load_tokenizer, prepare_output_dir


def encode_completion(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def read_prompt_completion(path: str) -> list[tuple[str, str, str]]:
    """[(prompt, completion, 'file:line')] from a jsonl file; every error names the file, line and field."""
    rows = []
    for number, where, obj in jsonl_objects(path, "a JSON object with prompt and completion"):
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise ConfigError(f"{where}, field '{key}': a non-empty string is required")
        rows.append((obj["prompt"], obj["completion"], f"{path}:{number}"))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def tokenize_rows(pairs, tokenizer, max_seq_length: int) -> list[Row]:
    rows = []
    for prompt, completion, key in pairs:
        row = Row(encode_text(tokenizer, prompt), encode_completion(tokenizer, completion), key=key)
        if len(row) > max_seq_length:
            raise ConfigError(f"{key}: {len(row)} tokens (prompt {len(row.prompt_ids)} + completion "
                              f"{len(row.completion_ids)}) exceed max_seq_length = {max_seq_length}")
        rows.append(row)
    return rows


def mix_general(task_rows: list[Row], general_rows: list[Row], ratio: float, seed: int) -> list[Row]:
    """Add general rows so they are `ratio` of the mix (a fixed, seeded subset; repeated if too few)."""
    if not ratio or not general_rows:
        return task_rows
    want = int(round(ratio / (1 - ratio) * len(task_rows)))
    rng = np.random.default_rng([seed, 11])
    picks = rng.choice(len(general_rows), size=want, replace=want > len(general_rows))
    return task_rows + [general_rows[int(i)] for i in picks]


def causal_lm_builder(config, device):
    dtype = load_dtype(config, device)

    def build(path):
        return load_causal_lm(path, config, dtype)

    return build


def sft_micro_loss(module, batch):
    """Fused lm_head + NLL summed over the completion tokens of one micro-batch."""
    body = module.get_decoder() if hasattr(module, "get_decoder") else module.base_model
    hidden = body(input_ids=batch.input_ids, attention_mask=model_attention_mask(module, batch.attention_mask),
                  position_ids=batch.position_ids).last_hidden_state  # [S, L, H]
    loss, nll = completion_nll_sum(module.get_output_embeddings(), hidden, batch.target_ids, batch.loss_mask,
                                   softcap=final_logit_softcap(module))
    return loss, {"loss_sum": nll, "completion_tokens": batch.num_target_tokens}


def train_sft_rows(stage: str, config, tokenizer, rows: list[Row], resume_from, log=print) -> TrainResult:
    from .engine import resolve_device

    device = resolve_device(config)
    count = lambda indices: sum(len(rows[i].completion_ids) for i in indices)  # noqa: E731
    return run_supervised(stage, config, rows, tokenizer, causal_lm_builder(config, device), sft_micro_loss, count,
                          resume_from, log=log)


def run_sft(config, log=print) -> TrainResult:
    check_model_dir(config.model, trust_remote_code=config.trust_remote_code)
    pairs = read_prompt_completion(config.data)
    general = read_prompt_completion(config.general_data) if config.general_data else []
    resume_from = prepare_output_dir(config, "sft")
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    rows = tokenize_rows(pairs, tokenizer, config.max_seq_length)
    rows = mix_general(rows, tokenize_rows(general, tokenizer, config.max_seq_length), config.general_ratio, config.seed)
    log(f"sft: {len(rows)} rows ({len(general) and len(rows) - len(pairs)} general), "
        f"{sum(len(r.completion_ids) for r in rows)} completion tokens")
    torch.manual_seed(config.seed)
    return train_sft_rows("sft", config, tokenizer, rows, resume_from, log=log)
