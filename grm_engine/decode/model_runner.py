"""Runs one scheduled step: builds the step's tensors (token ids, positions, slots, block tables), applies
copy-on-write block copies, runs the model and returns the logits of the sequences that sample."""
from __future__ import annotations

import numpy as np
import torch

from .attention import AttentionMetadata
from .scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model, num_kv_blocks: int, block_size: int):
        self.model = model
        self.block_size = block_size
        self.device = model.device
        # [2 (K, V), layers, blocks, block_size, kv_heads, head_dim]. Zero-filled: padded page reads in the
        # reference path are masked out, and 0 * garbage could be NaN.
        self.kv_cache = torch.zeros(2, model.num_layers, num_kv_blocks, block_size, model.num_kv_heads,
                                    model.head_dim, dtype=model.dtype, device=self.device)
        self.layer_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(model.num_layers)]

    @staticmethod
    def kv_bytes_per_block(model, block_size: int) -> int:
        return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * model.dtype.itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        input_ids, positions, slots, query_starts, num_cached, context_lens = [], [], [], [0], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            span = range(start, start + n)
            positions.extend(span)
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            query_starts.append(query_starts[-1] + n)
            num_cached.append(start)
            context_lens.append(start + n)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        block_tables = np.zeros((len(batch.seqs), max_blocks), dtype=np.int32)  # [B, max_blocks], 0-padded
        for row, s in zip(block_tables, batch.seqs):
            row[:len(s.block_table)] = s.block_table

        def tensor(values, dtype):
            host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
            if self.device.type == "cuda":
                return host.pin_memory().to(self.device, non_blocking=True)
            return host

        meta = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(block_tables, torch.int32),  # [B, max_blocks]
            context_lens=tensor(context_lens, torch.int32),  # [B]
            query_starts=query_starts,
            num_cached=num_cached,
            max_context_len=max(context_lens),
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """-> fp32 logits [N, vocab], one row per sequence i with batch.needs_logits(i), in batch order."""
        self.copy_blocks(batch.block_copies)
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model.forward(input_ids, positions, self.layer_caches, meta)  # [T, hidden]
        rows = [meta.query_starts[i + 1] - 1 for i in range(len(batch.seqs)) if batch.needs_logits(i)]
        if not rows:
            return hidden.new_empty(0, 0, dtype=torch.float32)
        if batch.is_prefill:
            hidden = hidden[torch.tensor(rows, device=self.device)]
        return self.model.compute_logits(hidden)
