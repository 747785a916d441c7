"""Runs one scheduled step: builds the step's tensors (token ids, positions, slots, block tables), applies
copy-on-write block copies, runs the model and returns the logits of the sequences that sample.

A decode step builds its inputs with numpy (`decode_arrays`; `prepare` with its per-token loop is the
reference) and moves them, with the sampling arrays, to the device in one pinned copy; on CUDA the step
(forward, logits, sampling) runs padded to a bucket, replayed from a CUDA graph (cuda_graphs.py).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from .attention import AttentionMetadata, attention_backend
from .cuda_graphs import DecodeGraphs, StepKey, packed_layout, typed_view
from .sampler import row_hash_numpy, sample
from .scheduler import ScheduledBatch
from .sequence import PENDING


class ModelRunner:
    def __init__(self, model, num_kv_blocks: int, block_size: int, max_num_seqs: int = 256, cuda_graphs: bool = True,
                 max_cuda_graphs: int = 64, cascade: bool = True, steps_per_round: int = 1):
        self.model = model
        self.block_size = block_size
        self.device = model.device
        # [parts, layers, blocks, block_size, heads, dim]: the model's KV layout (kv_layout), e.g. K and V of
        # kv_heads x head_dim (Llama), or one latent row (DeepSeek-V2's MLA). Zero-filled: padded page reads in the
        # reference path are masked out, and 0 * garbage could be NaN.
        parts, heads, dim = kv_layout(model)
        self.kv_cache = torch.zeros(parts, model.num_layers, num_kv_blocks, block_size, heads, dim,
                                    dtype=model.dtype, device=self.device)
        self.layer_caches = [tuple(self.kv_cache[p, i] for p in range(parts)) for i in range(model.num_layers)]
        self.graphs = None  # the padded (graph-capturable) decode step: CUDA with the Triton kernels only
        # the shared-prefix kernel serves full-attention layers without soft-capping (others keep the plain kernel)
        self.cascade = (cascade and getattr(model, "supports_cascade", True) and any(w is None for w in model.windows)
                        and model.softcap is None)
        self.cascade_thresholds = {}  # find_shared_prefix_groups' defaults (the measured crossover); tests lower them
        self._groups_cache = None  # (seq ids of the batch, its grouping)
        if self.device.type == "cuda" and attention_backend(self.device) == "triton":
            self.graphs = DecodeGraphs(model, self.layer_caches, block_size, max_num_seqs, cuda_graphs, max_cuda_graphs,
                                       steps_per_round)

    @staticmethod
    def kv_bytes_per_block(model, block_size: int) -> int:
        parts, heads, dim = kv_layout(model)
        return parts * model.num_layers * block_size * heads * dim * model.dtype.itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Host arrays -> device tensors (same dtypes and shapes); on CUDA through one pinned copy."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        return upload_packed(arrays, self.device, pin=True)

    def decode_arrays(self, batch: ScheduledBatch) -> dict[str, np.ndarray]:
        """A decode step's inputs on the host, vectorized (one new token per sequence)."""
        assert not batch.is_prefill
        bs, seqs = self.block_size, batch.seqs
        num_seqs = len(seqs)
        positions = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, num_seqs)  # [B]
        input_ids = np.fromiter((s.token_ids[s.num_computed_tokens] for s in seqs), np.int64, num_seqs)
        tables = [s.block_table for s in seqs]
        table_lens = np.fromiter(map(len, tables), np.int64, num_seqs)
        block_tables = np.zeros((num_seqs, int(table_lens.max())), dtype=np.int32)  # [B, max_blocks], 0-padded
        block_tables[np.arange(block_tables.shape[1])[None, :] < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(tables), np.int32, int(table_lens.sum()))  # row-major, as the rows
        slots = block_tables[np.arange(num_seqs), positions // bs].astype(np.int64) * bs + positions % bs
        context_lens = (positions + 1).astype(np.int32)
        return dict(input_ids=input_ids, positions=positions, slots=slots, block_tables=block_tables,
                    context_lens=context_lens, table_lens=table_lens)

    def prepare_decode(self, batch: ScheduledBatch, extra: list[np.ndarray] = ()):
        """A decode step's tensors (as prepare's), plus the caller's `extra` host arrays, in one transfer."""
        arrays = self.decode_arrays(batch)
        names = ("input_ids", "positions", "slots", "block_tables", "context_lens")
        ids_t, pos_t, slots_t, tables_t, lens_t, *extra_t = self.upload([arrays[n] for n in names] + list(extra))
        positions = arrays["positions"]
        meta = AttentionMetadata(is_prefill=False, slot_mapping=slots_t, block_tables=tables_t, context_lens=lens_t,
                                 query_starts=list(range(len(batch.seqs) + 1)), num_cached=positions.tolist(),
                                 max_context_len=int(positions.max()) + 1)
        return ids_t, pos_t, meta, extra_t

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
            query_starts_device=tensor(query_starts, torch.int32),  # [B + 1], for the varlen prefill kernel
            num_cached_device=tensor(num_cached, torch.int32),  # [B]
            max_query_len=max(batch.num_new_tokens),
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta

    def decode_step(self, batch: ScheduledBatch, sampling, previous_rows: dict[int, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decode step with sampling (`sampling`: the decoder's SamplingArrays for batch.seqs)
        -> (tokens [B] int64, log-probs [B] fp32 or None) on the device, row i for batch.seqs[i]. On CUDA with
        the Triton kernels: a padded step replayed from a CUDA graph (cuda_graphs.py), with the shared-prefix
        attention when samples share a long prompt; then batch.seqs may come back reordered (groups adjacent).
        Elsewhere: eager and unpadded. previous_rows (CUDA path): seq_id -> row of the previous decode step, for
        sequences whose last token is still PENDING on the host (the step reads it on the device)."""
        flags = dict(all_greedy=sampling.all_greedy, any_filter=sampling.any_filter, any_greedy=sampling.any_greedy)
        if self.graphs is None:
            self.copy_blocks(batch.block_copies)
            input_ids, positions, meta, (row_hash, temperature, top_p, top_k) = self.prepare_decode(batch, sampling.arrays())
            hidden = self.model.forward(input_ids, positions, self.layer_caches, meta)  # [B, hidden]
            logits = self.model.compute_logits(hidden)  # [B, V] fp32
            return sample(logits, temperature, top_k, top_p, row_hash, sampling.want_logprobs, **flags)
        tokens, logprobs = self.decode_round(batch, sampling, previous_rows, 1)
        return tokens[0], (logprobs[0] if logprobs is not None else None)

    def decode_round(self, batch: ScheduledBatch, sampling, previous_rows: dict[int, int] | None, steps: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`steps` decode steps launched back to back on the CUDA graph path, the host building every step's inputs
        up front (positions, slots and noise keys advance by one per step; blocks were taken for all of them)
        -> tokens [steps, B] int64 and log-probs [steps, B] or None on the device. Row i is batch.seqs[i] (the
        shared-prefix grouping may reorder batch.seqs, batch.num_new_tokens with it). Sequence i takes part in the
        first batch.num_new_tokens[i] steps; later its row repeats its last position, stores no K/V (slot -1) and
        its tokens are never read. Step s > 0 takes its input tokens from step s - 1 on the device."""
        from grm_engine.kernels.paged_attention import choose_num_splits

        self.copy_blocks(batch.block_copies)
        arrays = self.decode_arrays(batch)
        arrays.update(row_hash=sampling.row_hash, temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k, input_src=self.input_sources(batch, arrays["input_ids"], previous_rows),
                      active=np.asarray(batch.num_new_tokens, np.int64))
        if steps > 1:
            arrays["noise_keys"] = sampling.keys
        plan = self.group_shared_prefixes(batch, arrays, extra_context=steps - 1) if self.cascade else None
        num_seqs = len(batch.seqs)
        padded = self.graphs.bucket(num_seqs)
        width = max(16, 1 << (arrays["block_tables"].shape[1] - 1).bit_length())  # power of two: few graph shapes
        key = StepKey(padded, width, (sampling.all_greedy, sampling.any_greedy, sampling.any_filter, sampling.want_logprobs),
                      choose_num_splits(padded, self.model.num_kv_heads, width * self.block_size, self.device),
                      plan.graph_key if plan is not None else None)
        if steps == 1:
            tokens, logprobs = self.graphs.run(key, arrays, num_seqs, plan)
            return tokens[None], (logprobs[None] if logprobs is not None else None)
        tokens = torch.empty(steps, num_seqs, dtype=torch.int64, device=self.device)  # [steps, B]
        logprobs = torch.empty(steps, num_seqs, dtype=torch.float32, device=self.device) if sampling.want_logprobs else None
        rows = np.arange(num_seqs)
        active, first = arrays["active"], arrays["positions"]
        for step in range(steps):
            if step > 0:
                offset = np.minimum(step, active - 1)  # [B]: a row past its steps repeats its last position
                positions = first + offset
                slots = arrays["block_tables"][rows, positions // self.block_size].astype(np.int64) * self.block_size
                keys = arrays["noise_keys"].copy()
                keys[:, 3] += offset.astype(np.uint64)
                arrays = dict(arrays, positions=positions, context_lens=(positions + 1).astype(np.int32),
                              slots=np.where(step < active, slots + positions % self.block_size, -1),
                              input_ids=np.zeros(num_seqs, np.int64), input_src=rows.astype(np.int64),
                              row_hash=row_hash_numpy(keys))
            step_tokens, step_logprobs = self.graphs.run(key, arrays, num_seqs, plan)
            tokens[step].copy_(step_tokens)  # the graph's output buffer is overwritten by the next replay
            if logprobs is not None:
                logprobs[step].copy_(step_logprobs)
        return tokens, logprobs

    @staticmethod
    def input_sources(batch: ScheduledBatch, input_ids: np.ndarray, previous_rows) -> np.ndarray:
        """[B] int64: the previous step's row holding each sequence's input token when the host has not seen it
        yet (token PENDING), else -1."""
        source = np.full(len(input_ids), -1, dtype=np.int64)
        waiting = np.flatnonzero(input_ids == PENDING)
        if len(waiting):
            try:
                source[waiting] = [previous_rows[batch.seqs[i].seq_id] for i in waiting]
            except (KeyError, TypeError):
                raise RuntimeError("decode step: a sequence's input token is pending but it was not in the previous step") from None
            input_ids[waiting] = 0
        return source

    def group_shared_prefixes(self, batch: ScheduledBatch, arrays: dict[str, np.ndarray], extra_context: int = 0):
        """Samples that share a prompt's pages, by the measured crossover (shared_prefix.py): when some group
        qualifies, reorders batch.seqs and every per-row array so each group's rows are adjacent and returns the
        host cascade plan (else None: the plain paged kernel serves the step)."""
        from grm_engine.kernels.cascade_attention import item_capacity_for, plan_cascade_host

        from .shared_prefix import find_shared_prefix_groups, use_cascade

        # Between steps a decode batch's sharing changes only when its sequences change or a copy-on-write gives a
        # row a private copy of a shared block (new blocks are private): reuse the grouping until then.
        # (A cached group's prefix only grows with the contexts, which the cap below would raise; keeping the
        # older, shorter prefix is still exact: the kernel attends to the rest as each row's own suffix.)
        cache_key = tuple(seq.seq_id for seq in batch.seqs)
        if batch.block_copies or self._groups_cache is None or self._groups_cache[0] != cache_key:
            groups = find_shared_prefix_groups(arrays["block_tables"], arrays["table_lens"], arrays["context_lens"],
                                               self.block_size, **self.cascade_thresholds)
            self._groups_cache = (cache_key, groups)
        order, group_starts, prefix_blocks = self._groups_cache[1]
        if not use_cascade(prefix_blocks):
            return None
        batch.seqs = [batch.seqs[i] for i in order]  # the caller appends the sampled tokens in this order
        batch.num_new_tokens = [batch.num_new_tokens[i] for i in order]
        for name, values in arrays.items():
            arrays[name] = values[order]
        plan = plan_cascade_host(group_starts, prefix_blocks, self.block_size, self.model.num_heads,
                                 self.model.num_kv_heads, int(arrays["context_lens"].max()) + extra_context,
                                 item_capacity=item_capacity_for,  # padded with no-op items: graph shapes repeat
                                 **getattr(self.model, "cascade_plan_options", {}))  # e.g. MLA's block_m, split_tokens
        arrays.update(cascade_items=plan.items, prefix_tokens=plan.prefix_tokens)  # ride in the step's one copy
        return plan

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


def kv_layout(model) -> tuple[int, int, int]:
    """(parts, heads, dim) of one token's cache in one layer: the model's kv_layout, else K and V of
    num_kv_heads x head_dim."""
    return getattr(model, "kv_layout", None) or (2, model.num_kv_heads, model.head_dim)


def upload_packed(arrays: list[np.ndarray], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """Copies arrays into one byte buffer (each 8-byte aligned, so every slice views as its dtype), moves it
    in one (pinned, non-blocking) copy and returns views of the device buffer with the arrays' dtypes/shapes."""
    offsets, total = packed_layout([a.nbytes for a in arrays])
    staging = np.empty(total, dtype=np.uint8)
    for a, offset in zip(arrays, offsets):
        staging[offset:offset + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    host = torch.from_numpy(staging)
    packed = host.pin_memory().to(device, non_blocking=True) if pin else host.to(device)
    return [typed_view(packed, o, a.dtype, a.shape) for a, o in zip(arrays, offsets)]
