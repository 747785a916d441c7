"""What Decoder.generate returns (RequestOutput per prompt, SampleOutput per sample) and its counters (DecoderStats)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampleOutput:
    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length" (max_tokens or context end)
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    request_index: int
    prompt_token_ids: list[int]
    outputs: list[SampleOutput]


@dataclass
class DecoderStats:
    """Counters of the last generate() call."""

    prefill_tokens: int = 0  # tokens whose K/V was computed in prefill steps (recompute included)
    prefix_cache_hit_tokens: int = 0  # prompt tokens served from cached blocks
    peak_blocks_in_use: int = 0
    preemptions: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0  # wall time of prefill steps (sampling included; each step ends in a sync)
    decode_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
