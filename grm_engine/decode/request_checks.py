"""Checks of a generate() call's inputs, before any work: prompts to token ids, sampling parameters against the
engine (samples per request, KV pool, vocabulary). Errors name the request and what to change."""
from __future__ import annotations

from .config import SamplingParams


def tokenize_prompts(prompts, tokenizer, vocab_size: int, max_model_len: int) -> list[list[int]]:
    """A prompt, or a list of strings / token id lists -> token id lists; ValueError naming the bad prompt."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of strings or token id lists")
    token_lists = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"generate: prompt {i} is a string but the decoder has no tokenizer; pass tokenizer= or token ids")
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(ids) >= max_model_len:
            raise ValueError(f"generate: prompt {i} has {len(ids)} tokens; the model context is {max_model_len}")
        token_lists.append(ids)
    return token_lists

def check_sampling_params(token_lists, params_list, config, num_blocks: int, vocab_size: int, max_model_len: int,
                      has_tokenizer: bool) -> None:
    """Every request fits the engine (samples, KV pool, vocabulary) before any work starts."""
    bs, pool = config.block_size, num_blocks
    for i, (ids, params) in enumerate(zip(token_lists, params_list)):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: sampling_params[{i}] is {type(params).__name__}, not SamplingParams")
        if params.n > config.max_num_seqs:
            raise ValueError(f"generate: request {i} asks n={params.n} samples but max_num_seqs={config.max_num_seqs}")
        if params.stop and not has_tokenizer:
            raise ValueError(f"generate: request {i} has stop strings but the decoder has no tokenizer")
        longest = min(len(ids) + params.max_tokens, max_model_len)
        if -(-longest // bs) > pool:
            raise ValueError(f"generate: request {i} may reach {longest} tokens, more than the KV pool holds "
                             f"({pool} blocks of {bs}); lower max_tokens or give the cache more memory")
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"generate: request {i} stop_token_ids {bad} are outside the vocabulary ({vocab_size})")
