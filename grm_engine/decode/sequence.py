"""One sequence being generated: its tokens, its KV block table and where it stands."""
from __future__ import annotations

import enum

from .config import SamplingParams


PENDING = -1  # a sampled token still on the device (the decoder runs one step ahead of its bookkeeping)


class SequenceStatus(enum.Enum):
    WAITING = 0  # holds no KV blocks; (re)computes its tokens when admitted
    PREFILLING = 1  # holds blocks; some tokens still lack KV (chunked prefill)
    RUNNING = 2  # every token but the last has KV; decodes one token per step
    FINISHED = 3


class Sequence:
    """Sample `sample_index` of request `request_index`.

    A fresh request enters as one sequence with num_samples_to_fork = n: its prompt is prefilled once,
    n first tokens are sampled from the last prompt position, and it forks into n sequences that share
    the prompt's KV blocks. A preempted sequence keeps its tokens and recomputes their KV later.
    """

    def __init__(self, seq_id: int, request_index: int, sample_index: int, token_ids: list[int],
                 num_prompt_tokens: int, params: SamplingParams, num_samples_to_fork: int = 1):
        self.seq_id = seq_id
        self.request_index = request_index
        self.sample_index = sample_index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.num_samples_to_fork = num_samples_to_fork
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V sit in the blocks of block_table
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.logprobs: list[float] = []
        self.stop_text_len: int | None = None  # where a matched stop string starts in the text

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def fork(self, seq_id: int, sample_index: int) -> "Sequence":
        """A sibling with the same tokens and no blocks (the block manager shares them)."""
        child = Sequence(seq_id, self.request_index, sample_index, self.token_ids, self.num_prompt_tokens, self.params)
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.logprobs = list(self.logprobs)
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_index}, sample={self.sample_index}, "
                f"len={len(self)}, computed={self.num_computed_tokens}, status={self.status.name})")
