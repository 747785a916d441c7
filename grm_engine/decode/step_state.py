"""What the host keeps of a decode step: its sampling inputs, built with numpy (SamplingArrays), and, on the
CUDA graph path, the launched step whose tokens are on their way to pinned host memory (PendingStep)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sampler import row_hash_numpy
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class PendingStep:
    """A launched round of decode steps: its rows' sequences, how many steps each took part in, and the tokens
    (log-probs) [steps, B] on their way to pinned host memory."""

    seqs: list[Sequence]
    num_steps: list[int]  # per row: the round's first num_steps[i] tokens of row i are real
    tokens: torch.Tensor  # [steps, B] int64, host (pinned on CUDA; valid once the event completes)
    logprobs: torch.Tensor | None  # [steps, B] fp32
    event: torch.cuda.Event | None  # None off CUDA (the copy was synchronous)

    @classmethod
    def copy_to_host(cls, batch: ScheduledBatch, tokens: torch.Tensor, logprobs: torch.Tensor | None) -> "PendingStep":
        """tokens, logprobs [steps, B] on the device (ModelRunner.decode_round); batch.num_new_tokens: steps per row."""
        cuda = tokens.device.type == "cuda"

        def to_host(t):
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda).copy_(t, non_blocking=cuda)

        event = None
        host_tokens, host_logprobs = to_host(tokens), to_host(logprobs) if logprobs is not None else None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return cls(list(batch.seqs), list(batch.num_new_tokens), host_tokens, host_logprobs, event)

    def wait(self) -> tuple[list[list[int]], list[list[float]] | None]:
        """-> per row, its tokens of the round (and log-probs), num_steps[i] of them."""
        if self.event is not None:
            self.event.synchronize()
        tokens = self.tokens.t().tolist()  # [B][steps]
        logprobs = self.logprobs.t().tolist() if self.logprobs is not None else None
        return tokens, logprobs


@dataclass
class SamplingArrays:
    """Host-side sampling inputs of one step, built with numpy (no per-row tensors, no device syncs)."""

    row_hash: np.ndarray  # [B] int32: the per-row half of the noise hash of key (seed, request, sample, position)
    temperature: np.ndarray  # [B] float32
    top_p: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int64
    want_logprobs: bool
    all_greedy: bool
    any_greedy: bool
    any_filter: bool
    keys: np.ndarray | None = None  # [B, 4] uint64 noise keys (seed, request key, sample, length): a round's
    # step s draws with length + s (ModelRunner.decode_round)

    @classmethod
    def build(cls, seqs: list[Sequence], seeds) -> "SamplingArrays":
        """seeds[r] = (seed, request key) of request r; a row's noise key is (seed, key, sample index, length)."""
        num = len(seqs)
        request = np.fromiter((s.request_index for s in seqs), np.int64, num)
        keys = np.empty((num, 4), dtype=np.uint64)
        keys[:, :2] = np.array(seeds, dtype=np.uint64).reshape(-1, 2)[request]
        keys[:, 2] = np.fromiter((s.sample_index for s in seqs), np.int64, num)
        keys[:, 3] = np.fromiter(map(len, seqs), np.int64, num)
        params = [s.params for s in seqs]
        if all(p is params[0] for p in params):  # one SamplingParams for the whole batch (the usual case)
            first = params[0]
            temperature = np.full(num, first.temperature, np.float32)
            top_p, top_k = np.full(num, first.top_p, np.float32), np.full(num, first.top_k, np.int64)
            want_logprobs = first.logprobs
        else:
            temperature = np.fromiter((p.temperature for p in params), np.float32, num)
            top_p = np.fromiter((p.top_p for p in params), np.float32, num)
            top_k = np.fromiter((p.top_k for p in params), np.int64, num)
            want_logprobs = any(p.logprobs for p in params)
        greedy = temperature <= 0
        return cls(row_hash_numpy(keys), temperature, top_p, top_k, want_logprobs,
                   bool(greedy.all()), bool(greedy.any()), bool(((top_k > 0) | (top_p < 1)).any()), keys)

    def arrays(self) -> list[np.ndarray]:
        return [self.row_hash, self.temperature, self.top_p, self.top_k]
