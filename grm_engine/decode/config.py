"""User-facing settings of the decoder: what to sample (SamplingParams) and how to run (DecoderConfig)."""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample the completions of one prompt.

    temperature 0 is greedy. top_k 0 / top_p 1.0 disable those filters. The noise of sample j of
    request r at position p is a pure function of (seed, r, j, p), so a completion does not depend on
    which other requests share its batch or on preemption. seed None draws one seed per generate().
    request_key, when set, stands in for r: the same (seed, request_key) gives the same samples in any call,
    wherever the request sits in it (resuming a partly finished job, re-running a subset).
    logprobs True returns, per generated token, log_softmax(logits / temperature)[token]
    (temperature 0 counts as 1), the quantity GRPO calls old_logp.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    request_key: int | None = None  # replaces the request's position in the noise key (stable across calls)

    def __post_init__(self):
        from .request_checks import check_sampling_fields  # (request_checks uses this class)

        check_sampling_fields(self)  # TypeError / ValueError naming the field


@dataclass
class DecoderConfig:
    """Engine settings. num_kv_blocks None sizes the pool from free memory (kv_cache_memory_fraction)."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (CUDA only); False: the same step, eager
    max_cuda_graphs: int = 64  # step shapes captured at most; later shapes run eagerly
    cascade_attention: bool = True  # samples sharing a long prompt read its KV once per group (CUDA); False: plain kernel
    # decode steps launched per round of host bookkeeping (CUDA graph path): the host's per-sequence work is paid once
    # per round, not per token. A sample that stops inside a round wastes at most steps - 1 steps; the tokens are
    # the same as with 1 (the noise is keyed by position, and a round only runs when no sequence can be preempted)
    num_scheduler_steps: int = 8
    # experimental, off until measured faster on the GPU: decode steps (<= 128 rows, Triton path) run the Llama-family
    # projections through the split-K kernel grm_engine.kernels.skinny_linear instead of cuBLAS; prefill keeps F.linear
    skinny_linear: bool = False

    def use_cuda_graphs(self) -> bool:
        """cuda_graphs, unless the environment says GRM_ENGINE_CUDA_GRAPHS=0 (debugging without editing code)."""
        return self.cuda_graphs and os.environ.get("GRM_ENGINE_CUDA_GRAPHS", "1").strip() not in ("0", "false", "off")

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_cuda_graphs", "num_scheduler_steps"):
            _check_int(name, getattr(self, name))
        if not isinstance(self.skinny_linear, bool):
            raise TypeError(f"DecoderConfig: skinny_linear must be True or False, got {self.skinny_linear!r}")
        for name in ("num_kv_blocks", "max_model_len"):  # None: sized from memory / the model's context
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
        fraction = self.kv_cache_memory_fraction
        if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool):
            raise TypeError(f"DecoderConfig: kv_cache_memory_fraction must be a number, got {fraction!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"DecoderConfig: block_size must be a power of two, got {self.block_size}")
        if not 0 < fraction <= 1:
            raise ValueError(f"DecoderConfig: kv_cache_memory_fraction must be in (0, 1], got {fraction}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("DecoderConfig: max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"DecoderConfig: max_model_len must be None (the model's context) or >= 1, "
                             f"got {self.max_model_len}")
        if not 1 <= self.num_scheduler_steps <= 64:
            raise ValueError(f"DecoderConfig: num_scheduler_steps must be in 1..64, got {self.num_scheduler_steps}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"DecoderConfig: num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


def _check_int(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # True is not a count
        raise TypeError(f"DecoderConfig: {name} must be an int, got {value!r}")
