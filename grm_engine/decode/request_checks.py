"""Checks of a generate() call's inputs, before any work: SamplingParams' fields, prompts to token ids, sampling
parameters against the engine (samples per request, KV pool, vocabulary). Errors name the request, the argument
and what to change: a TypeError for a value of the wrong kind, a ValueError for a value out of range."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def is_integer(value) -> bool:
    """A Python or numpy integer; never a bool (True is not a count) and never a float (1.0 is not an id)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value) -> bool:
    """A Python or numpy int or float (not a bool, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _integer(params, name: str, low: int, high: int | None = None, *, optional: bool = False) -> None:
    value = getattr(params, name)
    if value is None and optional:
        return
    if not is_integer(value):
        raise TypeError(f"SamplingParams: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"SamplingParams: {name} must be {bound}, got {value}")
    setattr(params, name, int(value))


def _real(params, name: str) -> float:
    value = getattr(params, name)
    if not is_real(value):
        raise TypeError(f"SamplingParams: {name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"SamplingParams: {name} must be finite, got {value}")
    setattr(params, name, float(value))
    return float(value)


def check_sampling_fields(params) -> None:
    """SamplingParams.__post_init__: every field of the right kind and range (numpy scalars become Python ones)."""
    _integer(params, "n", 1)
    if _real(params, "temperature") < 0:
        raise ValueError(f"SamplingParams: temperature must be >= 0 (0 is greedy), got {params.temperature}")
    if not 0 < _real(params, "top_p") <= 1:
        raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {params.top_p}")
    _integer(params, "top_k", 0)
    _integer(params, "max_tokens", 1)
    _integer(params, "seed", 0, 2**63, optional=True)
    _integer(params, "request_key", 0, 2**32, optional=True)
    for name in ("ignore_eos", "logprobs"):
        if not isinstance(getattr(params, name), (bool, np.bool_)):
            raise TypeError(f"SamplingParams: {name} must be True or False, got {getattr(params, name)!r}")
    if isinstance(params.stop, str):
        params.stop = [params.stop]
    params.stop = [] if params.stop is None else params.stop
    params.stop_token_ids = [] if params.stop_token_ids is None else params.stop_token_ids
    if not isinstance(params.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in params.stop):
        raise TypeError(f"SamplingParams: stop must be a list of non-empty strings, got {params.stop!r}")
    if not isinstance(params.stop_token_ids, (list, tuple)) or not all(is_integer(t) and t >= 0
                                                                       for t in params.stop_token_ids):
        raise TypeError(f"SamplingParams: stop_token_ids must be a list of ints >= 0, got {params.stop_token_ids!r}")
    params.stop, params.stop_token_ids = list(params.stop), [int(t) for t in params.stop_token_ids]


def _is_token_list(prompt) -> bool:
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        return prompt.ndim == 1
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(is_integer(t) for t in prompt)


def _token_ids(prompt, i: int) -> list[int]:
    """One prompt given as token ids (list, tuple, 1-D numpy array or tensor of integers) -> list of int."""
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        if prompt.ndim != 1:
            raise ValueError(f"generate: prompt {i} is a {prompt.ndim}-D array; give one 1-D array of token ids per prompt")
        is_int = (np.issubdtype(prompt.dtype, np.integer) if isinstance(prompt, np.ndarray)
                  else not (prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool))
        if not is_int:
            raise TypeError(f"generate: prompt {i} has dtype {prompt.dtype}; token ids must be integers")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"generate: prompt {i} must be a string or a list of token ids, got {type(prompt).__name__}")
    for j, token in enumerate(prompt):
        if not is_integer(token):
            raise TypeError(f"generate: prompt {i} token {j} is {type(token).__name__} {token!r}; token ids must be "
                            "integers (a float id is never rounded)")
    return [int(t) for t in prompt]


def tokenize_prompts(prompts, tokenizer, vocab_size: int, max_model_len: int) -> list[list[int]]:
    """A prompt, or a list of strings / token id lists -> token id lists; TypeError/ValueError naming the prompt."""
    if isinstance(prompts, str) or _is_token_list(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not len(prompts):
        raise ValueError("generate: prompts must be a non-empty list of strings or token id lists")
    token_lists = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"generate: prompt {i} is a string but the decoder has no tokenizer; pass tokenizer= or token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"generate: prompt {i} holds a lone surrogate {prompt[e.start]!r} at character "
                                 f"{e.start}; it is not text a tokenizer can encode") from None
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = _token_ids(prompt, i)
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
    from .config import SamplingParams

    bs, pool = config.block_size, num_blocks
    for i, (ids, params) in enumerate(zip(token_lists, params_list)):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: sampling_params[{i}] is {type(params).__name__}, not SamplingParams")
        if params.n > config.max_num_seqs:
            raise ValueError(f"generate: request {i} asks n={params.n} samples but max_num_seqs={config.max_num_seqs}; "
                             "raise max_num_seqs to at least n")
        if params.stop and not has_tokenizer:
            raise ValueError(f"generate: request {i} has stop strings but the decoder has no tokenizer")
        longest = min(len(ids) + params.max_tokens, max_model_len)
        if -(-longest // bs) > pool:
            raise ValueError(f"generate: request {i} may reach {longest} tokens, more than the KV pool holds "
                             f"({pool} blocks of {bs}); lower max_tokens or give the cache more memory")
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"generate: request {i} stop_token_ids {bad} are outside the vocabulary ({vocab_size})")
